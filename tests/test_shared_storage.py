"""vggdist.shared_storage: which run storages a multi-node Ray accepts (a URI, or a path marked shared)."""

from __future__ import annotations

import pytest

from vggdist.shared_storage import MARKER, check_storage_for_cluster, is_marked_shared


def test_node_local_storage_is_refused_only_on_several_nodes(tmp_path):
    storage = str(tmp_path / "results")
    check_storage_for_cluster(storage, 1)  # one node: any path
    check_storage_for_cluster("s3://bucket/vggdist", 4)
    with pytest.raises(ValueError, match="Ray has 3 nodes.*--storage-path /mnt/shared/vggdist.*s3://"):
        check_storage_for_cluster(storage, 3)
    with pytest.raises(ValueError, match="on this node's disk"):
        check_storage_for_cluster("~/vggdist_results", 2)


def test_a_marker_in_the_storage_or_above_it_says_shared(tmp_path):
    mount = tmp_path / "mnt"
    storage = mount / "team" / "results"
    assert not is_marked_shared(str(storage))
    mount.mkdir()
    (mount / MARKER).touch()
    assert is_marked_shared(str(storage))  # the storage directory need not exist yet
    check_storage_for_cluster(str(storage), 8)
    assert not (mount / "team").exists()  # the check writes nothing
