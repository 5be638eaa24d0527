"""How a command starts, fails and restarts, end to end with real processes (`vggdist.cluster`, `vggdist.ray_fit`,
`vggdist.ray_checkpoints`):

- a real `ray start --head` runs (its record where Ray's processes look for it: RAY_TMPDIR): preprocessing and a
  Ray Train run each start their own private Ray, say "Ray: local", and leave that cluster as it was (same
  nodes, same jobs, alive); `--address auto` joins it on purpose;
- the head killed with SIGKILL: the next `vggdist train` starts in its normal time, `--address auto` fails fast;
- a wrong `--address` or an http RAY_ADDRESS: exit 2 within seconds, one line, nothing written;
- the driver killed with SIGKILL after epoch 1 of a run started without --run-name: rerunning with the name from
  its log resumes it in the same MLflow run, every epoch logged once;
- a full filesystem under the checkpoints: one line, no restarts, no partial checkpoint, the run FAILED with the
  reason; once space is freed, the same command resumes.

The quick demo runs beside such a head in tests/test_demo.py (one demo run in the suite, not two).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import preprocess_faults as faults
from tests.ray_cluster import user_head
from tests.tiny_data import make_shards, write_image_folder
from vggdist import checkpoint as ckpt
from vggdist import checkpoint_store, tracking

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _train_args(data: Path, storage: Path, *extra: str, epochs: int = 1) -> list[str]:
    return [
        "-m", "vggdist.cli", "train", "--config", "A", "--preset", "mini", "--data", str(data),
        "--storage-path", str(storage), "--epochs", str(epochs), "--set", "optim.global_batch_size=32",
        "--set", "schedule.early_stop=false", "--set", "data.loader_workers=1", *extra,
    ]  # fmt: skip


def _first_line(p: subprocess.CompletedProcess) -> str:
    return next(line for line in p.stderr.splitlines() if line.strip())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("startup"))


# --------------------------------------------------------------------------- a running, then killed head


@pytest.fixture(scope="module")
def head():
    cluster, ray_tmpdir = user_head()
    try:
        yield {"cluster": cluster, "ray_tmpdir": ray_tmpdir, "timings": {}}
    finally:
        cluster.stop()


def test_with_a_head_running_every_command_uses_its_own_local_ray(head, data, tmp_path):
    c = head["cluster"]
    env = _env(tmp_path, RAY_TMPDIR=head["ray_tmpdir"])
    before = c.gcs_state()

    images = tmp_path / "images"
    write_image_folder(images, per_class=6, seed=3)
    out = tmp_path / "shards" / "train"
    p = _run(["-m", "preprocess", "shard", "--source", str(images), "--split", "train", "--out", str(out),
              "--workers", "2", "--no-progress"], env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert _first_line(p) == "Ray: local, 2 CPUs" and (out / "manifest.json").exists()

    t0 = time.monotonic()
    p = _run(
        _train_args(data, tmp_path / "ray", "--set", "run.local_mode=false", "--run-name", "beside"), env
    )
    head["timings"]["train"] = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert _first_line(p).startswith("Ray: local, ")
    assert "Connecting to existing Ray cluster" not in p.stderr
    # Ray Train's placement-group cleaner finds this Ray's dashboard, not "multiple active Ray instances"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    run = tracking.find_runs("vggdist", uri=env["MLFLOW_TRACKING_URI"])[0]
    assert run["status"] == "FINISHED" and run["tags"]["vggdist.ray"].startswith("local, ")

    assert c.gcs_state() == before  # the same live nodes, no job of ours: untouched, and alive

    # on purpose: --address auto is the cluster recorded on this machine
    p = _run(["-m", "preprocess", "shard", "--source", str(images), "--split", "train",
              "--out", str(tmp_path / "on-head"), "--workers", "1", "--address", "auto", "--no-progress"], env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.fullmatch(rf"Ray: cluster at [\d.]+:{c.port}, 1 node, 1 CPU", _first_line(p)), p.stderr[-2000:]


def test_a_killed_head_does_not_stall_the_next_command(head, data, tmp_path):
    c = head["cluster"]
    env = _env(tmp_path, RAY_TMPDIR=head["ray_tmpdir"])
    c.kill()  # SIGKILL, as an OOM kill would: the record stays behind
    time.sleep(1)
    assert (Path(head["ray_tmpdir"]) / "ray" / "ray_current_cluster").exists()

    t0 = time.monotonic()
    p = _run(_train_args(data, tmp_path / "ray", "--set", "run.local_mode=false", "--run-name", "after"), env)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert _first_line(p).startswith("Ray: local, ") and "Failed to connect to GCS" not in p.stderr
    normal = head["timings"].get("train", 60.0)
    assert took < 1.5 * normal + 15, (took, normal)

    t0 = time.monotonic()
    p = _run(_train_args(data, tmp_path / "ray", "--address", "auto"), env)
    assert p.returncode == 2 and time.monotonic() - t0 < 30
    assert "recorded on this machine" in p.stderr and "probably stopped or killed" in p.stderr


# ------------------------------------------------------------------------------------------ wrong addresses


@pytest.mark.parametrize(
    "command, where",
    [
        ("train", "--address 127.0.0.1:1"),
        ("train", "RAY_ADDRESS=http://127.0.0.1:1"),
        ("sweep", "RAY_ADDRESS=http://127.0.0.1:1"),
        ("demo", "--address 127.0.0.1:1"),
    ],
)
def test_a_wrong_address_fails_fast_and_writes_nothing(data, tmp_path, command, where):
    storage, work = tmp_path / "storage", tmp_path / "work"
    args = {
        "train": _train_args(data, storage),
        "sweep": [
            "-m",
            "vggdist.cli",
            "sweep",
            "--data",
            str(data),
            "--plan",
            "mini",
            "--set",
            f"run.storage_path={storage}",
        ],  # fmt: skip
        "demo": ["-m", "vggdist.cli", "demo", "--quick", "--workdir", str(work)],
    }[command]
    env = _env(tmp_path)
    if where.startswith("--address"):
        args += where.split()
    else:
        env["RAY_ADDRESS"] = where.split("=", 1)[1]
    t0 = time.monotonic()
    p = _run(args, env, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    assert time.monotonic() - t0 < 30
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert ("ray job submit --address http" in lines[0]) == where.startswith("RAY_ADDRESS")
    assert not storage.exists() and not work.exists() and not (tmp_path / "mlflow.db").exists()


# -------------------------------------------------------------------------------------- resume by its name


def _epoch_logged(uri: str) -> bool:
    """Whether the (only) run has its first epoch's metrics in MLflow; False while its writer holds the lock."""
    try:
        runs = tracking.find_runs("vggdist", uri=uri)
        return bool(runs and tracking.metric_history(runs[0]["run_id"], "train/loss", uri=uri))
    except Exception:  # "database is locked" while the training process writes
        return False


