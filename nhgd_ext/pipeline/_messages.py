"""The stream's vocabulary: what a message is (:class:`Message`), the two
ways a stream stops (:class:`PipelineError`, :class:`PipelineClosed`), how
the consumer applies a message to a curvature object, and the checks of a
push. Shared by both engines and both transports, so every route applies a
message exactly as a direct call of the curvature's own methods would."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

UPDATE, UPDATE_MANY, CALL, CROSS_ONLY = 0, 1, 2, 3  # Message.kind (csrc/pipeline/python_bindings.cpp agrees)


@dataclass(slots=True)  # not frozen: slower to build, and one is built per push
class Message:
    """One message of the stream, whatever carries it.

    Kinds:
        UPDATE: tensors [g] (+ [cross]) + captures; ``curvature.update(g, batch_size)``.
        UPDATE_MANY: tensors [rows] (+ [cross]) + captures;
            ``curvature.update_many(rows, per_step=...)``, ``per_step`` passed only when given.
        CALL: tensors [argument]; the request ``call_id`` of the producer, answered by the consumer.
        CROSS_ONLY: what is left of an update the compiled consumer applied by
            itself: ``on_cross(cross, batch_size)`` alone (tensors [g or rows, cross]).

    ``captures``: how many trailing tensors the curvature's own hooks recorded
    on the producer (K-FAC's layer inputs and output gradients), handed back
    to its update. The engines carry a message as four integers
    (:meth:`encode`): [kind, batch size | per_step (-1: not given, 0, 1) |
    call id, has_cross, captures]; the compiled consumer reads that layout.
    """

    kind: int
    batch_size: int = 1
    per_step: bool | None = None
    call_id: int = 0
    has_cross: bool = False
    captures: int = 0

    def encode(self) -> list[int]:
        if self.kind == UPDATE_MANY:
            second = -1 if self.per_step is None else int(self.per_step)
        else:
            second = self.call_id if self.kind == CALL else self.batch_size
        return [self.kind, second, int(self.has_cross), self.captures]

    @classmethod
    def decode(cls, meta) -> Message:
        kind, second, has_cross = int(meta[0]), int(meta[1]), bool(meta[2])
        captures = int(meta[3]) if len(meta) > 3 else 0
        if kind == UPDATE_MANY:
            return cls(kind, per_step=None if second < 0 else bool(second), has_cross=has_cross, captures=captures)
        if kind == CALL:
            return cls(kind, call_id=second)
        if kind in (UPDATE, CROSS_ONLY):
            return cls(kind, batch_size=second, has_cross=has_cross, captures=captures)
        raise ValueError(f"Pipeline consumer: unknown message kind {kind}")


class PipelineError(RuntimeError):
    """The stream failed: an error on the consumer (the original exception is
    the ``__cause__`` where it is known) or on the producer. Every later call
    of the pipeline raises it again; nothing was applied after the failure.
    Both engines raise it (the compiled one translates its C++ twin)."""


class PipelineClosed(RuntimeError):
    """A call on a closed pipeline (both engines raise it)."""


def apply_update(curvature, on_cross: Callable | None, tensors: list[torch.Tensor], message: Message) -> None:
    """Applies one UPDATE / UPDATE_MANY / CROSS_ONLY message on the consumer."""
    extra = {"captures": tensors[len(tensors) - message.captures:]} if message.captures else {}
    batch_size = message.batch_size
    with torch.no_grad():
        if message.kind == UPDATE:
            curvature.update(tensors[0], batch_size=batch_size, **extra)
        elif message.kind == UPDATE_MANY:
            if message.per_step is not None:  # else the curvature's own default
                extra["per_step"] = message.per_step
            curvature.update_many(tensors[0], **extra)
            batch_size = tensors[0].shape[0]
        elif message.kind != CROSS_ONLY:
            raise ValueError(f"Pipeline consumer: message kind {message.kind} is not an update")
        if message.has_cross:
            on_cross(tensors[1], batch_size)


def check_gradient(dim: int | None, producer: torch.device, grad, batch_size, cross, has_cross_handler: bool):
    """Validates a push before anything is copied: a refused message leaves the
    stream untouched."""
    if not isinstance(grad, torch.Tensor):
        raise ValueError(f"Pipeline.push: argument 'grad' must be a tensor, got {type(grad).__name__}")
    if not grad.is_floating_point():
        raise ValueError(f"Pipeline.push: argument 'grad' must be a floating-point tensor, got {grad.dtype}")
    if grad.device != producer:
        raise ValueError(f"Pipeline.push: argument 'grad' must be on the producer device {producer}, got {grad.device}")
    if grad.dim() not in (1, 2) or grad.numel() == 0 or (dim is not None and grad.shape[-1] != dim):
        want = "[d] or [k, d]" if dim is None else f"[{dim}] (one gradient) or [k, {dim}] (k per-sample rows)"
        raise ValueError(f"Pipeline.push: argument 'grad' must have shape {want}, got {list(grad.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Pipeline.push: argument 'batch_size' must be a positive integer, got {batch_size!r}")
    if grad.dim() == 2 and batch_size != 1:
        raise ValueError("Pipeline.push: argument 'batch_size' must be 1 with per-sample rows (each row is one sample)")
    if cross is not None:
        if not has_cross_handler:
            raise ValueError("Pipeline.push: argument 'cross' needs a consumer that handles it "
                             "(Pipeline(..., on_cross=fn) or serve(..., on_cross=fn))")
        if not isinstance(cross, torch.Tensor) or not cross.is_floating_point() or cross.numel() == 0:
            raise ValueError("Pipeline.push: argument 'cross' must be a non-empty floating-point tensor or None")
        if cross.device != producer:
            raise ValueError(f"Pipeline.push: argument 'cross' must be on the producer device {producer}, got {cross.device}")


def check_solve_argument(dim: int | None, v) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or (dim is not None and v.shape[0] != dim):
        got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"Pipeline.solve: argument 'v' must have shape [{dim}] or [{dim}, m], got {got}")
