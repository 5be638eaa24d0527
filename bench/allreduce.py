"""Gradient communication per data-parallel step: bytes all-reduced and step time for none / bf16 / powersgd.

What runs: two processes on one host (gloo over 127.0.0.1, one CPU thread each), each holding a DDP-wrapped
model whose gradients have VGG-16's shapes, with the hook of each ``--grad-compression`` option installed by
`vggdist.comm.register_comm_hook` (``none`` installs DDP's plain fp32 all-reduce hook, the same collective
DDP runs without a hook, so that its bytes can be counted too). PowerSGD: rank 4, start iteration 2, error
feedback on; the warm-up steps cover its two uncompressed iterations, so every timed step is compressed.

- **bytes/step**: measured, not derived: ``torch.distributed.all_reduce`` is wrapped in each worker and every
  tensor the hooks hand to it is counted (numel × element size), per step and per worker. This is the
  payload of the all-reduce; a ring all-reduce over n workers moves 2(n-1)/n times it per worker.
- **step time**: backward + communication, median over the timed steps (DDP's backward returns only after
  every bucket's all-reduce and decompression). The forward is a cheap stand-in for the conv compute: the
  loss is ½·Σ‖p‖² over all parameters, so each gradient is the parameter itself (Gaussian init: full-rank
  matrices, the hard case for PowerSGD) and nothing of size batch × activations is computed.

Sizes: default, the paper's VGG-16 (``build_vgg("D", 1000)``, 138M parameters, 553 MB of fp32 gradients);
``--quick``, VGG-16 built at crop 96 (54.5M parameters, 218 MB): all 16 layers at the paper's shapes except
fc6's input (512·3·3 instead of 512·7·7), because with fc6 at full size each worker peaks at ~3.3 GB (weights,
DDP bucket, PowerSGD's error-feedback buffer and its copy of the bucket); ``--smoke``, a tiny model for the
tests (seconds).

How to read: ratio = baseline / ours (bytes and seconds are costs), baseline = none. What to expect:
bf16 halves the bytes (ratio 2.0); PowerSGD sends about 1/100 of them or less (ratio ≥ 100). On one CPU host the
"network" is loopback memory copies, so step-time ratios are far below the byte ratios; across nodes, where
the link is the bottleneck, step time follows the bytes.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, Timer, parser, report  # noqa: E402
from vggdist.comm import GRAD_COMPRESSION, register_comm_hook  # noqa: E402
from vggdist.models import build_vgg  # noqa: E402
from vggdist.paper import SCALES  # noqa: E402

WORLD_SIZE = 2
POWERSGD_RANK = 4
POWERSGD_START_ITER = 2
# All gradients in one DDP bucket. torch's PowerSGD hook blocks inside a future callback (`.wait()` on the P
# all-reduce) and gloo runs callbacks on its two worker threads: with two buckets in flight both threads block
# and the step deadlocks (seen here with the default 25 MB buckets). One bucket is fair to all three options
# since the fake loss leaves no backward compute for communication to overlap with.
ONE_BUCKET_MB = 4096


class _HalfSquaredNorm(torch.autograd.Function):
    """½‖p‖² whose gradient is p itself: returned without allocating, DDP adds it into its bucket view."""

    @staticmethod
    def forward(ctx, p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p)
        flat = p.detach().reshape(-1)
        return 0.5 * torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        return p if float(grad) == 1.0 else p * grad


class _FakeLoss(nn.Module):
    """Wraps a network so that DDP's forward yields ½·Σ‖p‖² instead of running the convolutions."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self) -> torch.Tensor:
        return sum(_HalfSquaredNorm.apply(p) for p in self.net.parameters())


