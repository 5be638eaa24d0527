"""preprocess.failures and runner: what stops a shard job and what it leaves behind.

Transient read errors are retried and lose nothing (never rejects); persistent ones fail loudly, mark nothing
done and a rerun resumes; a full, read-only or unwritable --out is one line; shards that are not in --out (a
non-shared --out) are refused; and the same on Ray. Faults come from tests.preprocess_faults (ShardHooks) or
from real filesystems (a kernel EIO, a small tmpfs).
"""

from __future__ import annotations

import errno
import re
import subprocess
from pathlib import Path

import pytest

from preprocess.failures import InputUnavailable, JobFailed, OutputError, RetryPolicy, ShardsFailed
from preprocess.shards import ShardHooks, ShardTask, run_shard_job, write_shard
from preprocess.sources import Item
from vggdist.shardformat import read_manifest

try:
    from tests import preprocess_faults as faults
    from tests import preprocess_jobs as jobs
except ImportError:
    import preprocess_faults as faults
    import preprocess_jobs as jobs

FAST = RetryPolicy(attempts=3, backoff_s=0.01)
MATCH = "/n01000000_3.JPEG"  # one plain image of the job


@pytest.fixture(scope="module")
def train_tar(tmp_path_factory) -> Path:
    return jobs.train_tar(tmp_path_factory.mktemp("src") / "ILSVRC2012_img_train.tar")


@pytest.fixture(scope="module")
def reference(train_tar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    run_shard_job(jobs.job(train_tar, out), workers=1, progress=False)
    return out


@pytest.fixture
def small_fs(tmp_path):
    try:
        fs = faults.SmallFilesystem(tmp_path)
    except OSError as e:
        pytest.skip(str(e))
    yield fs
    subprocess.run(["chattr", "-R", "-i", str(fs.path)], capture_output=True)
    fs.unmount()


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("vggdist-preprocess: error:")]


@pytest.mark.parametrize(
    "code", [errno.EIO, errno.ESTALE, errno.ETIMEDOUT, 0], ids=["EIO", "ESTALE", "ETIMEDOUT", "MemoryError"]
)
def test_a_transient_read_error_is_retried_and_loses_no_image(code, train_tar, reference, tmp_path):
    fail = faults.FailReads(MATCH, code, times=2, counter=str(tmp_path / "reads"))
    out = tmp_path / "out"
    summary = run_shard_job(
        jobs.job(train_tar, out), workers=1, progress=False, hooks=ShardHooks(before_read=fail), retry=FAST
    )
    assert fail.calls() == 3  # failed twice, read the third time
    assert summary.written == 34 and "unreadable" not in summary.rejected
    jobs.assert_same_result(out, reference)


def test_a_read_error_that_persists_fails_in_one_line_marks_nothing_done_and_a_rerun_resumes(
    train_tar, reference, tmp_path
):
    out, reads = tmp_path / "out", tmp_path / "reads"
    fault = ("--fail-reads", f"{MATCH}:EIO:-1:{reads}", "--attempts", "3")
    proc = jobs.cli(train_tar, out, *fault)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, stdout
    (line,) = _error_lines(stdout)
    assert "Traceback" not in stdout
    assert f"{MATCH[1:]}: EIO (Input/output error)" in line and "after 3 attempts" in line
    assert "not rejects" in line and "rerun the same command to resume" in line
    assert reads.stat().st_size == 3
    failed = re.search(r"in shard (train-\d{6}\.tar)", line)[1]
    assert not (out / failed).exists() and not (out / ".parts" / f"{failed}.json").exists()
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp-*"))
    done = len(list((out / ".parts").glob("train-*.json")))

    proc = jobs.cli(train_tar, out, *fault, extra=("--verbose",))
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" in stdout and "InputUnavailable" in stdout

    proc = jobs.cli(train_tar, out)  # the storage is back
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    assert f"{done} shards resumed" in stdout
    jobs.assert_same_result(out, reference)


def test_a_read_error_no_retry_can_fix_fails_at_once(train_tar, tmp_path):
    fail = faults.FailReads(MATCH, errno.EACCES, times=-1, counter=str(tmp_path / "reads"))
    with pytest.raises(
        ShardsFailed, match=r"EACCES \(Permission denied\) in shard train-\d+\.tar after 1 attempt\."
    ):
        run_shard_job(
            jobs.job(train_tar, tmp_path / "out"),
            workers=1,
            progress=False,
            hooks=ShardHooks(before_read=fail),
            retry=FAST,
        )
    assert fail.calls() == 1


