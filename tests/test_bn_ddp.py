"""Batch norm under DDP with 2 real gloo workers, as `vggdist.ray_train` wraps a plain or residual net.

Per-worker BN (the default, `run.sync_bn` off, as He et al. per GPU): in training each worker normalises with
its own share of the batch and updates its running statistics from that share; DDP broadcasts rank 0's buffers
at every forward, so the workers agree again before the next step and the checkpoint (rank 0's) holds them. In
eval mode the running statistics are used and every worker scores with the same ones, whatever its images.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from vggdist.comm import ddp_kwargs
from vggdist.resnet import build_resnet

WIDTHS = (4, 8, 16)


def _batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(6, 3, 32, 32, generator=g) + 2.0 * rank  # the workers' shares differ in mean


def _bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def _worker(rank: int, world: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_resnet("resnet-20", 4, widths=WIDTHS)
        ddp = DistributedDataParallel(model, **ddp_kwargs("none", "gloo"))
        ddp.train()
        ddp(_batch(rank)).sum().backward()  # one training forward on this worker's share
        after_train = _bn_buffers(model)
        ddp.eval()
        with torch.no_grad():
            scores = ddp(_batch(0))  # both workers score the same images in eval mode
        out[rank] = {"train": after_train, "eval": _bn_buffers(model), "scores": scores}
    finally:
        dist.destroy_process_group()


def test_per_worker_bn_under_ddp_and_eval_with_rank_0s_running_statistics(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "pg"), out), nprocs=2, join=True)
        out = dict(out)
    # training: each worker's running statistics come from its own share (per-worker BN, not the global batch)
    torch.manual_seed(0)
    alone = build_resnet("resnet-20", 4, widths=WIDTHS).train()
    alone(_batch(0))
    want = _bn_buffers(alone)
    assert all(torch.allclose(out[0]["train"][k], want[k], atol=1e-6) for k in want)
    key = "conv1.bn.running_mean" if "conv1.bn.running_mean" in want else next(iter(want))
    assert not torch.allclose(out[0]["train"][key], out[1]["train"][key])  # not vacuous: the shares differed
    # eval: rank 0's buffers reach every worker, so the same images get the same scores on both
    assert all(torch.equal(out[1]["eval"][k], out[0]["train"][k]) for k in want)
    assert torch.allclose(out[0]["scores"], out[1]["scores"], atol=1e-6)
