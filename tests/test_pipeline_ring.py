"""The compiled pipeline's ring buffer (csrc/pipeline/ring_buffer.h) on its
own, driven step by step from Python (``_C._RingBuffer``): the order, the
waits and how a failure or a close ends them. The engine around it is tested
in test_pipeline.py. Every wait has a timeout that turns a hang into a
failure; none is a speed assertion."""

from __future__ import annotations

import threading
import time

import pytest

from nhgd_ext import _build
from nhgd_ext.pipeline import PipelineClosed, PipelineError

HANG = 10.0

module = _build.native_module()
pytestmark = pytest.mark.skipif(module is None, reason="the compiled extension is not loaded (reference backend)")


def _joined(thread: threading.Thread) -> None:
    thread.join(HANG)
    assert not thread.is_alive(), "a wait did not end"


def test_one_slot_delivers_every_message_in_order():
    ring, n = module._RingBuffer(1), 2000
    payload, got = [None], []

    def consume():
        while (slot := ring.begin_pop()) is not None:
            got.append(payload[slot])
            ring.release()
            ring.mark_applied()
        ring.consumer_stopped()

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(n):
        slot = ring.begin_push()
        payload[slot] = i
        ring.end_push(True)
    ring.wait_applied()
    ring.close(True)
    _joined(consumer)
    assert got == list(range(n)) and ring.applied == n


def test_a_failure_wakes_a_producer_waiting_on_a_full_ring():
    ring = module._RingBuffer(2)
    for _ in range(2):
        ring.begin_push()
        ring.end_push(True)  # full: nobody consumes
    errors = []

    def produce():
        try:
            ring.begin_push()
        except PipelineError as err:
            errors.append(err)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.02)
    ring.fail("consumer broke")
    _joined(producer)
    assert [str(e) for e in errors] == ["consumer broke"]
    assert ring.begin_pop() is None  # a failed ring hands out nothing more


def test_an_abandoned_push_is_never_delivered_and_a_closed_ring_refuses():
    ring = module._RingBuffer(2)
    ring.begin_push()
    ring.end_push(False)  # the copy into the slot failed
    assert ring.published == 0
    ring.close(True)
    assert ring.begin_pop() is None
    with pytest.raises(PipelineClosed):
        ring.begin_push()


def test_try_begin_push_never_waits():
    ring = module._RingBuffer(2)
    for i in range(2):
        assert ring.try_begin_push() == i
        ring.end_push(True)
    assert ring.try_begin_push() is None  # full: refused at once, nothing changed
    assert ring.published == 2
    assert ring.begin_pop() == 0
    ring.release()
    assert ring.try_begin_push() == 0  # the slot just released
    assert ring.try_begin_push() is None  # another push is filling one
    ring.end_push(True)
    ring.fail("stopped")
    with pytest.raises(PipelineError, match="stopped"):
        ring.try_begin_push()


def test_a_bad_slot_count_is_refused():
    with pytest.raises(ValueError, match="slots"):
        module._RingBuffer(0)