def test_a_run_started_without_a_name_resumes_by_the_name_in_its_log(data, tmp_path):
    env = _env(tmp_path)
    uri = env["MLFLOW_TRACKING_URI"]
    # 25 steps an epoch: long enough that epochs 2-4 cannot end between two polls of the kill loop below
    args = _train_args(data, tmp_path / "ray", "--set", "schedule.samples_per_epoch=800", epochs=4)
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log_file:
        first = subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=log_file, stderr=log_file)
        name, deadline = None, time.monotonic() + 240
        try:
            while time.monotonic() < deadline and first.poll() is None:
                m = re.search(r"rerun it with --run-name (\S+)", log_path.read_text())
                name = name or (m.group(1) if m else None)
                if name and _epoch_logged(uri):
                    break  # epoch 1 is checkpointed and logged
                time.sleep(0.3)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    text = log_path.read_text()
    assert name and re.fullmatch(r"A-\d{8}-\d{6}", name), text[-3000:]
    assert first.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    again = _run([*args, "--run-name", name], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    runs = tracking.find_runs("vggdist", uri=uri)
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"
    assert runs[0]["params"]["run.run_name"] == name
    steps = [s for s, _ in tracking.metric_history(runs[0]["run_id"], "train/loss", uri=uri)]
    assert steps == [1, 2, 3, 4]  # every epoch once


# -------------------------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_fs(tmp_path):
    try:
        fs = faults.SmallFilesystem(tmp_path / "fs")
    except OSError as e:
        pytest.skip(str(e))
    yield fs
    fs.unmount()


def _checkpoint_bytes(tmp_path: Path) -> int:
    """The size of a mini VGG-A checkpoint (4 classes) with its optimiser state, written the way training does."""
    import torch

    from vggdist.config import preset
    from vggdist.train import build_model

    cfg = preset("mini", model="A")
    model = build_model(cfg, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    opt.step()
    return checkpoint_store.checkpoint_bytes(
        ckpt.save(tmp_path / "probe", model=model, config=cfg, optimizer=opt, train_state={"epoch": 1})
    )


@pytest.mark.parametrize("local_mode", ["false", "true"])
def test_a_full_storage_stops_in_one_line_without_retries_and_resumes_once_freed(
    data, tmp_path, small_fs, local_mode
):
    env = _env(tmp_path)
    uri = env["MLFLOW_TRACKING_URI"]
    need = _checkpoint_bytes(tmp_path)
    small_fs.leave_free(int(need * 1.5))  # room for epoch 1's checkpoint, not for epoch 2's
    storage = small_fs.path / "ray"
    args = _train_args(data, storage, "--set", f"run.local_mode={local_mode}", "--run-name", "full", epochs=3)
    verbose = local_mode == "true"
    p = _run([*args, "--verbose"] if verbose else args, env)

    assert p.returncode == 1, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("vggdist train: error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    last = errors[0]
    assert last.startswith("vggdist train: error: cannot write ") and "No space left on device" in last
    assert (
        "a checkpoint needs" in last
        and "rerun the same command with --run-name full to resume from epoch 1" in last
    )
    assert ("Traceback" in p.stderr) == verbose, p.stderr  # --verbose shows it; otherwise the one line is all
    assert "[FailurePolicy] RETRY" not in p.stderr and "restarting from the latest checkpoint" not in p.stderr
    assert [f.epoch for f in checkpoint_store.whole_checkpoints(str(storage / "full"))] == [1]
    assert not (storage / "full" / "epoch_002").exists()  # the partial copy was removed
    run = tracking.find_runs("vggdist", uri=uri)[0]
    assert run["status"] == "FAILED" and "No space left on device" in run["tags"]["vggdist.failure"]

    small_fs.free_space()
    again = _run(args, env)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = tracking.find_runs("vggdist", uri=uri)
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"
    assert [s for s, _ in tracking.metric_history(runs[0]["run_id"], "train/loss", uri=uri)] == [1, 2, 3]
