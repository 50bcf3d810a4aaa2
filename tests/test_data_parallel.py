"""Estimators driving a model wrapped in DistributedDataParallel: two gloo
processes on the CPU, each with its own half of every batch. Each rank's
curvature state and hypergradient must be the same on both ranks and equal
to one process stepping on the union of the batches (float64, up to the
all-reduce's summation order). The workers write what they found; the test
compares. A 60 s process-group timeout turns a hang into a failure."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nhgd_ext import estimators as E
from nhgd_testing import tensors_of

pytestmark = [pytest.mark.heavy,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

WORLD, LOCAL, STEPS = 2, 6, 4

ESTIMATORS = {
    "nhgd": lambda p, v, m: E.NHGD(p, v, modules=m, representation="dense"),
    "nhgd-mean": lambda p, v, m: E.NHGD(p, v, modules=m, per_sample=False, representation="dense"),
    "nhgd-kfac": lambda p, v, m: E.NHGD(p, v, curvature="kfac", modules=m),
    "cg10": lambda p, v, m: E.ConjugateGradient(p, v, process_group=_group(m)),
    "itd": lambda p, v, m: E.SingleLoopITD(p, v, process_group=_group(m)),
}


def _group(model):
    """What a user passes to the estimators that take no model: the DDP's group (None alone)."""
    return getattr(model, "process_group", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(STEPS * WORLD * LOCAL + 16, 1, 5, 5, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (X.shape[0],), generator=g)


def _run(name: str, model: nn.Module, rows_of_step) -> dict:
    """STEPS inner steps and one hypergradient; rows_of_step(t) says which
    samples this process takes at step t (its share, or the union)."""
    X, y = _data()
    v = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)  # log weight decay
    inner = list(model.parameters())
    est = ESTIMATORS[name](inner, [v], model)
    opt = torch.optim.SGD(inner, lr=0.3)

    def losses(rows):
        decay = 0.5 * v.exp().sum() * sum(p.pow(2).sum() for p in inner)
        return F.cross_entropy(model(X[rows]), y[rows], reduction="none") + decay

    try:
        for t in range(STEPS):
            est.inner_step(losses(rows_of_step(t)), opt)
        val = slice(STEPS * WORLD * LOCAL, None)
        (h,) = est.hypergradient(F.cross_entropy(model(X[val]), y[val]), lambda: losses(rows_of_step(0)).mean())
        state = est.curvature.state_dict() if hasattr(est, "curvature") else {}
    finally:
        getattr(est, "close", lambda: None)()
    return {"h": h.detach().clone(), "theta": [p.detach().clone() for p in inner], "state": state}


def _union_rows(t: int) -> torch.Tensor:
    return torch.arange(t * WORLD * LOCAL, (t + 1) * WORLD * LOCAL)


def _worker(rank: int, port: int, names: list[str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        found = {}
        for name in names:
            model = nn.parallel.DistributedDataParallel(_model())
            found[name] = _run(name, model, lambda t: _union_rows(t)[rank * LOCAL:(rank + 1) * LOCAL])
        torch.save(found, f"{out}/rank{rank}.pt")
    finally:
        # a rank that tore its group down while the other still finished the
        # last collective would fail that rank with a closed connection
        dist.barrier()
        dist.destroy_process_group()


def test_ddp_ranks_agree_with_each_other_and_with_one_process_on_the_union(tmp_path):
    names = list(ESTIMATORS)
    mp.spawn(_worker, args=(_free_port(), names, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in names:
        single = _run(name, _model(), _union_rows)
        for rank in ranks:
            mine = rank[name]
            assert torch.equal(mine["h"], ranks[0][name]["h"]), f"{name}: the ranks' hypergradients differ"
            for a, b in zip(tensors_of(mine["state"]), tensors_of(ranks[0][name]["state"])):
                assert torch.equal(a, b), f"{name}: the ranks' curvature states differ"
            torch.testing.assert_close(mine["h"], single["h"], rtol=1e-9, atol=1e-12, msg=name)
            for a, b in zip(mine["theta"], single["theta"]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            for a, b in zip(tensors_of(mine["state"]), tensors_of(single["state"])):
                if a.is_floating_point():
                    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_a_process_group_without_torch_distributed_is_refused():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    p, v = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="argument 'process_group': torch.distributed is not initialized"):
        E.ConjugateGradient([p], [v], process_group="world")


def test_nhgd_refuses_a_pipeline_with_data_parallel_training():
    p, v = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="'pipeline' does not combine with data-parallel inner training"):
        E.NHGD([p], [v], pipeline=True, process_group="world")


def _unequal_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        before = [p.detach().clone() for p in model.parameters()]
        X, y = _data()
        v = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
        est = E.NHGD(list(model.parameters()), [v], modules=model)
        rows = torch.arange(4 + 2 * rank)  # 4 samples on rank 0, 6 on rank 1
        try:
            est.inner_step(F.cross_entropy(model(X[rows]), y[rows], reduction="none"),
                           torch.optim.SGD(model.parameters(), lr=0.1))
            message = "no error"
        except ValueError as err:
            message = str(err)
        unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        torch.save({"message": message, "unchanged": unchanged, "updates": est.curvature.num_updates},
                   f"{out}/unequal{rank}.pt")
        est.close()
    finally:
        # a rank that tore its group down while the other still finished the
        # last collective would fail that rank with a closed connection
        dist.barrier()
        dist.destroy_process_group()


def test_unequal_batches_across_ranks_are_refused_on_every_rank_before_any_change(tmp_path):
    mp.spawn(_unequal_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        found = torch.load(tmp_path / f"unequal{rank}.pt")
        assert "data-parallel ranks hold batches of different sizes (10 samples over 2 ranks" in found["message"]
        assert found["unchanged"] and found["updates"] == 0
