"""The durable tracking spool and its replay (vggdist.tracking spool / sender / fileops / sync) into a real MLflow
store (sqlite): order across writers, durability points, idempotent replay after a crash mid-replay, artifacts,
torn records, MLflow's batch limits, an object-store layout through pyarrow.fs (and on a real S3 server: moto's
server mode on 127.0.0.1, when moto is installed), and the delivery lease.

Faults are injected through the sender's documented extension point, its sink: `Recording` passes every call
through to the real MLflow sink and can stop the process right after MLflow accepted a call, before the sender
acknowledged it (what `kill -9` at that instant does).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.s3_server import moto_s3
from vggdist import tracking
from vggdist.cli import main as cli_main
from vggdist.tracking.records import artifact_record, log_record, status_record
from vggdist.tracking.runs import create_run
from vggdist.tracking.sender import MAX_METRICS, MAX_PARAMS, MAX_TAGS, Sender
from vggdist.tracking.sink import sink as mlflow_sink
from vggdist.tracking.spool import LEASE_FILE, Lease, Spool, SpoolWriter

EXPERIMENT = "spool-tests"


class Crash(BaseException):
    """The sending process dies (not an exception any code path may catch)."""


class Recording:
    """The real MLflow sink, recording each call; raises Crash right after call number `crash_after` succeeded."""

    def __init__(self, uri: str, crash_after: int | None = None) -> None:
        self.uri = uri
        self.real = mlflow_sink(uri)
        self.calls: list[tuple] = []
        self.crash_after = crash_after

    def log_batch(self, run_id, metrics, params, tags) -> None:
        self.real.log_batch(run_id, metrics, params, tags)
        self._record(("log", [m[3] for m in metrics], sorted(params), dict(tags)))

    def log_artifact(self, run_id, local_path, artifact_path, is_dir) -> None:
        self.real.log_artifact(run_id, local_path, artifact_path, is_dir)
        self._record(("artifact", artifact_path, os.path.basename(local_path)))

    def set_status(self, run_id, status, end_time) -> None:
        self.real.set_status(run_id, status, end_time)
        self._record(("status", status))

    def _record(self, call: tuple) -> None:
        self.calls.append(call)
        if self.crash_after is not None and len(self.calls) == self.crash_after:
            raise Crash()


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('spool-sqlite') / 'mlflow.db'}"


def new_run(uri: str, name: str) -> str:
    run_id, _, _ = create_run(EXPERIMENT, run_name=name, tags={}, uri=uri)
    return run_id


def now_ms() -> int:
    return int(time.time() * 1000)


def test_writers_take_turns_and_the_replay_keeps_their_order(uri, tmp_path):
    run = new_run(uri, "order")
    spool = Spool(tmp_path / "run" / "mlflow_spool")
    driver = SpoolWriter(spool, uri)
    driver.append(log_record(run, params={"optim.lr": "0.01"}, tags={"phase": "driver start"}))
    worker = SpoolWriter(spool, uri)  # rank 0 of the Ray Train worker group
    for epoch in (1, 2):
        worker.append(
            log_record(run, [("val/top1_err", 50.0 - epoch, now_ms(), epoch)], {}, {"phase": f"{epoch}"})
        )
        worker.sync()
    restarted = SpoolWriter(spool, uri)  # the restarted group; the old writer died without closing
    restarted.append(log_record(run, [("val/top1_err", 47.0, now_ms(), 3)], {}, {"phase": "3"}))
    restarted.close()
    driver.append(log_record(run, tags={"phase": "driver end"}))  # after the workers: a new segment
    driver.append(status_record(run, "FINISHED", now_ms()))
    driver.close()

    assert len(spool.segments()) == 4
    pending = spool.pending_records()
    assert [r.get("tags", {}).get("phase") for r in pending[:-1]] == [
        "driver start",
        "1",
        "2",
        "3",
        "driver end",
    ]
    assert pending[-1]["kind"] == "status"

    sink = Recording(uri)
    report = Sender(spool, lambda _: sink).deliver()
    assert report.error is None and report.delivered.calls == 6
    # consecutive logging calls of a run go as one request; the tag ends as the last writer set it
    assert sink.calls == [("log", [1, 2, 3], ["optim.lr"], {"phase": "driver end"}), ("status", "FINISHED")]
    got = tracking.get_run(run, uri=uri)
    assert got["status"] == "FINISHED" and got["tags"]["phase"] == "driver end"
    assert not spool.has_pending()


def test_records_reach_the_kernel_at_once_and_the_disk_at_each_sync(tmp_path, monkeypatch):
    fsynced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        fsynced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    spool = Spool(tmp_path / "mlflow_spool")
    w = SpoolWriter(spool, "sqlite:///unused.db", fsync_interval_s=3600)
    w.append(
        log_record("r", tags={"a": "1"})
    )  # starts a segment: its head and the directory entry are fsync'd
    at_start = len(fsynced)
    assert at_start >= 1
    for step in range(20):
        w.append(log_record("r", [("train/step_loss", 1.0, now_ms(), step)]))
    assert len(fsynced) == at_start  # appends alone do not fsync ...
    assert len(spool.pending_records()) == 21  # ... but every record is in the file already
    w.sync()  # an epoch boundary
    assert len(fsynced) == at_start + 1
    w.close()  # the end
    assert len(fsynced) == at_start + 2

    eager = SpoolWriter(spool, "sqlite:///unused.db", fsync_interval_s=0)
    eager.append(log_record("r", tags={"b": "1"}))
    n = len(fsynced)
    eager.append(log_record("r", tags={"b": "2"}))
    assert len(fsynced) == n + 1  # past fsync_interval_s an append fsyncs too
    eager.close()


def test_a_crash_mid_replay_then_replay_again_sends_nothing_twice(uri, tmp_path):
    run = new_run(uri, "crash")
    spool = Spool(tmp_path / "run" / "mlflow_spool")
    w = SpoolWriter(spool, uri)
    for epoch in (1, 2):
        w.append(log_record(run, [("val/top1_err", 50.0 - epoch, now_ms(), epoch)]))
    w.append(log_record(run, tags={tracking.TAG_CHECKPOINT: "/ckpt/epoch_002"}))
    (tmp_path / "eval_results.json").write_text('{"rows": []}')
    w.append(artifact_record(run, w.add_artifact(tmp_path / "eval_results.json"), None, False))
    w.append(log_record(run, [("val/top1_err", 47.0, now_ms(), 3)]))
    end = now_ms()
    w.append(status_record(run, "FINISHED", end))
    w.close()

    first = Recording(uri, crash_after=1)  # MLflow stored epochs 1-2 and the tag; the ack never happened
    with pytest.raises(Crash):
        Sender(spool, lambda _: first).deliver()
    second = Recording(uri, crash_after=2)  # that batch again, then the artifact, then dies again
    with pytest.raises(Crash):
        Sender(spool, lambda _: second).deliver()
    third = Recording(uri)
    report = Sender(spool, lambda _: third).deliver()

    kinds = [c[0] for c in first.calls + second.calls + third.calls]
    assert kinds == ["log", "log", "artifact", "artifact", "log", "status"]
    assert report.error is None and not spool.has_pending()
    rows = tracking.metric_rows(run, "val/top1_err", uri=uri)
    assert sorted(step for step, _, _ in rows) == [1, 2, 3]  # sent twice, stored once
    got = tracking.get_run(run, uri=uri)
    assert got["status"] == "FINISHED" and got["end_time"] == end
    assert got["tags"][tracking.TAG_CHECKPOINT] == "/ckpt/epoch_002"
    assert tracking.list_artifacts(run, uri=uri) == ["eval_results.json"]
    assert Sender(spool, lambda _: Recording(uri)).deliver().delivered.calls == 0


def test_artifacts_are_copied_when_logged_and_a_lost_copy_does_not_block(uri, tmp_path, caplog):
    run = new_run(uri, "artifacts")
    spool = Spool(tmp_path / "run" / "mlflow_spool")
    w = SpoolWriter(spool, uri)
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "tables.csv").write_text("a,b\n1,2\n")
    (report_dir / "nested").mkdir()
    (report_dir / "nested" / "x.txt").write_text("x")
    w.append(artifact_record(run, w.add_artifact(report_dir), "report", True))
    (tmp_path / "gone.txt").write_text("lost")
    lost = w.add_artifact(tmp_path / "gone.txt")
    w.append(artifact_record(run, lost, None, False))
    w.append(log_record(run, tags={"after": "yes"}))
    w.close()
    for p in sorted(report_dir.rglob("*"), reverse=True):  # the originals are gone before the replay
        p.unlink() if p.is_file() else p.rmdir()
    spool.files.remove(spool.join(*lost.split("/")))  # and one copy is lost too

    with caplog.at_level(logging.ERROR):
        report = Sender(spool, lambda _: Recording(uri)).deliver()
    assert report.error is None and report.rejected == 1 and report.delivered.calls == 2
    assert any("gone" in r.getMessage() for r in caplog.records)
    dl = Path(tracking.download_artifact(run, "report", tmp_path / "dl", uri=uri))
    assert (dl / "tables.csv").read_text() == "a,b\n1,2\n" and (dl / "nested" / "x.txt").read_text() == "x"
    assert tracking.get_run(run, uri=uri)["tags"]["after"] == "yes"


def test_a_record_torn_by_a_crash_is_skipped_once_a_later_segment_exists(uri, tmp_path, caplog):
    run = new_run(uri, "torn")
    spool = Spool(tmp_path / "mlflow_spool")
    w = SpoolWriter(spool, uri)
    w.append(log_record(run, [("m", 1.0, now_ms(), 1)]))
    with open(spool.join(spool.segments()[-1][0]), "ab") as f:  # the process dies in the middle of a write
        f.write(b'{"kind":"log","run_id":"' + run.encode())
    assert len(spool.pending_records(final=False)) == 1  # a last line may still be being written: not yet
    restarted = SpoolWriter(spool, uri)
    restarted.append(log_record(run, [("m", 2.0, now_ms(), 2)]))
    restarted.close()
    report = Sender(spool, lambda _: Recording(uri)).deliver(final=False)
    assert report.error is None and report.delivered.calls == 2 and not spool.has_pending()
    assert any("torn" in r.getMessage() for r in caplog.records)
    assert tracking.metric_history(run, "m", uri=uri) == [(1, 1.0), (2, 2.0)]


def test_one_huge_call_is_split_within_mlflows_batch_limits(uri, tmp_path):
    run = new_run(uri, "limits")
    spool = Spool(tmp_path / "mlflow_spool")
    w = SpoolWriter(spool, uri)
    ts = now_ms()
    params = {f"p{i:03d}": str(i) for i in range(250)}
    tags = {f"t{i:03d}": "v" for i in range(120)}
    w.append(log_record(run, [("m", float(s), ts, s) for s in range(2500)], params, tags))
    w.close()
    sink = Recording(uri)
    assert Sender(spool, lambda _: sink).deliver().error is None
    assert all(
        len(c[1]) <= MAX_METRICS and len(c[2]) <= MAX_PARAMS and len(c[3]) <= MAX_TAGS for c in sink.calls
    )
    got = tracking.get_run(run, uri=uri)
    assert got["params"] == params and all(got["tags"][k] == "v" for k in tags)
    assert len(tracking.metric_rows(run, "m", uri=uri)) == 2500


def test_an_object_store_spool_writes_whole_segments_and_syncs(uri, tmp_path):
    """`file://` goes through pyarrow.fs exactly as s3:// does: no appends, one new object per sync."""
    run = new_run(uri, "object-store")
    storage = f"file://{tmp_path / 'store'}"
    spool = Spool(f"{storage}/run-a/mlflow_spool")
    assert not spool.files.appendable
    w = SpoolWriter(spool, uri)
    for epoch in (1, 2):
        w.append(log_record(run, [("val/top1_err", 10.0 * epoch, now_ms(), epoch)]))
    assert spool.segments() == []  # buffered until the epoch's sync
    w.sync()
    (tmp_path / "plan.yaml").write_text("name: x\n")
    w.append(artifact_record(run, w.add_artifact(tmp_path / "plan.yaml"), None, False))
    w.append(status_record(run, "FINISHED", now_ms()))
    w.close()
    assert len(spool.segments()) == 2

    [result] = tracking.sync(storage)
    assert result.left.calls == 0 and result.report.delivered.calls == 4
    got = tracking.get_run(run, uri=uri)
    assert got["status"] == "FINISHED" and tracking.metric_history(run, "val/top1_err", uri=uri) == [
        (1, 10.0),
        (2, 20.0),
    ]
    assert tracking.list_artifacts(run, uri=uri) == ["plan.yaml"]
    assert tracking.sync(storage) == []


