"""Gradient communication for data-parallel SGD: DDP communication hooks chosen by `run.grad_compression`.

VGG-16 moves 553 MB of fp32 gradients per step, 411 MB of them fc6's. Options:
- ``none``: DDP's fp32 all-reduce.
- ``bf16``: gradients cast to bfloat16 for the all-reduce and back (half the bytes; bf16 keeps fp32's exponent
  range, so no loss scaling is needed).
- ``powersgd``: PowerSGD (Vogels et al., 2019) rank-r approximation of each matrix-shaped gradient with error
  feedback; plain all-reduce for the first ``start_iter`` steps, then roughly (rows + cols)·r numbers per matrix
  instead of rows·cols. Vectors (biases) stay uncompressed.

On gloo (CPU training) torch's PowerSGD hook waits inside a future callback, which runs on one of gloo's two
worker threads: with two or more DDP buckets the step deadlocks. `ddp_kwargs` therefore asks DDP for a single
bucket in that case (NCCL is unaffected and keeps DDP's default 25 MB buckets, which overlap communication).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

GRAD_COMPRESSION = ("none", "bf16", "powersgd")


def ddp_kwargs(kind: str, backend: str | None) -> dict:
    """Extra DistributedDataParallel arguments the compression `kind` needs on `backend` (see module docstring)."""
    kwargs: dict = {"gradient_as_bucket_view": True}
    if kind == "powersgd" and backend == "gloo":
        kwargs["bucket_cap_mb"] = 1 << 16  # one bucket: avoids the gloo callback-thread deadlock
    return kwargs


def register_comm_hook(
    model: nn.Module, kind: str, *, powersgd_rank: int = 4, powersgd_start_iter: int = 10
) -> object | None:
    """Install the hook of `kind` on a DistributedDataParallel `model`; returns the hook state (None for none/bf16).

    A model that is not DDP (one worker) is left alone: there is nothing to communicate.
    """
    if kind not in GRAD_COMPRESSION:
        raise ValueError(f"grad compression {kind!r}: use one of {', '.join(GRAD_COMPRESSION)}")
    if kind == "none" or not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    if kind == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
        return None
    state = powerSGD_hook.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=powersgd_rank,
        start_powerSGD_iter=max(2, powersgd_start_iter),  # torch requires >= 2 with error feedback
        use_error_feedback=True,
        warm_start=True,
    )
    model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return state
