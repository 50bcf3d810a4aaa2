"""nhgd_ext.pipeline on CPU threads: exactly the synchronous result, in
order, once each; back-pressure; refused input; errors both ways; close.

The compiled engine (C++ ring buffer and consumer thread) is required where
the extension is compiled; the pure-Python engine runs the same tests. Every
wait here has a generous timeout (10 s) that catches a hang; none is a
speed assertion."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

import nhgd_ext
from nhgd_ext.curvature import DenseEFIM
from nhgd_ext.pipeline import Pipeline, PipelineClosed, PipelineError, engine_kind

HANG = 10.0  # seconds: only to turn a hang into a failure

ENGINES = [pytest.param("cpp", id="cpp"), pytest.param("reference", id="reference")]


pytestmark = pytest.mark.usefixtures("one_thread_each")


@pytest.fixture(params=ENGINES)
def engine(request):
    if request.param == "cpp" and engine_kind() != "cpp":
        pytest.skip("the compiled extension is not loaded (reference backend)")
    return request.param


class Recorder:
    """A curvature that records what reaches it (the message id is g[0])."""

    dim = 4

    def __init__(self, delay: float = 0.0, fail_at: int | None = None):
        self.seen: list[tuple[float, int]] = []
        self.delay, self.fail_at = delay, fail_at
        self.num_updates = 0

    def update(self, g, batch_size=1):
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise ValueError(f"bad message {g[0].item()}")
        if self.delay:
            time.sleep(self.delay)
        self.seen.append((g[0].item(), batch_size))
        self.num_updates += 1

    def update_many(self, rows):
        for row in rows:
            self.update(row)

    def solve(self, v):
        return v * len(self.seen)

    def reset(self):
        self.seen.clear()
        self.num_updates = 0


def test_compiled_engine_is_used_where_the_extension_is_compiled():
    if nhgd_ext.backend("cpu") == "cpp":
        assert engine_kind() == "cpp"
        with Pipeline(Recorder()) as p:
            assert p.engine == "cpp" and p.route == "host"
    else:
        assert engine_kind() == "reference"


def test_an_unknown_engine_is_refused_by_name():
    with pytest.raises(ValueError, match="argument 'engine' must be 'auto', 'cpp' or 'reference'"):
        Pipeline(Recorder(), engine="compiled")


@pytest.mark.parametrize("slots", [1, 3, 64])
def test_20000_messages_in_order_exactly_once(engine, slots):
    rec = Recorder()
    buf = torch.zeros(4, dtype=torch.float64)
    with Pipeline(rec, slots=slots, engine=engine) as p:
        for i in range(20000):
            buf[0] = i  # the same buffer every time: push must have copied it
            p.push(buf, batch_size=1 + i % 5)
        p.flush()
        assert p.num_messages == 20000
        assert p.num_updates == 20000
    assert rec.seen == [(float(i), 1 + i % 5) for i in range(20000)]


def test_dense_efim_updates_bitwise_equal_to_synchronous(engine):
    # 20,000 through the compiled engine; the fallback is the same logic in Python.
    d, n = 12, (20000 if engine == "cpp" else 3000)
    G = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    v = torch.randn(d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    sync = DenseEFIM(d, beta=0.995, dtype=torch.float64, representation="dense")
    for i in range(n):
        if i % 2000 == 999:
            sync.update_many(G[i - 3:i + 1], per_step=True)
        elif i % 1000 == 999:
            sync.update_many(G[i - 3:i + 1])
        else:
            sync.update(G[i], batch_size=1 + i % 4)
    piped = DenseEFIM(d, beta=0.995, dtype=torch.float64, representation="dense")
    buf = torch.empty(d, dtype=torch.float64)
    # Tensors the compiled host route cannot copy as plain bytes: strided,
    # and with a pending negation (it copies those through a typed view).
    by_column = G.mT.contiguous()
    with Pipeline(piped, slots=8, engine=engine, consumer_threads=1) as p:
        for i in range(n):
            if i % 2000 == 999:
                p.update_many(G[i - 3:i + 1].clone(), per_step=True)
            elif i % 1000 == 999:
                p.update_many(by_column[:, i - 3:i + 1].mT)
            elif i % 7 == 3:
                p.update(by_column[:, i], batch_size=1 + i % 4)
            elif i % 7 == 5:
                p.update(torch._neg_view(-G[i]), batch_size=1 + i % 4)
            else:
                buf.copy_(G[i])
                p.update(buf, batch_size=1 + i % 4)
        assert torch.equal(p.solve(v), sync.solve(v))
        assert torch.equal(p.solve(v[:, 0]), sync.solve(v[:, 0]))
        assert p.num_updates == sync.num_updates
    for key, value in sync.state_dict().items():
        other = piped.state_dict()[key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, key


def test_fast_producer_blocks_and_nothing_is_dropped(engine):
    rec = Recorder(delay=0.002)
    p = Pipeline(rec, slots=2, engine=engine)
    start = time.perf_counter()
    for i in range(40):
        p.push(torch.full((4,), float(i)))
        # never more than the slots plus the one being applied are outstanding
        assert i + 1 - p.num_messages <= 3
    p.close()
    assert [s for s, _ in rec.seen] == [float(i) for i in range(40)]
    assert time.perf_counter() - start < 60  # sanity, not a speed check


def test_slow_producer(engine):
    rec = Recorder()
    with Pipeline(rec, slots=4, engine=engine) as p:
        for i in range(20):
            time.sleep(0.002)
            p.push(torch.full((4,), float(i)))
            if i % 5 == 0:
                p.flush()
                assert p.num_messages == i + 1
    assert [s for s, _ in rec.seen] == [float(i) for i in range(20)]


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(5), "shape"),
    (torch.zeros(2, 3), "shape"),
    (torch.zeros(4, dtype=torch.int64), "floating-point"),
    ("not a tensor", "tensor"),
])
def test_wrong_push_is_refused_without_poisoning_the_stream(engine, bad, match):
    rec = Recorder()
    with Pipeline(rec, slots=2, engine=engine) as p:
        p.push(torch.full((4,), 1.0))
        with pytest.raises(ValueError, match=match):
            p.push(bad)
        with pytest.raises(ValueError, match="batch_size"):
            p.push(torch.zeros(4), batch_size=0)
        p.push(torch.full((4,), 2.0))
        p.flush()
    assert [s for s, _ in rec.seen] == [1.0, 2.0]


def test_exception_in_the_consumer_reaches_the_producer(engine):
    rec = Recorder(fail_at=3)
    p = Pipeline(rec, slots=4, engine=engine)
    with pytest.raises(PipelineError, match="bad message 3") as info:
        for i in range(1000):  # pushing on: a later push or the flush reports it
            p.push(torch.full((4,), float(i)))
        p.flush()
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(PipelineError):  # and every later call, never a hang
        p.solve(torch.zeros(4))
    p.close()  # reported already: close just stops
    assert [s for s, _ in rec.seen] == [0.0, 1.0, 2.0]


def test_exception_from_a_real_curvature_reaches_the_producer(engine):
    cur = DenseEFIM(4, dtype=torch.float64, representation="dense")
    p = Pipeline(cur, engine=engine)
    p.push(torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(PipelineError, match="NaN") as info:
        p.flush()
    assert isinstance(info.value.__cause__, ValueError)
    p.close()


def test_producer_error_in_with_block_stops_the_consumer(engine):
    rec = Recorder(delay=0.001)
    with pytest.raises(KeyError):
        with Pipeline(rec, slots=4, engine=engine) as p:
            for i in range(10):
                p.push(torch.full((4,), float(i)))
            raise KeyError("producer broke")
    assert p._engine.closed
    with pytest.raises((PipelineError, PipelineClosed)):
        p.push(torch.zeros(4))
    seen = [s for s, _ in rec.seen]
    assert seen == [float(i) for i in range(len(seen))]  # a prefix, in order


def test_close_during_traffic_returns_and_blocked_push_raises(engine):
    rec = Recorder(delay=0.01)
    p = Pipeline(rec, slots=2, engine=engine)
    accepted, errors = [], []

    def produce():
        try:
            for i in range(10**6):
                p.push(torch.full((4,), float(i)))
                accepted.append(i)
        except (PipelineClosed, PipelineError) as err:
            errors.append(err)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.1)
    closer = threading.Thread(target=p.close)
    closer.start()
    closer.join(HANG)
    assert not closer.is_alive(), "close() hung"
    producer.join(HANG)
    assert not producer.is_alive(), "a push blocked on a full ring did not wake up on close()"
    assert isinstance(errors[0], PipelineClosed)
    # close() drains: every accepted message was applied, in order, once.
    assert [s for s, _ in rec.seen] == [float(i) for i in accepted]


def test_close_without_drain_discards_the_queue(engine):
    rec = Recorder(delay=0.05)
    p = Pipeline(rec, slots=8, engine=engine)
    for i in range(8):
        p.push(torch.full((4,), float(i)))
    p.close(drain=False)
    seen = [s for s, _ in rec.seen]
    assert seen == [float(i) for i in range(len(seen))] and len(seen) < 8
    p.close()  # again: a no-op


def test_cross_terms_reach_on_cross_after_their_update(engine):
    log = []
    rec = Recorder()
    rec_update = rec.update

    def update(g, batch_size=1):
        rec_update(g, batch_size)
        log.append(("g", g[0].item()))

    rec.update = update
    with Pipeline(rec, engine=engine, on_cross=lambda B, b: log.append(("B", B.sum().item(), b))) as p:
        p.push(torch.full((4,), 1.0), batch_size=2, cross=torch.ones(2, 3))
        p.push(torch.full((4,), 2.0))
        p.flush()
    assert log == [("g", 1.0), ("B", 6.0, 2), ("g", 2.0)]
    with Pipeline(Recorder(), engine=engine) as p, pytest.raises(ValueError, match="cross"):
        p.push(torch.zeros(4), cross=torch.ones(2))


@pytest.mark.parametrize("beta", [None, 0.8], ids=["running", "ema"])
def test_auto_representation_pipelines_equal_to_synchronous(engine, beta):
    """A DenseEFIM left to choose its form starts compact (updated by Python
    on the consumer thread) and turns dense on the consumer once it keeps
    more than d / 2 rows: the solves still equal the synchronous object's
    bitwise."""
    d, n = 40, 60
    G = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    v = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    sync, piped = (DenseEFIM(d, beta=beta, dtype=torch.float64) for _ in range(2))
    with Pipeline(piped, engine=engine) as p:
        for i, g in enumerate(G):
            sync.update(g, batch_size=4)
            p.update(g, batch_size=4)
            if i in (10, n - 1):
                assert torch.equal(p.solve(v), sync.solve(v))
    assert piped.representation == sync.representation
    assert piped.representation == "dense" or beta is not None


def test_dense_updates_with_cross_terms_equal_synchronous(engine):
    """A DenseEFIM with an on_cross handler: with the compiled engine the
    consumer applies each update itself and hands Python only the cross term
    (a CROSS_ONLY message), in order, with the update's batch size."""
    d = 5
    G = torch.randn(40, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sync, piped = (DenseEFIM(d, beta=0.9, dtype=torch.float64, representation="dense") for _ in range(2))
    expected, log = [], []

    def on_cross(B, batch_size):
        log.append((B[0].item(), batch_size, piped.num_updates))

    with Pipeline(piped, engine=engine, on_cross=on_cross) as p:
        for i in range(0, 40, 4):
            sync.update(G[i], batch_size=3)
            p.push(G[i], batch_size=3, cross=torch.full((2,), float(i)))
            sync.update_many(G[i + 1:i + 4], per_step=True)
            p.push(G[i + 1:i + 4], per_step=True, cross=torch.full((2,), float(i + 1)))
            expected += [(float(i), 3, sync.num_updates - 1), (float(i + 1), 3, sync.num_updates)]
        p.flush()
        assert torch.equal(p.inverse, sync.inverse)
    assert log == expected


def test_message_kinds_agree_with_the_compiled_consumer():
    module = nhgd_ext._build.native_module()
    if module is None:
        pytest.skip("the compiled extension is not loaded (reference backend)")
    from nhgd_ext.pipeline import _messages

    assert module.PIPELINE_MESSAGE_KINDS == {k: getattr(_messages, k) for k in ("UPDATE", "UPDATE_MANY", "CALL", "CROSS_ONLY")}


def test_compiled_consumer_updates_a_dense_efim_without_the_gil():
    """The producer keeps the GIL (a Python loop, with a switch interval far
    longer than the test): a consumer that needed the interpreter could not
    apply a single update, the compiled one applies them all."""
    if engine_kind() != "cpp":
        pytest.skip("the compiled extension is not loaded (reference backend)")
    G = torch.randn(50, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sync = DenseEFIM(16, dtype=torch.float64, representation="dense")
    for g in G:
        sync.update(g, batch_size=2)
    with Pipeline(DenseEFIM(16, dtype=torch.float64, representation="dense"), slots=64) as p:
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1000.0)
        try:
            for g in G:
                p.push(g, batch_size=2)  # a free slot each time: the GIL is never given up
            deadline = time.perf_counter() + HANG
            while p.num_messages < len(G) and time.perf_counter() < deadline:
                pass
        finally:
            sys.setswitchinterval(interval)
        assert p.num_messages == len(G)
        assert torch.equal(p.inverse, sync.inverse)


def test_curvature_interface_reset_and_state(engine):
    cur = DenseEFIM(6, beta=0.9, dtype=torch.float64, representation="dense")
    with Pipeline(cur, engine=engine) as p:
        for _ in range(5):
            p.update(torch.randn(6, dtype=torch.float64))
        state = p.state_dict()
        assert state["num_updates"] == 5
        p.reset()
        assert p.num_updates == 0
        p.load_state_dict(state)
        assert p.num_updates == 5
        assert torch.equal(p.inverse, cur.inverse)


@pytest.mark.parametrize("kwargs, match", [
    ({"slots": 0}, "slots"),
    ({"transport": "carrier pigeon"}, "transport"),
    ({"consumer": "tpu"}, "consumer"),
    ({"engine": "quantum"}, "engine"),
    ({"recorder": object()}, "recorder"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Pipeline(Recorder(), **kwargs)
    with pytest.raises(ValueError, match="curvature"):
        Pipeline(object())


def test_a_dropped_pipeline_is_freed_at_once_and_stops_its_consumer(engine):
    # No reference cycle: the Pipeline goes with its last reference, on the
    # dropping thread (never in a garbage collection on the consumer thread).
    import weakref

    rec = Recorder(delay=0.001)
    p = Pipeline(rec, slots=4, engine=engine)
    for i in range(8):
        p.push(torch.full((4,), float(i)))
    gone = weakref.ref(p)
    del p
    assert gone() is None
    seen = [s for s, _ in rec.seen]
    assert seen == [float(i) for i in range(len(seen))]


def test_a_message_survives_its_four_integers():
    from nhgd_ext.pipeline._messages import CALL, CROSS_ONLY, UPDATE, UPDATE_MANY, Message

    for message in (Message(UPDATE, batch_size=7, has_cross=True, captures=2),
                    Message(UPDATE_MANY, per_step=None), Message(UPDATE_MANY, per_step=False, captures=4),
                    Message(UPDATE_MANY, per_step=True, has_cross=True), Message(CALL, call_id=123),
                    Message(CROSS_ONLY, batch_size=3, has_cross=True)):
        encoded = message.encode()
        assert len(encoded) == 4 and all(isinstance(x, int) for x in encoded)
        assert Message.decode(encoded) == message
    with pytest.raises(ValueError, match="unknown message kind 9"):
        Message.decode([9, 0, 0, 0])