def test_a_real_eio_from_the_kernel_fails_the_shard_and_leaves_no_file(tmp_path):
    (tmp_path / ".parts").mkdir()
    item = Item("k", "c", "/proc/self/mem:0", "/proc/self/mem", offset=0, size=4096)  # unmapped: EIO
    with pytest.raises(InputUnavailable) as e:
        write_shard(str(tmp_path), ShardTask(0, "train-000000.tar", ((item, 0),)), jobs.LIMITS)
    assert e.value.errno == errno.EIO and e.value.retryable and e.value.shard == "train-000000.tar"
    assert [p.name for p in tmp_path.iterdir()] == [".parts"] and not any((tmp_path / ".parts").iterdir())


def test_a_full_disk_stops_in_one_line_with_the_space_needed_and_a_rerun_after_freeing_space_resumes(
    train_tar, reference, small_fs
):
    out = small_fs.path / "shards"
    total = sum(s["bytes"] for s in read_manifest(reference)["shards"])
    small_fs.leave_free(total // 2)
    proc = jobs.cli(train_tar, out)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, stdout
    (line,) = _error_lines(stdout)
    assert "Traceback" not in stdout
    assert f"No space left on device (ENOSPC) writing {out}/" in line and "free there" in line
    needed = re.search(r"the job needs about ([\d.,]+) kB more", line)
    assert needed and 0.2 * total < 1000 * float(needed[1].replace(",", "")) < 2 * total, line
    assert "free space" in line and "rerun the same command to resume" in line
    done = len(list((out / ".parts").glob("train-*.json")))
    assert 1 <= done < 8 and not list(out.glob(".*.tmp-*"))  # the partial shard is already gone

    proc = jobs.cli(train_tar, out, extra=("--verbose",))
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" in stdout and "OSError: [Errno 28]" in stdout

    small_fs.free_space()
    proc = jobs.cli(train_tar, out)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    assert "shards resumed" in stdout
    jobs.assert_same_result(out, reference)


def test_a_read_only_or_permission_denied_out_stops_in_one_line_and_writes_nothing(train_tar, small_fs):
    small_fs.remount("ro")
    out = small_fs.path / "shards"
    proc = jobs.cli(train_tar, out)
    stdout, _ = proc.communicate(timeout=120)
    (line,) = _error_lines(stdout)
    assert proc.returncode == 1 and "Traceback" not in stdout
    assert f"Read-only file system (EROFS) writing {out}" in line and "must be writable" in line
    assert not out.exists()

    small_fs.remount("rw")
    locked = small_fs.path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    out = locked / "shards"  # even root may not write in an immutable directory: EPERM
    proc = jobs.cli(train_tar, out)
    stdout, _ = proc.communicate(timeout=120)
    (line,) = _error_lines(stdout)
    assert proc.returncode == 1 and "Operation not permitted (EPERM)" in line and "must be writable" in line
    assert not out.exists()


def test_shards_missing_from_out_after_their_tasks_wrote_them_are_refused(train_tar, reference, tmp_path):
    """A shard task on another node with a node-local --out: the driver must not write a manifest of files it
    does not have."""
    out, elsewhere = tmp_path / "out", tmp_path / "other_node"
    elsewhere.mkdir()
    hooks = ShardHooks(after_rename=faults.MoveShardAway(str(out), str(elsewhere)))
    with pytest.raises(JobFailed, match=r"^8 of 8 shards are not in .*train-000000\.tar \(missing\)") as e:
        run_shard_job(jobs.job(train_tar, out), workers=1, progress=False, hooks=hooks)
    assert "--out must be shared storage that every Ray node sees" in str(e.value) and "\n" not in str(
        e.value
    )
    assert not (out / "manifest.json").exists()
    summary = run_shard_job(jobs.job(train_tar, out), workers=1, progress=False)
    assert summary.resumed_shards == 0
    jobs.assert_same_result(out, reference)


def test_output_error_messages_name_the_path_and_the_fix():
    full = OutputError("/o/.x.tmp", errno.EDQUOT, "Disk quota exceeded", "train-000001.tar")
    text = str(full.with_estimate(140_000_000, 5_600_000_000, 12_300_000))
    assert text.startswith("Disk quota exceeded (EDQUOT) writing /o/.x.tmp (shard train-000001.tar); 12.3 MB")
    assert "needs about 5.6 GB more (this shard about 140.0 MB)" in text and "rerun the same command" in text
    denied = str(OutputError("/o", errno.EACCES, "Permission denied"))
    assert "(EACCES) writing /o: --out must be writable by this user (on every node)" in denied


@pytest.mark.slow
def test_on_ray_the_driver_retries_transient_read_errors_and_stops_on_persistent_and_output_ones(
    train_tar, reference, tmp_path, monkeypatch
):
    import cloudpickle
    import ray

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray_tmp = Path(f"/tmp/rpf{__import__('os').getpid()}")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    cloudpickle.register_pickle_by_value(faults)  # the hooks travel to the workers by value
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        fail = faults.FailReads(MATCH, errno.ESTALE, times=2, counter=str(tmp_path / "reads"))
        out = tmp_path / "ray"
        summary = run_shard_job(
            jobs.job(train_tar, out),
            workers=2,
            progress=False,
            hooks=ShardHooks(before_read=fail),
            retry=FAST,
        )
        assert fail.calls() == 3 and summary.written == 34
        jobs.assert_same_result(out, reference)

        fail = faults.FailReads(MATCH, errno.EIO, times=-1, counter=str(tmp_path / "reads2"))
        out = tmp_path / "ray2"
        with pytest.raises(ShardsFailed, match=r"EIO .* after 3 attempts"):
            run_shard_job(
                jobs.job(train_tar, out),
                workers=2,
                progress=False,
                hooks=ShardHooks(before_read=fail),
                retry=FAST,
            )
        assert fail.calls() == 3 and not (out / "manifest.json").exists()
        assert 1 <= len(list((out / ".parts").glob("train-*.json"))) < 8 and not list(out.glob(".*.tmp-*"))

        try:  # a full --out: the task's OutputError stops the job at once (Ray's retries are for dead workers)
            fs = faults.SmallFilesystem(tmp_path / "fs")
        except OSError as e:
            pytest.skip(f"Ray paths checked; the full --out part needs a mount: {e}")
        try:
            out = fs.path / "shards"
            fs.leave_free(sum(s["bytes"] for s in read_manifest(reference)["shards"]) // 2)
            with pytest.raises(
                OutputError, match=r"No space left on device \(ENOSPC\) writing .* free there"
            ):
                run_shard_job(jobs.job(train_tar, out), workers=2, progress=False)
            fs.free_space()
            run_shard_job(jobs.job(train_tar, out), workers=2, progress=False)
            jobs.assert_same_result(out, reference)
        finally:
            fs.unmount()
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(faults)
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def test_a_shard_task_on_a_node_without_out_refuses_with_the_fix(tmp_path):
    from preprocess.failures import OutNotShared

    item = Item("k", "c", "x.jpg", str(tmp_path / "x.jpg"))
    with pytest.raises(OutNotShared, match=r"does not exist on node .*--out must be shared storage"):
        write_shard(str(tmp_path / "elsewhere"), ShardTask(0, "train-000000.tar", ((item, 0),)), jobs.LIMITS)
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_an_out_that_is_not_shared_by_every_ray_node_is_refused_not_listed(train_tar, tmp_path):
    """Two real Ray nodes; the one that runs the tasks sees, at --out's path, its own directory (a tmpfs in its
    own mount namespace), as a node-local --out on a real cluster. The driver must not write a manifest."""
    import os
    import shutil

    import ray

    try:
        from tests.ray_cluster import RAY, RayCluster
    except ImportError:
        from ray_cluster import RAY, RayCluster

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a node with its own mount namespace")
    out = tmp_path / "out"
    out.mkdir()
    c = RayCluster(num_cpus=0, dashboard=False)  # the head runs no task
    try:
        node = (
            f"mount -t tmpfs -o size=64m tmpfs {out} && mkdir {out}/.parts && exec {RAY} start "
            f"--address={c.address} --node-ip-address=127.0.0.2 --num-cpus=2 --temp-dir={c.temp_dir} "
            "--disable-usage-stats"
        )
        started = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", node],
            env=c.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if started.returncode != 0:
            pytest.skip(f"no second node in its own mount namespace here: {started.stderr[-300:]}")
        ray.init(address=c.address, log_to_driver=False)
        c.wait_for_nodes(2)
        with pytest.raises(JobFailed, match=r"^8 of 8 shards are not in .*--out must be shared storage"):
            run_shard_job(jobs.job(train_tar, out), workers=2, address=c.address, progress=False)
        assert not (out / "manifest.json").exists() and not list(out.glob("train-*.tar"))
    finally:
        ray.shutdown()
        c.stop()
