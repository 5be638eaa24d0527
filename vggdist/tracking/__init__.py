"""MLflow tracking for vggdist: the only package that imports mlflow.

Every logging call of a run goes first to a durable, ordered spool in the run's storage directory and is
replayed to MLflow by a background sender, so training never waits for MLflow and an outage loses nothing:

- `spool`, `fileops`: the append-only spool (local or shared filesystem, or an object store via pyarrow.fs);
- `sender`: the replay, in order, acknowledged call by call, idempotent after a crash (no mlflow import);
- `client`: where MLflow is (tracking URI, local stores) and how it is called (HTTP policy, error gists);
- `runs`: experiments and runs: creating, looking up, the runs page, the dataset inputs a run reads;
- `sink`: the MLflow calls the sender replays a spool into, and ending a run directly;
- `tracker`: `Tracker` / `NullTracker`, the logger rank 0 and the drivers hold;
- `sync`: `vggdist sync` and the automatic replay at the start of train / sweep / evaluate;
- `readback`: runs, metric histories and artifacts as plain dicts for evaluate, sweep and report;
- `system_metrics`: CPU, memory and GPU samples of the training process, logged as ``system/*`` metrics.

Names of tags and metrics live in `vggdist.runmeta` and are re-exported here.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from vggdist.runmeta import (  # noqa: E402, F401 - re-exported: tracking.TAG_CONFIG etc. stay valid
    DEFAULT_EXPERIMENT,
    PROTOCOLS,
    TAG_CHECKPOINT,
    TAG_CODE_VERSION,
    TAG_CONFIG,
    TAG_INIT_FROM,
    TAG_INIT_MAPPING,
    TAG_MANIFEST,
    TAG_PARENT_RUN_ID,
    TAG_STAGE,
    code_version,
    eval_metric_name,
    flatten,
    manifest_hash,
    markdown_table,
    parse_eval_metric_name,
)
from vggdist.tracking.client import (  # noqa: E402
    check_reachable,
    check_uri_for_cluster,
    is_local_uri,
    require_store,
    store_missing,
    tracking_uri,
    wait_reachable,
)
from vggdist.tracking.readback import (  # noqa: E402
    download_artifact,
    experiment_name,
    find_runs,
    get_run,
    list_artifacts,
    metric_history,
    metric_rows,
    resolve_checkpoint,
    upload_artifacts,
)
from vggdist.tracking.runs import log_datasets, runs_page  # noqa: E402
from vggdist.tracking.sink import end_run_now  # noqa: E402
from vggdist.tracking.spool import SPOOL_DIR, existing_spool, spool_dir  # noqa: E402
from vggdist.tracking.sync import SyncResult, find_spools, replay_pending, sync  # noqa: E402
from vggdist.tracking.system_metrics import SystemMetrics  # noqa: E402
from vggdist.tracking.tracker import DEFAULT_WAIT_S, NullTracker, Tracker, log_eval_table  # noqa: E402

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_WAIT_S",
    "PROTOCOLS",
    "SPOOL_DIR",
    "TAG_CHECKPOINT",
    "TAG_CODE_VERSION",
    "TAG_CONFIG",
    "TAG_INIT_FROM",
    "TAG_INIT_MAPPING",
    "TAG_MANIFEST",
    "TAG_PARENT_RUN_ID",
    "TAG_STAGE",
    "NullTracker",
    "SyncResult",
    "SystemMetrics",
    "Tracker",
    "check_reachable",
    "check_uri_for_cluster",
    "end_run_now",
    "log_datasets",
    "runs_page",
    "code_version",
    "download_artifact",
    "eval_metric_name",
    "existing_spool",
    "experiment_name",
    "find_runs",
    "find_spools",
    "flatten",
    "get_run",
    "is_local_uri",
    "list_artifacts",
    "log_eval_table",
    "manifest_hash",
    "markdown_table",
    "metric_history",
    "metric_rows",
    "parse_eval_metric_name",
    "replay_pending",
    "require_store",
    "resolve_checkpoint",
    "store_missing",
    "spool_dir",
    "sync",
    "tracking_uri",
    "upload_artifacts",
    "wait_reachable",
]