def test_one_sender_per_spool_and_a_dead_holders_lease_is_taken_over(uri, tmp_path):
    run = new_run(uri, "lease")
    spool = Spool(tmp_path / "mlflow_spool")
    w = SpoolWriter(spool, uri)
    w.append(log_record(run, tags={"k": "v"}))
    w.close()
    holder = Lease(spool)
    assert holder.try_acquire()
    busy = Sender(spool, lambda _: Recording(uri)).deliver()
    assert busy.busy and busy.delivered.calls == 0 and f"pid {os.getpid()}" in busy.error
    holder.release()

    dead = subprocess.Popen(["true"])
    dead.wait()
    lease = {"host": holder.me["host"], "pid": dead.pid, "id": "deadbeef", "time": time.time()}
    Path(spool.join(LEASE_FILE)).write_text(json.dumps(lease))
    report = Sender(spool, lambda _: Recording(uri)).deliver()
    assert report.delivered.calls == 1 and not Path(spool.join(LEASE_FILE)).exists()


def test_find_spools_and_the_automatic_replay(uri, tmp_path):
    run = new_run(uri, "replay")
    storage = tmp_path / "storage"
    (storage / "no-spool").mkdir(parents=True)
    for name in ("run-a", "run-b"):
        w = SpoolWriter(Spool(storage / name / "mlflow_spool"), uri)
        w.append(log_record(run, tags={name: "1"}))
        w.close()
    found = [s.path for s in tracking.find_spools(storage)]
    assert found == [str(storage / n / "mlflow_spool") for n in ("run-a", "run-b")]
    assert [s.path for s in tracking.find_spools(storage / "run-b")] == [
        str(storage / "run-b" / "mlflow_spool")
    ]
    assert len(tracking.find_spools(storage / "run-b" / "mlflow_spool")) == 1
    with pytest.raises(FileNotFoundError, match="storage directory"):
        tracking.find_spools(tmp_path / "missing")

    assert tracking.replay_pending(tmp_path / "not-yet") == []  # a new storage: nothing to replay
    results = tracking.replay_pending(storage)
    assert [r.report.delivered.calls for r in results] == [1, 1]
    assert tracking.get_run(run, uri=uri)["tags"].keys() >= {"run-a", "run-b"}
    started = time.perf_counter()
    assert tracking.replay_pending(storage) == []  # nothing pending: a listing and a read per spool
    assert time.perf_counter() - started < 0.5


