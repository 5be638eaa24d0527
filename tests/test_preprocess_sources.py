"""preprocess.sources: image folder, tar of per-class tars, flat val tar + devkit / Kaggle labels, read in place."""

from __future__ import annotations

import gzip
import tarfile

import pytest

from preprocess.sources import ByteReader, SourceError, list_source, read_bytes, sanitize_key

try:
    from tests import preprocess_fixtures as fx
except ImportError:
    import preprocess_fixtures as fx


def test_image_folder_classes_are_sorted_and_nested_files_belong_to_their_class(tmp_path):
    fx.make_image_folder(tmp_path, ["n02", "n01"], per_class=2)
    nested = tmp_path / "n01" / "deep" / "er"
    nested.mkdir(parents=True)
    (nested / "x.y.jpg").write_bytes(fx.rgb_jpeg(30, 30))
    (tmp_path / "n01" / "x_y.jpg").write_bytes(fx.rgb_jpeg(30, 30))
    (tmp_path / "n01" / "x.y.jpg").write_bytes(fx.rgb_jpeg(30, 30))  # sanitises to the same key as x_y.jpg
    (tmp_path / "n01" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / ".hidden_class").mkdir()
    (tmp_path / "loose.jpg").write_bytes(fx.rgb_jpeg(30, 30))
    listing = list_source(tmp_path)
    assert listing.kind == "image_folder"
    assert [c.wnid for c in listing.classes] == ["n01", "n02"]
    assert listing.class_index == {"n01": 0, "n02": 1}
    sources = sorted(it.source for it in listing.items)
    assert str(nested / "x.y.jpg") in sources and len(sources) == 7
    assert not any(".DS_Store" in s or "loose" in s for s in sources)
    keys = [it.key for it in listing.items]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k for k in keys)
    clash = [it.key for it in listing.items if it.source.endswith(("n01/x.y.jpg", "n01/x_y.jpg"))]
    assert len(clash) == 2 and all(k.startswith("n01_x_y_") for k in clash)  # both got a disambiguating hash
    deep = next(it for it in listing.items if it.source.endswith("er/x.y.jpg"))
    assert deep.wnid == "n01" and deep.key.startswith("n01_deep_er_x")
    assert read_bytes(deep) == (nested / "x.y.jpg").read_bytes()


def test_train_tar_of_tars_is_listed_and_read_in_place(tmp_path):
    files = {
        "n02119789": {f"n02119789_{i}.JPEG": fx.rgb_jpeg(40 + i, 30, i) for i in range(3)},
        "n01440764": {f"n01440764_{i}.JPEG": fx.rgb_jpeg(50, 30 + i, 10 + i) for i in range(2)},
    }
    path = fx.make_train_tar(tmp_path / "ILSVRC2012_img_train.tar", files)
    with tarfile.open(path, "a") as t:  # a stray non-tar member is an input that gets a reason
        fx._add(t, "README.txt", b"hello")
    listing = list_source(path)
    assert listing.kind == "train_tar"
    assert [c.wnid for c in listing.classes] == ["n01440764", "n02119789"]
    assert [r["reason"] for r in listing.rejects] == ["unexpected_member"]
    assert listing.num_inputs == 6
    with ByteReader() as reader:
        for it in listing.items:
            assert reader.read(it) == files[it.wnid][it.source.rsplit("/", 1)[1]]
            assert it.source == f"{path}/{it.wnid}.tar/{it.key}.JPEG"
    assert {it.key for it in listing.items} == {
        "n02119789_0",
        "n02119789_1",
        "n02119789_2",
        "n01440764_0",
        "n01440764_1",
    }


def _val_files(n=6):
    return {f"ILSVRC2012_val_{i:08d}.JPEG": fx.rgb_jpeg(40, 30, 100 + i) for i in range(1, n + 1)}


