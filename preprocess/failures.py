"""What can stop a shard job, what each failure means for the user, and which ones are worth a retry.

Exit codes of ``vggdist-preprocess shard`` (`preprocess.cli`):

- **2** :class:`JobError` — the command cannot run as given (a missing source, bad limits, an unreachable
  Ray address, an ``--out`` holding something else). Raised before anything is written.
- **1** :class:`JobFailed` — the job ran and could not finish; one line says what and how to go on, and a
  rerun of the same command resumes (finished shards are kept). Its kinds:

  - :class:`InputUnavailable`: reading an input failed for a reason that is not its content (an I/O error of
    the source storage, memory exhausted). The shard task is retried with backoff (:class:`RetryPolicy`) when
    the error is one a retry can fix (:data:`TRANSIENT_ERRNOS`, ``MemoryError``); if it persists the job stops,
    no image is written off as a reject, and the shard is not marked done.
  - :class:`OutputError`: writing ``--out`` failed (no space, read-only, permission denied, quota). Never
    retried: it fails the same way until someone frees space or fixes the mount.
  - :class:`OutNotShared` (and missing shards at the end): ``--out`` is not the same directory on every node.
  - anything else is an internal error: its traceback is printed, exit 1.

Rejects (``rejects.jsonl``) are only for content problems: undecodable, truncated, too many pixels, aspect
ratio, unsupported format, too large, not a regular file.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

# Source-read errors that say the storage hiccuped, not that the file is bad: worth another try.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ESTALE,  # an NFS file handle that vanished (server restart, failover)
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ENOMEM,
        errno.EBUSY,
        errno.EINTR,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ENOTCONN,  # a FUSE mount (s3fs, gcsfuse) whose daemon went away
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENOLINK,
        errno.EREMOTEIO,
    }
)

# Errors writing --out that no retry fixes; each gets a message naming the fix.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
OUTPUT_ERRNOS = _NO_SPACE | _NOT_WRITABLE | {errno.EIO, errno.ESTALE}


class JobError(Exception):
    """A shard command that cannot run as given (exit code 2); the message names the fix."""


class JobFailed(Exception):
    """The job ran and could not finish (exit code 1): a one-line message; a rerun of the same command resumes."""


def errno_name(code: int | None) -> str:
    return errno.errorcode.get(code, str(code)) if code is not None else "no errno"


class InputUnavailable(JobFailed):
    """Reading (or holding in memory) one input failed for a reason that is not its content."""

    def __init__(self, source: str, code: int | None, detail: str, shard: str = "") -> None:
        super().__init__(source, code, detail, shard)
        self.source, self.errno, self.detail, self.shard = source, code, detail, shard

    @classmethod
    def from_error(cls, source: str, e: BaseException, shard: str = "") -> InputUnavailable:
        if isinstance(e, MemoryError):
            return cls(source, errno.ENOMEM, "MemoryError while reading or decoding it", shard)
        code = getattr(e, "errno", None)
        return cls(source, code, getattr(e, "strerror", None) or str(e), shard)

    @property
    def retryable(self) -> bool:
        return self.errno in TRANSIENT_ERRNOS

    def __str__(self) -> str:
        return f"{self.source}: {errno_name(self.errno)} ({self.detail})"


class ShardsFailed(JobFailed):
    """Shards whose inputs could not be read, after their retries: nothing of them is marked done."""

    def __init__(self, failures: list[tuple[InputUnavailable, int]]) -> None:
        super().__init__(failures)
        self.failures = failures  # (the last error of a shard, attempts made)

    def __str__(self) -> str:
        shown = "; ".join(
            f"{e} in shard {e.shard} after {n} attempt{'s' * (n > 1)}" for e, n in self.failures[:5]
        )
        more = f" (and {len(self.failures) - 5} more shards)" if len(self.failures) > 5 else ""
        return (
            f"reading the source failed: {shown}{more}. These are not rejects: no image was written off and "
            "those shards are not marked done; fix the source storage and rerun the same command to resume"
        )


class OutputError(JobFailed):
    """Writing ``--out`` failed in a way no retry fixes (no space, read-only, permission denied).

    ``written`` / ``inputs_done`` (what the failing shard had written when it failed) and the plan's
    :meth:`with_estimate` let the message say roughly how much space the job still needs.
    """

    def __init__(
        self,
        path: str,
        code: int | None,
        strerror: str,
        shard: str = "",
        written: int = 0,
        inputs_done: int = 0,
        estimate: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__(path, code, strerror, shard, written, inputs_done, estimate)
        self.path, self.errno, self.strerror, self.shard = path, code, strerror, shard
        self.written, self.inputs_done, self.estimate = written, inputs_done, estimate

    @classmethod
    def from_oserror(cls, e: OSError, path: str | os.PathLike, **kw) -> OutputError:
        return cls(str(e.filename or path), e.errno, e.strerror or str(e), **kw)

    def with_estimate(self, shard_bytes: int, remaining_bytes: int, free_bytes: int) -> OutputError:
        """A copy that also says the failing shard's size, the rest of the plan's, and the free space (bytes)."""
        return OutputError(
            self.path,
            self.errno,
            self.strerror,
            self.shard,
            self.written,
            self.inputs_done,
            (shard_bytes, remaining_bytes, free_bytes),
        )

    def __str__(self) -> str:
        what = f"{self.strerror} ({errno_name(self.errno)}) writing {self.path}"
        if self.shard:
            what += f" (shard {self.shard})"
        resume = "rerun the same command to resume (finished shards are kept, the partial one is redone)"
        if self.errno in _NO_SPACE:
            need = ""
            if self.estimate is not None:
                shard_bytes, remaining, free = self.estimate
                need = (
                    f"; {_size(free)} free there, and the job needs about {_size(remaining)} more "
                    f"(this shard about {_size(shard_bytes)})"
                )
            return f"{what}{need}: free space (or move --out to a larger filesystem) and {resume}"
        if self.errno in _NOT_WRITABLE:
            return f"{what}: --out must be writable by this user (on every node); fix that and {resume}"
        return f"{what}: {resume} once --out is healthy"


SHARED_OUT = (
    "--out must be shared storage that every Ray node sees at the same path (NFS, EFS, a parallel "
    "filesystem); rerun with such an --out"
)


class OutNotShared(JobFailed):
    """A shard task found no ``--out`` where it ran: a node that does not share the driver's ``--out``."""

    def __init__(self, out: str, node: str) -> None:
        super().__init__(out, node)
        self.out, self.node = out, node

    def __str__(self) -> str:
        return f"{self.out} does not exist on node {self.node}, where a shard task ran: {SHARED_OUT}"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def is_output_error(e: OSError) -> bool:
    return e.errno in OUTPUT_ERRNOS


@dataclass(frozen=True)
class RetryPolicy:
    """How often a shard is tried in all when its inputs hit :data:`TRANSIENT_ERRNOS` or ``MemoryError``, and
    the wait before each new try: ``backoff_s``, doubling, at most ``max_backoff_s`` (default: 5 tries over
    about 30 s, enough for an NFS failover or a FUSE remount)."""

    attempts: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be ≥ 1, got {self.attempts}")

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failure (1, 2, …)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failed_attempts - 1))
