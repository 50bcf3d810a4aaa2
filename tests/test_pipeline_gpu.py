"""nhgd_ext.pipeline with GPUs: one GPU with two streams, two GPUs (peer or
pinned-host route), GPU <-> CPU. Skipped cleanly without a GPU (and the
two-GPU tests without two). Results must equal the synchronous ones exactly:
the consumer runs the same kernels on the same data, on its own stream."""

from __future__ import annotations

import pytest
import torch

import nhgd_ext
from nhgd_ext.curvature import DenseEFIM
from nhgd_ext.pipeline import Pipeline, PipelineError
from nhgd_testing import CUDA_MARKS

pytestmark = list(CUDA_MARKS)
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _stream(producer: str, consumer: str, n: int = 2000, d: int = 64):
    G = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(producer)
    v = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(producer)
    sync = DenseEFIM(d, beta=0.99, dtype=torch.float64, device=consumer, representation="dense")
    for i in range(n):
        sync.update(G[i].to(consumer), batch_size=2)
    piped = DenseEFIM(d, beta=0.99, dtype=torch.float64, device=consumer, representation="dense")
    buf = torch.empty(d, dtype=torch.float64, device=producer)
    with Pipeline(piped, producer=producer, consumer=consumer, slots=4) as p:
        for i in range(n):
            buf.copy_(G[i])  # reused at once, on the producer's stream: push ordered it after its copy
            p.push(buf, batch_size=2)
        w = p.solve(v)
        assert w.device == v.device
        assert p.num_updates == n
        route = p.route
    assert torch.equal(w.to(consumer), sync.solve(v.to(consumer)))
    assert torch.equal(piped.inverse, sync.inverse)
    return route


def test_compiled_route_is_used_on_the_gpu():
    if nhgd_ext.compiled_with_cuda():
        with Pipeline(DenseEFIM(4, device="cuda", representation="dense"), producer="cuda", consumer="cuda") as p:
            assert p.engine == "cpp" and p.route == "cuda-streams"


def test_one_gpu_two_streams():
    _stream("cuda:0", "cuda:0")


def test_gpu_producer_cpu_consumer():
    route = _stream("cuda:0", "cpu")
    assert route in ("pinned-host", "python-thread")


def test_cpu_producer_gpu_consumer():
    _stream("cpu", "cuda:0")


def test_consumer_runs_on_its_own_stream():
    seen = []

    class Probe(DenseEFIM):
        def update(self, g, batch_size=1):
            seen.append(torch.cuda.current_stream().stream_id)
            super().update(g, batch_size)

    with Pipeline(Probe(8, device="cuda"), producer="cuda", consumer="cuda") as p:
        p.push(torch.ones(8, device="cuda"))
        p.flush()
    if p.engine == "cpp":
        assert seen[0] != torch.cuda.current_stream().stream_id


def test_gpu_consumer_error_reaches_the_producer():
    p = Pipeline(DenseEFIM(4, device="cuda", representation="dense"), producer="cuda", consumer="cuda")
    p.push(torch.tensor([1.0, float("nan"), 0.0, 0.0], device="cuda"))
    with pytest.raises(PipelineError, match="NaN"):
        p.flush()
    p.close()


def test_kfac_nhgd_on_one_gpu_equals_synchronous():
    """K-FAC's captures travel on the cuda-streams route with the gradient."""
    from test_pipeline_nhgd import run_mlp

    from nhgd_ext.curvature import KFAC
    from nhgd_ext.estimators import NHGD

    kfac = lambda model, i: KFAC(model, params=i, beta=0.9, damping=1e-2)  # noqa: E731
    sync = run_mlp(lambda m, i, o: NHGD(i, o, curvature=kfac(m, i), beta=0.9), "cuda:0")
    pipes = []

    def piped(m, i, o):
        pipes.append(Pipeline(kfac(m, i), producer="cuda:0", consumer="cuda:0", slots=3))
        return NHGD(i, o, pipeline=pipes[-1], beta=0.9)

    got = run_mlp(piped, "cuda:0")
    assert pipes[0].num_updates == 120
    pipes[0].close()
    for a, b in zip(got, sync):
        assert torch.equal(a, b), (a, b)


@TWO_GPUS
def test_two_gpus():
    route = _stream("cuda:0", "cuda:1")
    assert route in ("peer", "pinned-host", "python-thread")


@TWO_GPUS
def test_two_gpus_other_direction():
    _stream("cuda:1", "cuda:0")


@TWO_GPUS
def test_two_gpus_flush_orders_this_threads_stream_on_the_consumer_gpu():
    """After flush, the curvature (and what a request returns) may be read on
    the consumer's GPU, on this thread's current stream there, before close
    synchronizes anything."""
    d, n = 512, 300
    G = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to("cuda:0")
    sync = DenseEFIM(d, dtype=torch.float64, device="cuda:1", representation="dense")
    for g in G:
        sync.update(g.to("cuda:1"))
    piped = DenseEFIM(d, dtype=torch.float64, device="cuda:1", representation="dense")
    with Pipeline(piped, producer="cuda:0", consumer="cuda:1", slots=4) as p:
        for g in G:
            p.push(g)
        p.flush()
        assert torch.equal(piped.inverse, sync.inverse)
        assert torch.equal(p.inverse, sync.inverse)