def test_val_tar_with_devkit_labels_maps_ilsvrc_ids_through_the_wnid(tmp_path):
    path = fx.write_tar(tmp_path / "ILSVRC2012_img_val.tar", _val_files(6))
    data = tmp_path / "devkit" / "data"
    data.mkdir(parents=True)
    # ILSVRC2012_ID order is not wnid order: ID 1 is the largest wnid. ID 1001 is a non-leaf synset.
    fx.write_meta_mat(
        data / "meta.mat",
        [
            (1, "n09999999", "zebra-ish", 0),
            (2, "n01000000", "aardvark-ish", 0),
            (3, "n05000000", "middle", 0),
            (1001, "n00001740", "entity", 3),
        ],
    )
    # images 1..5 labelled; image 6 has no line (a reject), so the label file is shorter than the tar
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n3\n1\n2\n")
    for labels in (data / "ILSVRC2012_validation_ground_truth.txt", tmp_path / "devkit"):
        listing = list_source(path, labels)
        assert [(c.wnid, c.name) for c in listing.classes] == [
            ("n01000000", "aardvark-ish"),
            ("n05000000", "middle"),
            ("n09999999", "zebra-ish"),
        ]
        got = {it.key: listing.class_index[it.wnid] for it in listing.items}
        assert got == {
            "ILSVRC2012_val_00000001": 2,
            "ILSVRC2012_val_00000002": 0,
            "ILSVRC2012_val_00000003": 1,
            "ILSVRC2012_val_00000004": 2,
            "ILSVRC2012_val_00000005": 0,
        }
        assert [r["reason"] for r in listing.rejects] == ["no_label"]
    with pytest.raises(SourceError, match="meta.mat"):
        (tmp_path / "gt.txt").write_text("1\n")
        list_source(path, tmp_path / "gt.txt")


def test_val_tar_with_kaggle_csv_and_train_val_indices_agree(tmp_path):
    path = fx.write_tar(tmp_path / "ILSVRC2012_img_val.tar", _val_files(3))
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n05000000 1 2 3 4 n05000000 5 6 7 8\n"
        "ILSVRC2012_val_00000001,n09999999 1 2 3 4\n"
        "ILSVRC2012_val_00000003,n01000000 1 2 3 4\n"
    )
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01000000 aardvark\nn05000000 middle\nn09999999 zebra\n"
    )
    val = list_source(path, csv)
    assert [(c.wnid, c.name) for c in val.classes] == [
        ("n01000000", "aardvark"),
        ("n05000000", "middle"),
        ("n09999999", "zebra"),
    ]
    assert {it.key: it.wnid for it in val.items}["ILSVRC2012_val_00000002"] == "n05000000"
    train = list_source(
        fx.make_train_tar(
            tmp_path / "train.tar",
            {w: {f"{w}_1.JPEG": fx.rgb_jpeg(20, 20)} for w in ("n09999999", "n01000000", "n05000000")},
        )
    )
    assert train.class_index == val.class_index


def test_source_errors_name_the_fix(tmp_path):
    flat = fx.write_tar(tmp_path / "val.tar", _val_files(1))
    with pytest.raises(SourceError, match="--labels"):
        list_source(flat)
    gz = tmp_path / "val.tar.gz"
    gz.write_bytes(gzip.compress(flat.read_bytes()))
    with pytest.raises(SourceError, match="decompress"):
        list_source(gz)
    with pytest.raises(SourceError, match="does not exist"):
        list_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="class sub-folders"):
        list_source(tmp_path / "empty")
    bad_csv = tmp_path / "x.csv"
    bad_csv.write_text("a,b\n")
    with pytest.raises(SourceError, match="ImageId"):
        list_source(flat, bad_csv)
    assert sanitize_key("a/b.c d") == "a_b_c_d"


