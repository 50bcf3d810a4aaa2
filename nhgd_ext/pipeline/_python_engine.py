"""The pipeline engine in pure Python: a thread and a bounded ring of copies.

Used only where the compiled extension is missing (``nhgd_ext.backend() ==
"reference"``), or when asked for (``Pipeline(..., engine="reference")``). It
has the interface and the semantics of the compiled ``PipelineEngine``
(csrc/pipeline/engine.h): in-order, exactly-once delivery, ``push`` copies and
blocks only while every slot is full, errors stop the stream and reach the
other side's next call. It does not overlap device copies with computation:
``push`` copies with plain ``Tensor.copy_``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ._messages import PipelineClosed, PipelineError


class PythonEngine:
    route = "python-thread"
    consumer_stream = (0, 0, 0)

    def __init__(self, apply: Callable, slots: int, producer: str, consumer: str, consumer_threads: int = 0):
        if slots < 1:
            raise ValueError(f"Pipeline: argument 'slots' must be >= 1, got {slots}")
        self._apply, self._slots = apply, slots
        self._producer, self._consumer = torch.device(producer), torch.device(consumer)
        self._threads = consumer_threads
        self._queue: list = [None] * slots
        self._cond = threading.Condition()
        self._published = self._popped = self._released = self._applied = 0
        self._filling = False
        self._closed = self._failed = self._stopped = False
        self._drain = True
        self._error: str | None = None
        self._thread = threading.Thread(target=self._consume, name="nhgd-consumer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- producer

    def push(self, tensors, meta) -> None:
        for t in tensors:
            if t.device != self._producer:
                raise ValueError(f"Pipeline.push: the message's tensors must be on the producer device "
                                 f"{self._producer}, got one on {t.device}")
        with self._cond:
            self._cond.wait_for(lambda: self._failed or self._closed
                                or (not self._filling and self._published - self._released < self._slots))
            self._raise_if_stopped()
            self._filling = True
        published = False
        try:
            self._queue[self._published % self._slots] = ([t.detach().clone() for t in tensors], list(meta))
            published = True
        finally:
            with self._cond:
                self._filling = False
                if published:
                    self._published += 1
                self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            target = self._published
            self._cond.wait_for(lambda: self._applied >= target or self._failed or self._stopped)
            if self._failed:
                raise PipelineError(self._error)
            if self._applied < target:
                raise PipelineClosed("pipeline closed before every message was applied")

    def close(self, drain: bool = True) -> None:
        with self._cond:
            self._drain = drain if not self._closed else (self._drain and drain)
            self._closed = True
            self._cond.notify_all()
        self._join()

    def abort(self, reason: str) -> None:
        self._fail(reason)
        self.close(drain=False)

    @property
    def pushed(self) -> int:
        return self._published

    @property
    def applied(self) -> int:
        return self._applied

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def closed(self) -> bool:
        return self._closed

    # ---------------------------------------------------------------- consumer

    def _consume(self) -> None:
        if self._threads > 0:
            torch.set_num_threads(self._threads)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._failed or (self._closed and not self._drain)
                                    or self._popped < self._published or (self._closed and not self._filling))
                if self._failed or (self._closed and not self._drain) or self._popped == self._published:
                    break
                index = self._popped % self._slots
                self._popped += 1
            tensors, meta = self._queue[index]
            self._queue[index] = None
            tensors = [t.to(self._consumer) for t in tensors]
            with self._cond:
                self._released += 1
                self._cond.notify_all()
            try:
                self._apply(tensors, meta)
            except BaseException as err:  # noqa: BLE001 - every failure must reach the producer
                self._fail(f"Pipeline consumer: the update failed: {type(err).__name__}: {err}")
                break
            del tensors
            with self._cond:
                self._applied += 1
                self._cond.notify_all()
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # ----------------------------------------------------------------- helpers

    def _fail(self, reason: str) -> None:
        with self._cond:
            if not self._failed:
                self._failed, self._error = True, reason
            self._cond.notify_all()

    def _raise_if_stopped(self) -> None:
        if self._failed:
            raise PipelineError(self._error)
        if self._closed:
            raise PipelineClosed("pipeline is closed")

    def _join(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("Pipeline: close() or abort() called from inside the consumer's update")
        self._thread.join()
