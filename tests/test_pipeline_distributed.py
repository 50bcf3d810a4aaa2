"""transport="distributed": two gloo processes on localhost (started with
torch.multiprocessing), the consumer process owning the curvature. The
workers assert; a failing worker fails the test through mp.spawn. A 60 s
process-group timeout turns a hang into a failure."""

from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nhgd_ext.curvature import DenseEFIM
from nhgd_ext.pipeline import Pipeline, PipelineError, serve
from nhgd_ext.pipeline.distributed import _header, _pack, _unpack

pytestmark = [pytest.mark.heavy,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))


D, N = 10, 20000


def _gradients():
    return torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _exact(rank: int) -> None:
    if rank == 1:
        stats = serve(DenseEFIM(D, beta=0.999, dtype=torch.float64, representation="dense"), producer_rank=0)
        assert stats["messages"] == N, stats
        return
    G = _gradients()
    sync = DenseEFIM(D, beta=0.999, dtype=torch.float64, representation="dense")
    for i in range(N):
        sync.update(G[i], batch_size=1 + i % 3)
    v = torch.randn(D, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    buf = torch.empty(D, dtype=torch.float64)
    with Pipeline(None, transport="distributed", consumer_rank=1, slots=16) as pipe:
        assert pipe.dim == D and pipe.dtype == torch.float64
        for i in range(N):
            buf.copy_(G[i])
            pipe.push(buf, batch_size=1 + i % 3)
        assert pipe.num_updates == N == sync.num_updates
        # the sender fell behind and packed messages into batches: those went through too
        assert pipe._remote.batches_sent > 0
        assert torch.equal(pipe.solve(v), sync.solve(v)), "pipelined solve differs from the synchronous one"
        assert torch.equal(pipe.inverse, sync.inverse)


def _kfac_nhgd(rank: int) -> None:
    """NHGD with K-FAC in the consumer process: the producer's recorder (a
    KFAC over its own model, hooks only) sends each step's layer inputs and
    output gradients with the push; the hypergradients equal the synchronous
    estimator's bitwise. Also: a tensor the wire cannot carry is refused at
    the push, and the stream goes on."""
    from test_pipeline_nhgd import run_mlp

    from nhgd_ext.curvature import KFAC
    from nhgd_ext.estimators import NHGD

    def kfac(model, params):
        return KFAC(model, params=params, beta=0.9, damping=1e-2)

    if rank == 1:
        # the consumer's KFAC needs the same layers; its model replica never runs
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
        stats = serve(kfac(model, list(model.parameters())), producer_rank=0)
        assert stats["num_updates"] == 120, stats
        return
    sync = run_mlp(lambda m, i, o: NHGD(i, o, curvature=kfac(m, i), cross="trajectory", beta=0.9))
    pipes = []

    def piped(m, i, o):
        pipes.append(Pipeline(None, transport="distributed", consumer_rank=1, recorder=kfac(m, i), slots=3))
        assert not pipes[-1].takes_rows  # as the consumer's K-FAC says
        return NHGD(i, o, pipeline=pipes[-1], cross="trajectory", beta=0.9)

    got = run_mlp(piped)
    pipe = pipes[0]
    with pytest.raises(ValueError, match="'grad' tensors must have .* one of the dtypes"):
        pipe.push(torch.ones(pipe.dim, dtype=torch.float64).to(torch.float8_e4m3fn))
    assert pipe.num_updates == 120
    pipe.close()
    for a, b in zip(got, sync):
        assert torch.equal(a, b), (a, b)


def _consumer_error(rank: int) -> None:
    if rank == 1:
        for _ in range(2):
            try:
                serve(DenseEFIM(4, dtype=torch.float64, representation="dense"), producer_rank=0)
            except PipelineError as err:
                assert "NaN" in str(err), err
            else:
                raise AssertionError("serve() did not raise after its update failed")
        return
    for surfaces_at in ("push", "request"):
        pipe = Pipeline(None, transport="distributed", consumer_rank=1)
        pipe.push(torch.ones(4, dtype=torch.float64))
        pipe.push(torch.tensor([1.0, float("nan"), 0, 0], dtype=torch.float64))
        try:
            if surfaces_at == "push":
                # the side channel: a later push raises, without any request (bounded: 30 s)
                for _ in range(3000):
                    pipe.push(torch.ones(4, dtype=torch.float64))
                    time.sleep(0.01)
            else:
                for _ in range(50):  # the consumer keeps draining: these never block
                    pipe.push(torch.ones(4, dtype=torch.float64))
                pipe.flush()
                _ = pipe.num_updates  # the request carries the error back as well
        except PipelineError as err:
            assert "NaN" in str(err), err
        else:
            raise AssertionError(f"the consumer's error did not reach the producer's {surfaces_at}")
        pipe.abort("test over")


def _producer_abort(rank: int) -> None:
    if rank == 1:
        try:
            serve(DenseEFIM(4, dtype=torch.float64, representation="dense"), producer_rank=0)
        except PipelineError as err:
            assert "producer raised KeyError" in str(err), err
        else:
            raise AssertionError("serve() returned after the producer failed")
        return
    try:
        with Pipeline(None, transport="distributed", consumer_rank=1) as pipe:
            pipe.push(torch.ones(4, dtype=torch.float64))
            raise KeyError("inner loop broke")
    except KeyError:
        pass


def _all_scenarios(rank: int, port: int) -> None:
    # One pair of processes runs every scenario in turn: starting them is the
    # slow part (importing torch twice).
    for scenario in (_exact, _kfac_nhgd, _consumer_error, _producer_abort):
        scenario(rank)


def _worker(rank: int, port: int) -> None:
    _init(rank, port)
    try:
        _all_scenarios(rank, port)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes():
    """20,000 messages bitwise equal to the synchronous run; K-FAC NHGD across
    the processes equals the synchronous estimator; a consumer error reaches
    the producer; a producer error reaches the consumer."""
    mp.spawn(_worker, args=(_free_port(),), nprocs=2, join=True)


def test_a_batch_unpacks_to_its_messages_in_order():
    """Mixed dtypes, odd sizes (so byte offsets need the padding), from one to
    five tensors (a K-FAC step's captures travel as extra tensors), 1-D and
    2-D: every tensor comes back bitwise, in order."""
    g = torch.Generator().manual_seed(5)
    messages = [
        (0, 3, 0, [torch.randn(5, generator=g)]),
        (1, -1, 1, [torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(1, 3, generator=g)]),
        (0, 1, 0, [torch.randn(7, generator=g)] + [torch.randn(3, 1 + i, generator=g) for i in range(4)]),
        (0, 1, 1, [torch.randn(7, generator=g), torch.randn(3, 3, generator=g, dtype=torch.float64)]),
        (1, 1, 0, [torch.randn(2, 5, generator=g, dtype=torch.float64)]),
    ]
    index, payload = _pack(messages)
    got = list(_unpack(len(messages), index, payload))
    assert len(got) == len(messages)
    for (op, a, b, tensors), (op2, a2, b2, tensors2) in zip(messages, got):
        assert (op, a, b) == (op2, a2, b2)
        assert len(tensors) == len(tensors2)
        assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(tensors, tensors2))
    with pytest.raises(ValueError, match="at most 2 tensors"):
        _header(0, 1, 0, [torch.ones(2)] * 3)
