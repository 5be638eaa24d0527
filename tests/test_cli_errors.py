"""`vggdist` exit codes on bad input: a run or sweep id looked up in a tracking store that does not exist writes
nothing (no ./mlflow.db) and names MLFLOW_TRACKING_URI; evaluate's error names --run; only vggdist's own input
checks are usage errors (exit 2, one line), a ValueError from inside a library is an internal error (exit 1,
traceback)."""

from __future__ import annotations

import json

import pytest

from vggdist import cli, tracking


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def data(tmp_path_factory):
    """A val split's manifest: the run id is refused before any shard is read."""
    d = tmp_path_factory.mktemp("data")
    shard = {"name": "val-000000.tar", "samples": 1}
    (d / "manifest.json").write_text(json.dumps({"split": "val", "num_samples": 1, "shards": [shard]}))
    return str(d)


def test_evaluate_with_a_bad_run_id_writes_no_store_and_names_run(empty_cwd, data, capsys):
    assert cli.main(["evaluate", "--run", "0123abcd", "--data", data]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vggdist evaluate: error: --run 0123abcd: there is no MLflow tracking store at sqlite:")
    assert "MLFLOW_TRACKING_URI" in err and "--init-from" not in err and len(err.splitlines()) == 1
    assert list(empty_cwd.iterdir()) == []  # no mlflow.db, nothing else


def test_a_malformed_run_id_names_run(empty_cwd, data, capsys):
    assert cli.main(["evaluate", "--run", "not/a/run", "--data", data]) == 2
    err = capsys.readouterr().err
    assert "pass --run <run id>" in err and "--init-from" not in err
    assert list(empty_cwd.iterdir()) == []


def test_report_with_a_bad_sweep_id_writes_no_store(empty_cwd, capsys):
    assert cli.main(["report", "--sweep", "0123abcd", "--out", str(empty_cwd / "r")]) == 2
    err = capsys.readouterr().err
    assert "--sweep 0123abcd: there is no MLflow tracking store" in err and "MLFLOW_TRACKING_URI" in err
    assert list(empty_cwd.iterdir()) == []
    assert cli.main(["report", "--out", str(empty_cwd / "r")]) == 2  # no sweep to find: still nothing written
    assert "no sweep" in capsys.readouterr().err and list(empty_cwd.iterdir()) == []


def test_a_value_error_inside_a_library_is_internal(empty_cwd, data, capsys, monkeypatch):
    import numpy as np

    def broken(*_a, **_k):
        np.zeros(3).reshape(2, 2)  # numpy raises ValueError: a bug, not the user's input

    monkeypatch.setattr(tracking, "resolve_checkpoint", broken)
    assert cli.main(["evaluate", "--run", "0123abcd", "--data", data]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "cannot reshape" in err