def build_net(size: str) -> nn.Module:
    """The model whose gradients are communicated: "full" (VGG-16), "quick" (at crop 96), "smoke" (mini)."""
    if size == "full":
        return build_vgg("D", 1000)
    if size == "quick":
        # VGG-16 itself at crop 96: every layer has the paper's shape except fc6, which sees a 3×3 instead
        # of a 7×7 map (18.9M instead of 102.8M weights), to keep two workers at ~1.3 GB each.
        return build_vgg("D", 1000, crop_size=96)
    if size == "smoke":
        return build_vgg("D", 100, **SCALES["mini"])  # VGG-16 at the mini widths
    raise ValueError(f"unknown size {size!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_option(net: nn.Module, kind: str, warmup: int, steps: int, counter: list[int]) -> dict:
    model = nn.parallel.DistributedDataParallel(
        _FakeLoss(net), init_sync=False, gradient_as_bucket_view=True, bucket_cap_mb=ONE_BUCKET_MB
    )
    if kind == "none":
        model.register_comm_hook(None, default_hooks.allreduce_hook)  # = DDP's built-in fp32 all-reduce
    else:
        register_comm_hook(model, kind, powersgd_rank=POWERSGD_RANK, powersgd_start_iter=POWERSGD_START_ITER)
    times, sent = [], []
    for step in range(warmup + steps):
        for p in net.parameters():
            if p.grad is not None:
                p.grad.zero_()
        dist.barrier()
        counter[0] = 0
        with Timer() as t:
            model().backward()
        if step >= warmup:
            times.append(t.seconds)
            sent.append(counter[0])
    assert len(set(sent)) == 1, f"{kind}: bytes differ between timed steps: {sent}"
    del model
    for p in net.parameters():
        p.grad = None
    gc.collect()
    return dict(bytes_per_step=sent[0], step_s=statistics.median(times))


def _worker(rank: int, port: int, size: str, warmup: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two workers share two cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    counter = [0]
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counter[0] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # the hooks look it up on torch.distributed at call time
    try:
        torch.manual_seed(0)
        net = build_net(size)
        results = {kind: _run_option(net, kind, warmup, steps, counter) for kind in GRAD_COMPRESSION}
        results["params"] = sum(p.numel() for p in net.parameters())
        results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # the step time of a synchronous step is the slowest worker's
        gathered: list[dict | None] = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, results)
        if rank == 0:
            merged = dict(gathered[0])
            for kind in GRAD_COMPRESSION:
                merged[kind]["step_s"] = max(g[kind]["step_s"] for g in gathered)
            merged["peak_rss_mb"] = max(g["peak_rss_mb"] for g in gathered)
            Path(out).write_text(json.dumps(merged))
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()
    # gloo's worker threads can abort interpreter teardown ("terminate called without an active exception"),
    # which a spawned worker reports as SIGABRT after its work is done: leave without the teardown
    os._exit(0)


def measure(size: str, warmup: int, steps: int) -> dict:
    """Spawn the two workers, return {kind: {"bytes_per_step", "step_s"}, "params", "peak_rss_mb"}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(_free_port(), size, warmup, steps, out), nprocs=WORLD_SIZE, join=True)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> list[Row]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model for the tests (seconds)")
    args = p.parse_args(argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    warmup = POWERSGD_START_ITER + 1  # PowerSGD's uncompressed iterations + its first compressed one
    steps = 3 if args.quick or args.smoke else 10
    r = measure(size, warmup, steps)
    mb = 1e-6
    none = r["none"]
    rows = []
    for kind in ("bf16", "powersgd"):
        rows.append(
            Row(
                f"bytes/step none vs {kind}",
                "MB",
                none["bytes_per_step"] * mb,
                r[kind]["bytes_per_step"] * mb,
                higher_is_better=False,
            )
        )
    for kind in ("bf16", "powersgd"):
        rows.append(
            Row(
                f"step time none vs {kind}",
                "s",
                none["step_s"],
                r[kind]["step_s"],
                higher_is_better=False,
            )
        )
    notes = [
        f"model: {size} ({r['params'] / 1e6:.1f}M parameters), {WORLD_SIZE} gloo workers on 127.0.0.1, "
        f"{warmup} warm-up + {steps} timed steps; peak RSS {r['peak_rss_mb']:.0f} MB per worker",
        "bytes: counted at torch.distributed.all_reduce per worker per step (payload, not wire bytes)",
        "step: backward + communication of a fake loss 1/2*sum|p|^2 (gradient = weights), no conv compute",
        f"powersgd: rank {POWERSGD_RANK}, start iter {POWERSGD_START_ITER}, error feedback, warm start",
    ]
    report("Gradient all-reduce per step (2 gloo workers)", rows, args.json, notes)
    return rows


if __name__ == "__main__":
    main()
