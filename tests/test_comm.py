"""Gradient communication hooks (vggdist.comm) with two real gloo processes on a tiny model."""

import copy
import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vggdist.comm import GRAD_COMPRESSION, register_comm_hook

WORLD_SIZE = 2
IN, OUT, N = 32, 16, 256  # least squares: per worker N samples of IN features, OUT targets
RANK_A = 3
STEPS, LR = 80, 1.0  # plain SGD: with momentum 0.9, rank-1 PowerSGD diverges on this problem


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker `rank`'s shard of a noisy least-squares problem y = x A^T + b + noise, A of rank RANK_A.

    From W = 0 the weight gradients have rank <= RANK_A plus noise, as gradients of real networks are nearly low
    rank (Vogels et al. 2019, §3); RANK_A > the PowerSGD rank, so error feedback has to deliver the rest.
    """
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(OUT, RANK_A, generator=g) @ torch.randn(RANK_A, IN, generator=g) / RANK_A**0.5
    b = torch.randn(OUT, generator=g)
    g.manual_seed(rank)
    x = torch.randn(N, IN, generator=g)
    return x, x @ a.T + b + 0.1 * torch.randn(N, OUT, generator=g)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Linear(IN, OUT)  # a (OUT, IN) weight PowerSGD compresses, a bias it sends as is
    nn.init.zeros_(net.weight)
    return net


def _ddp(net: nn.Module) -> nn.parallel.DistributedDataParallel:
    # init_sync broadcasts rank 0's weights; the tiny model lies in one bucket (see the note in bench/allreduce.py)
    return nn.parallel.DistributedDataParallel(net)


def _bf16_grads(rank: int) -> dict:
    """DDP bf16-hook gradients vs the fp32 mean of both workers' local gradients."""
    net = _net()
    ref = copy.deepcopy(net)
    model = _ddp(net)
    assert register_comm_hook(model, "bf16") is None
    x, y = _data(rank)
    nn.functional.mse_loss(model(x), y).backward()
    local = []
    for r in range(WORLD_SIZE):  # every worker can recompute every shard's fp32 gradient
        xr, yr = _data(r)
        ref.zero_grad()
        nn.functional.mse_loss(ref(xr), yr).backward()
        local.append([p.grad.clone() for p in ref.parameters()])
    errs, scales, exact = [], [], True
    for i, p in enumerate(net.parameters()):
        mean = sum(g[i] for g in local) / WORLD_SIZE
        errs.append(float((p.grad - mean).abs().max()))
        scales.append(float(mean.abs().max()))
        exact &= bool(torch.equal(p.grad, mean))
    return dict(errs=errs, scales=scales, exact=exact)


def _train(rank: int, kind: str) -> list[float]:
    """SGD on the shared least-squares problem; returns the loss on all data every 10 steps."""
    net = _net()
    model = _ddp(net)
    state = register_comm_hook(model, kind, powersgd_rank=1, powersgd_start_iter=2)
    if kind == "powersgd":
        assert state.matrix_approximation_rank == 1 and state.start_powerSGD_iter == 2
        assert state.use_error_feedback
    else:
        assert state is None
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data(rank)
    shards = [_data(r) for r in range(WORLD_SIZE)]
    curve = []
    for step in range(STEPS + 1):
        if step % 10 == 0:
            with torch.no_grad():
                curve.append(sum(float(nn.functional.mse_loss(net(a), b)) for a, b in shards) / WORLD_SIZE)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return curve


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        result = dict(bf16_grads=_bf16_grads(rank))
        result.update({kind: _train(rank, kind) for kind in GRAD_COMPRESSION})
        gathered = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()
    # gloo's worker threads can abort interpreter teardown ("terminate called without an active exception"),
    # which a spawned worker reports as SIGABRT after its work is done: leave without the teardown
    os._exit(0)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("comm") / "results.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD_SIZE, join=True)
    return json.loads(out.read_text())


def test_bf16_grads_match_fp32_mean_within_bf16_precision(results):
    for r in results:
        b = r["bf16_grads"]
        assert not b["exact"], "bf16 hook left the gradients bit-exact: was it installed?"
        for err, scale in zip(b["errs"], b["scales"], strict=True):
            # bf16 keeps 8 significant bits: ~2^-8 relative error per value, twice (compress, sum)
            assert err <= 2**-7 * scale, (err, scale)


def test_workers_end_with_identical_weights_for_every_option(results):
    # the losses are computed from each worker's own weights: equal curves mean equal weights
    for kind in GRAD_COMPRESSION:
        assert results[0][kind] == pytest.approx(results[1][kind], rel=1e-6), kind


def test_powersgd_with_error_feedback_converges_like_none(results):
    none, bf16, powersgd = (results[0][k] for k in ("none", "bf16", "powersgd"))
    floor = none[-1]
    assert floor < 0.05 * none[0], none  # the problem is solved by plain SGD
    assert bf16[-1] <= 1.05 * floor, (bf16, none)
    assert powersgd[-1] <= 1.3 * floor, (powersgd, none)
    assert powersgd[1] != pytest.approx(none[1], rel=1e-3)  # the compression did change the updates


def test_rejects_unknown_kind():
    with pytest.raises(ValueError, match="fp16"):
        register_comm_hook(nn.Linear(2, 2), "fp16")


@pytest.mark.parametrize("kind", GRAD_COMPRESSION)
def test_noop_on_a_model_that_is_not_ddp(kind):
    net = nn.Linear(4, 3)
    before = copy.deepcopy(net.state_dict())
    assert register_comm_hook(net, kind) is None
    assert not net._forward_hooks and not net._backward_hooks
    net(torch.ones(2, 4)).sum().backward()
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
