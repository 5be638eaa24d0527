"""Reading runs back from MLflow, as plain dicts and lists, for `vggdist evaluate`, `sweep` and `report`.

These call MLflow directly with its default HTTP policy (they serve a command that needs the answer now), and so
do the two writes `vggdist report` makes outside any run's storage (`upload_artifacts`).
"""

from __future__ import annotations

import os
import re
from typing import Any

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from vggdist.runmeta import DEFAULT_EXPERIMENT, TAG_CHECKPOINT, TAG_PARENT_RUN_ID
from vggdist.tracking.client import NO_SUCH_RUN, client, require_store, store_missing, tracking_uri
from vggdist.tracking.runs import existing_run, experiment_id


def _run_dict(run) -> dict[str, Any]:
    info, data = run.info, run.data
    return {
        "run_id": info.run_id,
        "name": info.run_name,
        "status": info.status,
        "params": dict(data.params),
        "tags": dict(data.tags),
        "metrics": dict(data.metrics),
        "experiment_id": info.experiment_id,
        "artifact_uri": info.artifact_uri,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "parent_run_id": data.tags.get(TAG_PARENT_RUN_ID),
    }


def get_run(run_id: str, uri: str | None = None) -> dict[str, Any]:
    """One run as a dict: run_id, name, status, params, tags, metrics (latest values), experiment_id,
    artifact_uri, start_time / end_time (ms since the epoch), parent_run_id."""
    uri = uri or tracking_uri()
    return _run_dict(existing_run(client(uri), run_id, uri))


def find_runs(
    experiment: str = DEFAULT_EXPERIMENT, *, filter_string: str = "", uri: str | None = None
) -> list[dict[str, Any]]:
    """Every active (not deleted) run of `experiment` matching `filter_string`, oldest first, as
    `get_run` dicts; [] when the experiment (or the local store) does not exist, which stays so: nothing is
    created. E.g. filter_string="tags.`vggdist.stage` = '1'"."""
    if store_missing(uri or tracking_uri()):
        return []
    c = client(uri)
    exp_id = experiment_id(c, experiment, create=False)
    if exp_id is None:
        return []
    runs, token = [], None
    while True:
        page = c.search_runs(
            [exp_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(_run_dict(r) for r in page)
        token = page.token
        if not token:
            return runs


def experiment_name(experiment_id: str, uri: str | None = None) -> str:
    return client(uri).get_experiment(experiment_id).name


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """[(step, value)] sorted by step; where a step was logged twice (a resumed run repeating an epoch),
    the value logged last wins."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client(uri).get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(step, latest[step][1]) for step in sorted(latest)]


def metric_rows(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float, int]]:
    """Every stored row of a metric as (step, value, timestamp ms), in storage order: duplicates show here."""
    return [(m.step, m.value, m.timestamp) for m in client(uri).get_metric_history(run_id, key)]


def list_artifacts(run_id: str, path: str | None = None, uri: str | None = None) -> list[str]:
    """Paths of the artifacts directly under `path` (the run's root by default)."""
    return [f.path for f in client(uri).list_artifacts(run_id, path)]


def download_artifact(run_id: str, path: str, dst_dir: str | os.PathLike, uri: str | None = None) -> str:
    """Download artifact `path` (file or directory) of a run into dst_dir; returns the local path."""
    os.makedirs(dst_dir, exist_ok=True)
    return client(uri).download_artifacts(run_id, path, os.fspath(dst_dir))


def upload_artifacts(
    run_id: str, paths: list[str | os.PathLike], artifact_path: str | None = None, uri: str | None = None
) -> None:
    """Upload local files to a run now (raises if MLflow cannot take them)."""
    c = client(uri)
    for p in paths:
        c.log_artifact(run_id, os.fspath(p), artifact_path)


def resolve_checkpoint(run_or_path: str, uri: str | None = None, flag: str = "--init-from") -> str:
    """An existing local path or a URI (s3://, file://, ...) is returned as is; otherwise `run_or_path` is
    an MLflow run id and its TAG_CHECKPOINT (the latest checkpoint location) is returned. Errors name `flag`,
    the command-line option the value came from; a missing local store is not created (MissingStore)."""
    if os.path.exists(run_or_path) or "://" in run_or_path:
        return run_or_path
    uri = uri or tracking_uri()
    hint = f"pass {flag} <run id> from the MLflow UI or a checkpoint directory"
    if not re.fullmatch(r"[0-9a-zA-Z_-]{1,64}", run_or_path):
        raise ValueError(f"{run_or_path!r} is neither a checkpoint path nor a run id in {uri}; {hint}")
    require_store(uri, f"{flag} {run_or_path}")
    try:
        run = client(uri).get_run(run_or_path)
    except MlflowException as e:
        if e.error_code in NO_SUCH_RUN:
            raise ValueError(
                f"{run_or_path!r} is neither a checkpoint path nor a run id in {uri}; {hint}"
            ) from None
        raise
    location = run.data.tags.get(TAG_CHECKPOINT)
    if not location:
        raise ValueError(
            f"MLflow run {run_or_path} ({run.info.run_name}, {run.info.status}) has no {TAG_CHECKPOINT} tag: "
            f"it saved no checkpoint yet; {hint}"
        )
    return location
