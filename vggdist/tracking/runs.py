"""Experiments and runs in MLflow: finding or creating an experiment (its artifact location and kind), creating,
looking up and checking a run, the UI's page of an experiment's runs, and the dataset inputs a run reads.

These calls run under the short lifecycle HTTP policy of `client`: a command that cannot reach MLflow fails
within seconds, before anything has run, so nothing is lost.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, RunStatus
from mlflow.exceptions import MlflowException

from vggdist.runmeta import TAG_PARENT_RUN_ID
from vggdist.tracking.client import NO_SUCH_RUN, client, lifecycle_call, require_store

log = logging.getLogger(__name__)

# The experiment tag the MLflow UI reads for the kind of an experiment (its "Custom model development" choice)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store: <dir of mlflow.db>/mlartifacts/<experiment>


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite store, under ``<its directory>/mlartifacts/
    <experiment>`` (MLflow's own default is ``./mlruns`` in whatever directory the command ran from); None for
    a server, whose ``--artifacts-destination`` decides."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (db.parent / ARTIFACTS_DIR / safe).resolve().as_uri()


def runs_page(base_url: str, experiment_id: str) -> str:
    """The MLflow UI's page of an experiment's training runs. The 3.x UI opens ``#/experiments/<id>`` in the
    view of its global workflow switch (GenAI, with traces, unless this browser chose "Machine learning"
    before) and ignores the experiment's kind tag while that switch is shown; the ``workflowType`` query
    parameter sets the switch, and ``/runs`` names the page."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def experiment_id(c: mlflow.MlflowClient, name: str, *, create: bool) -> str | None:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if create and exp.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore "
                f"--experiment-id {exp.experiment_id}`) or choose another --experiment"
            )
        return exp.experiment_id
    if not create:
        return None
    try:
        return c.create_experiment(
            name,
            artifact_location=artifact_location(c.tracking_uri, name),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except MlflowException as e:  # another process created it first
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(name).experiment_id


def existing_run(c: mlflow.MlflowClient, run_id: str, uri: str):
    require_store(uri, f"no MLflow run {run_id!r}")
    try:
        return c.get_run(run_id)
    except MlflowException as e:
        if e.error_code in NO_SUCH_RUN:
            raise ValueError(
                f"no MLflow run {run_id!r} in {uri}; check the run id in the MLflow UI"
            ) from None
        raise


def create_run(
    experiment: str, *, run_name: str | None, tags: Mapping[str, str], uri: str
) -> tuple[str, str, str]:
    """Create a run (and the experiment if missing); (run id, run name, experiment id). Raises
    ConnectionError within seconds when MLflow cannot be reached: nothing has run yet, so nothing is lost."""
    c = client(uri)
    with lifecycle_call(uri):
        exp_id = experiment_id(c, experiment, create=True)
        run = c.create_run(exp_id, tags=dict(tags), run_name=run_name)
    log.info("MLflow run %s (%s) in experiment %r at %s", run.info.run_id, run.info.run_name, experiment, uri)
    return run.info.run_id, run.info.run_name, exp_id


DATASET_DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a dataset digest; the full hash is a tag


def log_datasets(run_id: str, datasets: Sequence[Mapping[str, Any]], uri: str) -> None:
    """Record the shards a run reads as MLflow dataset inputs (the UI's Dataset column and lineage).

    Each mapping: ``name``, ``digest`` (the manifest's sha256, shortened), ``source`` (the shard directory),
    ``num_samples``, ``context`` ("training" or "validation"). Called once, when the run is created (MLflow must
    be reachable then anyway); a resumed run has them already."""
    inputs = [
        DatasetInput(
            Dataset(
                name=d["name"],
                digest=str(d["digest"])[:DATASET_DIGEST_CHARS],
                source_type="local",
                source=json.dumps({"uri": str(d["source"])}),
                profile=json.dumps({"num_samples": int(d["num_samples"])}),
            ),
            tags=[InputTag("mlflow.data.context", d["context"])],
        )
        for d in datasets
    ]
    with lifecycle_call(uri):
        for attempt in range(3):
            try:
                client(uri).log_inputs(run_id, datasets=inputs)
                return
            except MlflowException as e:
                # Two runs that start together (a sweep's concurrent stages) may both insert the same dataset
                # row into a SQL store: the loser's insert fails on the unique key, and a retry finds the row.
                if "UNIQUE constraint" not in str(e) and "duplicate key" not in str(e):
                    raise
                if attempt == 2:
                    log.warning("run %s: its dataset inputs were not logged (%s); lineage only", run_id, e)
                    return
                time.sleep(0.5 * (attempt + 1))


def lookup_run(run_id: str, uri: str) -> tuple[str, dict[str, str]]:
    """(experiment id, params) of an existing run; ValueError if there is none, ConnectionError if unreachable."""
    with lifecycle_call(uri):
        run = existing_run(client(uri), run_id, uri)
    return run.info.experiment_id, dict(run.data.params)


def parent_tags(tags: Mapping[str, Any] | None, parent_run_id: str | None) -> dict[str, str]:
    out = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        out[TAG_PARENT_RUN_ID] = parent_run_id
    return out


def check_status(status: str) -> str:
    RunStatus.from_string(status)  # raises on a typo
    return status