def _special_files(root, outside):
    """Everything a walk must not open or follow out of ``root``, spread over classes a and b."""
    import os
    import socket

    a, b = root / "a", root / "b"
    os.mkfifo(a / "fifo.jpg")  # opening it for reading would block for ever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(a / "sock.jpg"))
    sock.close()
    try:
        os.mknod(a / "null.jpg", 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 3))
    except PermissionError:  # not root: a link to /dev/null is a device outside the root anyway
        (a / "null.jpg").symlink_to("/dev/null")
    (a / "out.jpg").symlink_to(outside / "x.jpg")  # a file outside the root
    (a / "outdir").symlink_to(outside)  # a directory outside the root
    (a / "loop").symlink_to(a)  # back to an ancestor
    (a / "up").symlink_to("..")  # back to the root
    (b / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (b / "self.jpg").symlink_to("self.jpg")  # a link loop
    (b / "inside.jpg").symlink_to(a / "a_0.JPEG")  # inside the root: followed
    (b / "sub").symlink_to(a / "deep")  # a directory inside the root, reached twice
    (b / "big.jpg").write_bytes(fx.rgb_jpeg(64, 64) + bytes(5000))


def test_image_folder_walk_opens_regular_files_only_and_never_leaves_the_source(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(fx.rgb_jpeg(30, 30))
    (outside / "y.jpg").write_bytes(fx.rgb_jpeg(30, 30))
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            (root / c / f"{c}_{i}.JPEG").write_bytes(fx.rgb_jpeg(30 + i, 30))
    (root / "a" / "deep").mkdir()
    (root / "a" / "deep" / "d.jpg").write_bytes(fx.rgb_jpeg(30, 30))
    _special_files(root, outside)

    listing = list_source(root, max_file_bytes=4000)
    reasons = {r["source"][len(str(root)) + 1 :]: r["reason"] for r in listing.rejects}
    assert reasons == {
        "a/fifo.jpg": "not_regular_file",
        "a/sock.jpg": "not_regular_file",
        "a/null.jpg": "not_regular_file" if not (root / "a/null.jpg").is_symlink() else "outside_source",
        "a/out.jpg": "outside_source",
        "a/outdir": "outside_source",
        "b/dangling.jpg": "not_regular_file",
        "b/self.jpg": "not_regular_file",
        "b/big.jpg": "too_large",
    }
    details = {r["source"].rsplit("/", 1)[1]: r["detail"] for r in listing.rejects}
    assert (
        "a FIFO" in details["fifo.jpg"]
        and "a socket" in details["sock.jpg"]
        and "loop" in details["self.jpg"]
    )
    shown = sorted(it.source[len(str(root)) + 1 :] for it in listing.items)
    assert shown == ["a/a_0.JPEG", "a/a_1.JPEG", "a/deep/d.jpg", "b/b_0.JPEG", "b/b_1.JPEG", "b/inside.jpg"]
    inside = next(it for it in listing.items if it.source.endswith("inside.jpg"))
    assert inside.wnid == "b" and inside.path == str(root / "a" / "a_0.JPEG")  # read where it really is
    assert listing.num_inputs == 6 + 8 and all(str(outside) not in it.path for it in listing.items)


def test_byte_reader_refuses_what_is_no_longer_a_regular_file_without_blocking(tmp_path):
    import os

    from preprocess.images import Rejected
    from preprocess.sources import Item

    os.mkfifo(tmp_path / "fifo")
    big = tmp_path / "big.jpg"
    big.write_bytes(bytes(5000))
    link = tmp_path / "link.jpg"
    link.symlink_to(big)
    with ByteReader(max_file_bytes=4000) as reader:
        for path, reason in (
            (tmp_path / "fifo", "not_regular_file"),
            (big, "too_large"),
            (link, "not_regular_file"),
        ):
            with pytest.raises(Rejected) as e:
                reader.read(Item("k", "c", str(path), str(path)))
            assert e.value.reason == reason
        with pytest.raises(FileNotFoundError):  # the storage, not the image: left to the caller
            reader.read(Item("k", "c", "gone", str(tmp_path / "gone.jpg")))
    assert read_bytes(Item("k", "c", str(big), str(big))) == bytes(5000)


def test_class_folders_that_leave_the_source_or_repeat_one_are_errors(tmp_path):
    outside = tmp_path / "elsewhere" / "n02"
    outside.mkdir(parents=True)
    root = tmp_path / "root"
    fx.make_image_folder(root, ["n01"], per_class=1)
    (root / "n02").symlink_to(outside)
    with pytest.raises(SourceError, match="n02 is a symbolic link to .*outside --source"):
        list_source(root)
    (root / "n02").unlink()
    (root / "n03").symlink_to(root / "n01")
    with pytest.raises(SourceError, match="n01 and n03 are the same directory"):
        list_source(root)
    (root / "n03").unlink()
    (tmp_path / "link_to_root").symlink_to(root)  # the source itself may be a link
    assert [c.wnid for c in list_source(tmp_path / "link_to_root").classes] == ["n01"]


def test_tar_members_above_max_file_bytes_are_rejected_unread(tmp_path):
    files = {"n01": {"n01_0.JPEG": fx.rgb_jpeg(40, 30), "n01_1.JPEG": fx.rgb_jpeg(40, 30) + bytes(6000)}}
    train = list_source(fx.make_train_tar(tmp_path / "train.tar", files), max_file_bytes=5000)
    assert [it.key for it in train.items] == ["n01_0"]
    assert [(r["source"].rsplit("/", 1)[1], r["reason"]) for r in train.rejects] == [
        ("n01_1.JPEG", "too_large")
    ]
    val = fx.write_tar(tmp_path / "val.tar", {**_val_files(2), "ILSVRC2012_val_00000003.JPEG": bytes(6000)})
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(
        "ImageId,PredictionString\n" + "".join(f"ILSVRC2012_val_0000000{i},n01 1 2 3 4\n" for i in (1, 2, 3))
    )
    listing = list_source(val, csv, max_file_bytes=5000)
    assert len(listing.items) == 2 and [r["reason"] for r in listing.rejects] == ["too_large"]
