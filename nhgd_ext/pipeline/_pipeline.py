"""Pipeline: the curvature updates run beside the inner loop (paper Algorithm 2).

The producer (the inner loop) pushes each step's gradient and goes on; a
consumer thread (C++, csrc/pipeline/) applies them, in order, to the
curvature on the consumer's device and stream. ``flush`` waits for every
pushed update, ``solve`` runs on the consumer after them. The result is that
of calling the curvature's own ``update``/``update_many`` on the same
gradients in the same order: the consumer calls exactly those methods (for a
curvature with a ``compiled_core``, DenseEFIM's, the C++ methods behind them,
without taking the GIL).

A Pipeline also has the curvature's interface (``update``, ``update_many``,
``solve``, ``reset``, ``state_dict``, ``num_updates``, ...), so an estimator
that keeps a curvature object can be given a Pipeline instead.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable

import torch

from .. import _build
from .._devices import checked_device
from .._finite import NonFiniteError
from . import _python_engine
from ._messages import (
    CALL,
    UPDATE,
    UPDATE_MANY,
    Message,
    PipelineClosed,
    PipelineError,
    apply_update,
    check_gradient,
    check_solve_argument,
)

_open_pipelines: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # The consumer thread may need the GIL to finish a message; it must not be
    # left waiting for it while the interpreter shuts down.
    for pipeline in list(_open_pipelines):
        pipeline._shutdown(drain=False)


def engine_kind() -> str:
    """Which engine ``Pipeline(..., engine="auto")`` uses here, in the words of
    :func:`nhgd_ext.backend`: ``"cpp"`` (the C++ ring buffer and consumer
    thread) or ``"reference"`` (the pure-Python one, where the extension is
    not compiled)."""
    module = _build.native_module()
    return "cpp" if module is not None and hasattr(module, "PipelineEngine") else "reference"


def _make_engine(kind: str, side: _ConsumerSide, slots: int, producer: torch.device, consumer: torch.device,
                 consumer_threads: int):
    if kind == "auto":
        kind = engine_kind()
        if kind == "cpp" and "cuda" in (producer.type, consumer.type) and not _build.compiled_with_cuda():
            kind = "reference"  # a CPU-only build of the extension has no CUDA route
    if kind == "cpp":
        if engine_kind() != "cpp":
            raise ValueError("Pipeline: engine='cpp' but the compiled extension is not loaded "
                             f"(nhgd_ext.backend() = {_build.backend()!r})")
        # A compiled curvature is updated by the consumer thread itself, without the GIL.
        native = getattr(side.curvature, "compiled_core", None)
        return _build.native_module().PipelineEngine(side.apply, slots, str(producer), str(consumer),
                                                     consumer_threads, native, side.native_failed)
    if kind == "reference":
        return _python_engine.PythonEngine(side.apply, slots, str(producer), str(consumer), consumer_threads)
    raise ValueError(f"Pipeline: argument 'engine' must be 'auto', 'cpp' or 'reference', got {kind!r}")


class _ConsumerSide:
    """What the consumer thread runs, apart from the Pipeline object: the
    engine holds this, not the Pipeline, so no reference cycle keeps a dropped
    Pipeline alive until a garbage collection that might run on the consumer
    thread itself (which cannot join itself)."""

    def __init__(self, curvature, on_cross, remote):
        self.curvature, self.on_cross, self.remote = curvature, on_cross, remote
        self.calls: dict[int, tuple] = {}
        self.results: dict[int, object] = {}
        self.exception: BaseException | None = None
        # messages pushed (counted by the producer) and handled here: a remote
        # link batches its sends while more messages wait behind the current one
        self.published = self.handled = 0

    def native_failed(self, kind: str, message: str) -> None:
        """The compiled consumer's update raised: keep an exception of the
        same Python type to chain to the PipelineError, as for a Python one."""
        self.exception = (ValueError if kind == "ValueError" else RuntimeError)(message)

    def apply(self, tensors, meta) -> None:
        try:
            message = Message.decode(meta)
            if message.kind == CALL:
                what, argument = self.calls[message.call_id]
                argument = tensors[0] if what == "solve" else argument
                if self.remote is not None:
                    self.results[message.call_id] = self.remote.request(what, argument)
                else:
                    try:
                        self.results[message.call_id] = self._run_local(what, argument)
                    except NonFiniteError as refused:
                        # the curvature refused and changed nothing: the refusal is the
                        # request's result (raised to the caller), and the stream goes on
                        self.results[message.call_id] = refused
            elif self.remote is not None:
                self.remote.send_update(tensors, message, more_queued=self.published - self.handled > 1)
            else:
                apply_update(self.curvature, self.on_cross, tensors, message)
        except BaseException as err:
            self.exception = err
            raise
        self.handled += 1

    def _run_local(self, what: str, argument):
        c = self.curvature
        with torch.no_grad():
            if what == "solve":
                return c.solve(argument)
            if what == "reset":
                return c.reset()
            if what == "state_dict":
                return c.state_dict()
            if what == "load_state_dict":
                return c.load_state_dict(argument)
            if what == "num_updates":
                return int(c.num_updates)
            if what == "inverse":
                return c.inverse.clone()
        raise ValueError(f"Pipeline: unknown request {what!r}")


class Pipeline:
    """Runs ``curvature``'s updates on a consumer thread beside the producer.

    Args:
        curvature: the object updated (``update(g, batch_size)``,
            ``update_many(rows)``, ``solve(v)``; e.g. :class:`~nhgd_ext.curvature.DenseEFIM`).
            One that records its own inputs on the producer (``take_captures()``,
            :class:`~nhgd_ext.curvature.KFAC`'s hooks) has them taken at each
            push and handed back to its update (``captures=``) on the consumer.
            It must live on ``consumer``. For ``transport="distributed"`` it
            lives in the consumer process (see :func:`serve`): pass ``None``.
        recorder: what records each step's inputs on the producer, if not the
            curvature itself: for ``transport="distributed"`` with a K-FAC
            consumer, a :class:`~nhgd_ext.curvature.KFAC` over the producer's
            model (only its hooks are used: ``take_captures()``, ``paused()``).
        producer, consumer: devices of the pushed gradients and of the curvature.
        slots: messages that may wait for the consumer; ``push`` blocks only
            while all of them are full. Enough slots absorb the consumer's
            longer updates (a DenseEFIM fold, every 16 rows, takes a few
            updates' time).
        transport: ``"local"`` (a consumer thread in this process) or
            ``"distributed"`` (a consumer process reached by ``torch.distributed``;
            then ``consumer_rank`` and ``group`` say where).
        on_cross: ``fn(cross, batch_size)``, run on the consumer after the
            update of every message pushed with ``cross=`` (e.g. a running
            average of cross derivatives, paper Eq. 3.3).
        consumer_threads: intra-op threads of the consumer thread (0: torch's default).
        engine: ``"auto"`` (:func:`engine_kind`), ``"cpp"`` (the C++ ring
            buffer and consumer thread) or ``"reference"`` (pure Python).
        dim: the gradient length, when the curvature has no ``dim`` attribute.
    """

    def __init__(self, curvature=None, *, producer="cpu", consumer="cpu", slots: int = 8, transport: str = "local",
                 on_cross: Callable | None = None, consumer_threads: int = 0, engine: str = "auto",
                 dim: int | None = None, consumer_rank: int = 1, group=None, recorder=None):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"Pipeline: argument 'slots' must be a positive integer, got {slots!r}")
        if isinstance(consumer_threads, bool) or not isinstance(consumer_threads, int) or consumer_threads < 0:
            raise ValueError(f"Pipeline: argument 'consumer_threads' must be an integer >= 0, got {consumer_threads!r}")
        if on_cross is not None and not callable(on_cross):
            raise ValueError("Pipeline: argument 'on_cross' must be callable or None")
        if recorder is not None and not callable(getattr(recorder, "take_captures", None)):
            raise ValueError(f"Pipeline: argument 'recorder' must have take_captures(); "
                             f"{type(recorder).__name__} has not")
        self.producer = checked_device(producer, "Pipeline: argument 'producer'")
        self.transport = transport
        self._lock = threading.RLock()  # one request (flush + solve, ...) at a time
        self._ids = itertools.count()
        self._reported = False
        self._engine = None
        self._recorder = recorder if recorder is not None else curvature
        # what records each step's pass (K-FAC's hooks), looked up once: push is the hot path
        self._take_captures = getattr(self._recorder, "take_captures", None)
        self._check_wire = None  # distributed: refuses at push what the wire cannot carry
        if transport == "local":
            if curvature is None:
                raise ValueError("Pipeline: argument 'curvature' is required with transport='local'")
            self._check_curvature(curvature)
            self.consumer = checked_device(consumer, "Pipeline: argument 'consumer'")
            self.curvature, self.on_cross = curvature, on_cross
            self.dim = dim if dim is not None else getattr(curvature, "dim", None)
            self._has_cross_handler = on_cross is not None
            self._side = _ConsumerSide(curvature, on_cross, None)
            engine_consumer = self.consumer
        elif transport == "distributed":
            from .distributed import RemoteConsumer, check_wire_tensors

            if curvature is not None:
                raise ValueError("Pipeline: with transport='distributed' the curvature lives in the consumer "
                                 "process (nhgd_ext.pipeline.serve); pass curvature=None")
            if on_cross is not None:
                raise ValueError("Pipeline: with transport='distributed' give on_cross to serve() in the consumer process")
            self.curvature, self.on_cross = None, None
            self._remote = RemoteConsumer(self.producer, consumer_rank, group)
            self._check_wire = check_wire_tensors
            self.consumer = self._remote.consumer_device
            self.dim, self._has_cross_handler = self._remote.dim, self._remote.has_cross_handler
            self._side = _ConsumerSide(None, None, self._remote)
            engine_consumer = self._remote.sender_device
        else:
            raise ValueError(f"Pipeline: argument 'transport' must be 'local' or 'distributed', got {transport!r}")
        self._engine = _make_engine(engine, self._side, slots, self.producer, engine_consumer, consumer_threads)
        self.engine = "reference" if isinstance(self._engine, _python_engine.PythonEngine) else "cpp"
        self.slots = slots
        _open_pipelines.add(self)

    @staticmethod
    def _check_curvature(curvature) -> None:
        missing = [m for m in ("update", "update_many", "solve") if not callable(getattr(curvature, m, None))]
        if missing:
            raise ValueError(f"Pipeline: argument 'curvature' must have update, update_many and solve; "
                             f"{type(curvature).__name__} lacks {', '.join(missing)}")

    # -------------------------------------------------------------- producer

    @property
    def route(self) -> str:
        """How messages travel: "host", "pinned-host", "cuda-streams", "peer" or "python-thread"."""
        return self._engine.route

    def push(self, grad: torch.Tensor, *, batch_size: int = 1, cross: torch.Tensor | None = None,
             per_step: bool | None = None) -> None:
        """Queues one update: ``grad`` is a flat gradient ([d], the mean over
        ``batch_size`` samples; applied as ``curvature.update(grad,
        batch_size=...)``) or per-sample rows ([k, d]; applied as
        ``curvature.update_many(rows, per_step=...)``, ``per_step`` passed
        only when given); ``cross`` an optional cross-derivative for
        ``on_cross``. Copies them (reuse them at once) and returns; blocks
        only while every slot is full."""
        check_gradient(self.dim, self.producer, grad, batch_size, cross, self._has_cross_handler)
        if per_step is not None and grad.dim() != 2:
            raise ValueError("Pipeline.push: argument 'per_step' is for per-sample rows ([k, d]) only")
        tensors = [grad.detach()] if cross is None else [grad.detach(), cross.detach()]
        if self._check_wire is not None:
            self._check_wire("grad", tensors[:1])
            self._check_wire("cross", tensors[1:])
        # What the hooks recorded of this step's pass (K-FAC), taken here on
        # the producer so the next step's pass cannot overwrite it.
        captures = self._take_captures() if self._take_captures is not None else []
        if self._check_wire is not None:
            self._check_wire("recorder", captures)
        message = Message(UPDATE if grad.dim() == 1 else UPDATE_MANY, batch_size=batch_size,
                          per_step=None if per_step is None else bool(per_step), has_cross=cross is not None,
                          captures=len(captures))
        self._push_message(tensors + captures, message)

    def flush(self) -> None:
        """Waits until every message pushed so far has been applied (on a GPU,
        the calling thread's current streams on the producer's and the
        consumer's device then wait for the consumer's stream)."""
        self._engine_call(self._engine.flush)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """inverse @ v after every pushed update, computed on the consumer;
        returned on ``v``'s device."""
        check_solve_argument(self.dim, v)
        return self._request("solve", v.detach()).to(v.device)

    def close(self, drain: bool = True) -> None:
        """Stops the consumer after applying what is queued (``drain=False``:
        what is queued is discarded). Raises the stream's error, if it failed
        and no call has reported it yet. Safe to call again."""
        if self._engine is None:
            return
        self._shutdown(drain)
        if self._engine.error is not None and not self._reported:
            self._reported = True
            raise self._failure()

    def abort(self, reason: str = "the producer aborted") -> None:
        """Fails the stream from the producer's side: the consumer stops
        without applying what is queued (a remote consumer's serve() raises)."""
        if self._engine is None:
            return
        self._engine.abort(reason)
        if self.transport == "distributed":
            self._remote.send_abort(reason)
        _open_pipelines.discard(self)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(f"the producer raised {type(exc).__name__}: {exc}")
            return
        self.close()

    def __del__(self):
        try:
            self._shutdown(drain=False)
        except Exception:  # noqa: BLE001 - nothing may escape a finalizer
            pass

    # --------------------------------------------- the curvature's interface

    def update(self, g: torch.Tensor, batch_size: int = 1, *, cross: torch.Tensor | None = None) -> None:
        """Queues ``curvature.update(g, batch_size)`` (with a cross term for ``on_cross``); returns at once."""
        self.push(g, batch_size=batch_size, cross=cross)

    def update_many(self, rows: torch.Tensor, *, per_step: bool | None = None, cross: torch.Tensor | None = None) -> None:
        """Queues ``curvature.update_many(rows, ...)``; returns at once."""
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
            got = list(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"Pipeline.update_many: argument 'rows' must have shape [k, d], got {got}")
        self.push(rows, cross=cross, per_step=per_step)

    def paused(self):
        """The recorder's ``paused()`` (K-FAC: its hooks record nothing inside)."""
        paused = getattr(self._recorder, "paused", None)
        return paused() if paused is not None else contextlib.nullcontext()

    @property
    def takes_rows(self) -> bool:
        """Whether the curvature uses per-sample rows (NHGD asks)."""
        if self.curvature is None:
            return self._remote.takes_rows
        return getattr(self.curvature, "takes_rows", True)

    def reset(self) -> None:
        """``curvature.reset()`` on the consumer, after everything queued."""
        self._request("reset", None)

    def state_dict(self) -> dict:
        """``curvature.state_dict()`` on the consumer, after everything queued."""
        return self._request("state_dict", None)

    def load_state_dict(self, state: dict) -> None:
        """``curvature.load_state_dict(state)`` on the consumer, after everything queued."""
        self._request("load_state_dict", state)

    @property
    def num_updates(self) -> int:
        """The curvature's update count, after every pushed message."""
        return self._request("num_updates", None)

    @property
    def num_messages(self) -> int:
        """Messages applied so far (does not wait)."""
        return self._engine.applied

    @property
    def inverse(self) -> torch.Tensor:
        """A copy of ``curvature.inverse``, read on the consumer after everything queued."""
        return self._request("inverse", None)

    @property
    def dtype(self):
        """The curvature's dtype."""
        return getattr(self.curvature, "dtype", None) if self.curvature is not None else self._remote.dtype

    @property
    def device(self) -> torch.device:
        """Where the curvature lives (the consumer)."""
        return self.consumer

    # ------------------------------------------------------------ internals

    def _request(self, what: str, argument):
        """Runs `what` on the consumer after every pushed message; returns its result."""
        with self._lock:
            call_id = next(self._ids)
            tensor = argument if isinstance(argument, torch.Tensor) else torch.zeros(1, device=self.producer)
            self._side.calls[call_id] = (what, argument)
            try:
                self._push_message([tensor], Message(CALL, call_id=call_id))
                self._engine_call(self._engine.flush)
            finally:
                self._side.calls.pop(call_id, None)
            result = self._side.results.pop(call_id)
        if isinstance(result, NonFiniteError):
            raise result
        if isinstance(result, torch.Tensor) and result.is_cuda:
            # Made on the consumer's stream, used on the producer's from now on.
            result.record_stream(torch.cuda.current_stream(result.device))
        return result

    def _push_message(self, tensors, message: Message) -> None:
        self._engine_call(self._engine.push, tensors, message.encode())
        self._side.published += 1

    def _engine_call(self, fn, *args):
        if self._engine is None:
            raise PipelineClosed("Pipeline: the pipeline was never opened")
        try:
            return fn(*args)
        except PipelineError:
            self._reported = True
            raise self._failure() from self._side.exception
        except PipelineClosed:
            if self._engine.error is not None:
                self._reported = True
                raise self._failure() from self._side.exception
            raise PipelineClosed("Pipeline: the pipeline is closed") from None

    def _failure(self) -> PipelineError:
        err = PipelineError(self._engine.error)
        err.__cause__ = self._side.exception
        return err

    def _shutdown(self, drain: bool) -> None:
        engine = self._engine
        if engine is None:
            return
        if self.transport == "distributed" and drain and not engine.closed and engine.error is None:
            try:  # tells the consumer process to stop, after everything queued
                self._request("close", None)
            except (PipelineError, PipelineClosed):
                pass  # recorded in engine.error, reported by close()
        try:
            engine.close(drain)
        finally:
            _open_pipelines.discard(self)
        if self.transport == "distributed":
            self._remote.finish(failed=engine.error is not None)