@pytest.fixture(scope="module")
def s3_bucket(tmp_path_factory):
    """A real S3 API (moto's server) on 127.0.0.1 with one bucket; pyarrow and boto find it by AWS_ENDPOINT_URL."""
    with moto_s3(tmp_path_factory.mktemp("moto"), "vggdist-spool") as (bucket, env):
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            yield bucket


def test_a_spool_on_s3_survives_the_job_and_vggdist_sync_delivers_it(uri, s3_bucket, tmp_path, capsys):
    run = new_run(uri, "s3")
    storage = f"{s3_bucket}/ray_results"
    spool = Spool(tracking.spool_dir(f"{storage}/run-s3"))
    w = SpoolWriter(spool, uri)
    w.append(log_record(run, params={"optim.lr": "0.01"}))
    for epoch in (1, 2):
        w.append(log_record(run, [("val/top1_err", 10.0 * epoch, now_ms(), epoch)]))
        w.sync()  # each epoch end: one new object
    (tmp_path / "plan.yaml").write_text("name: s3\n")
    w.append(artifact_record(run, w.add_artifact(tmp_path / "plan.yaml"), None, False))
    w.append(status_record(run, "FINISHED", now_ms()))
    w.close()
    assert len(spool.segments()) == 3

    assert cli_main(["sync", storage]) == 0
    assert f"of run {run}" in capsys.readouterr().out
    got = tracking.get_run(run, uri=uri)
    assert got["status"] == "FINISHED" and got["params"] == {"optim.lr": "0.01"}
    assert tracking.metric_history(run, "val/top1_err", uri=uri) == [(1, 10.0), (2, 20.0)]
    assert tracking.list_artifacts(run, uri=uri) == ["plan.yaml"]
    assert spool.files.exists(spool.join("acked.json")) and not spool.has_pending()
    assert tracking.sync(storage) == []
