"""What a message is: its kind and integers (``meta``), and how the consumer
applies one to a curvature object. Shared by the local and the distributed
transports, so both apply a message in exactly the same way as a direct call
of the curvature's own methods would."""

from __future__ import annotations

from collections.abc import Callable

import torch

UPDATE = 0        # tensors [g] or [g, cross], then captures; meta [UPDATE, batch_size, has_cross, captures]
UPDATE_MANY = 1   # tensors [rows] or [rows, cross], then captures;
#                   meta [UPDATE_MANY, per_step (-1: not given, 0, 1), has_cross, captures]
# captures: how many tensors the curvature's own hooks recorded on the
# producer (K-FAC's layer inputs and output gradients), passed back to its update
CALL = 2          # tensors [argument]; meta [CALL, call id, 0]: a request answered by the consumer
CROSS = 3         # tensors as UPDATE / UPDATE_MANY; meta [CROSS, batch_size, 1, 0]: on_cross alone, the
#                   update itself having been applied by the compiled consumer (csrc/pipeline/python_bindings.cpp)


class PipelineError(RuntimeError):
    """The stream failed: an error on the consumer (the original exception is
    the ``__cause__`` where it is known) or on the producer. Every later call
    of the pipeline raises it again; nothing was applied after the failure."""


class PipelineClosed(RuntimeError):
    """A call on a closed pipeline."""


def apply_update(curvature, on_cross: Callable | None, tensors: list[torch.Tensor], meta) -> None:
    """Applies one UPDATE / UPDATE_MANY message on the consumer (of a CROSS
    message only its cross term: the compiled consumer applied the update)."""
    kind, batch_size, has_cross = int(meta[0]), int(meta[1]), bool(meta[2])
    n_captures = int(meta[3]) if len(meta) > 3 else 0
    extra = {"captures": tensors[len(tensors) - n_captures:]} if n_captures else {}
    with torch.no_grad():
        if kind == CROSS:
            pass  # the update itself is applied already
        elif kind == UPDATE:
            curvature.update(tensors[0], batch_size=batch_size, **extra)
        elif kind == UPDATE_MANY:
            # per_step only when the producer gave it: the curvature's own default otherwise
            if batch_size >= 0:
                extra["per_step"] = bool(batch_size)
            curvature.update_many(tensors[0], **extra)
            batch_size = tensors[0].shape[0]
        else:
            raise ValueError(f"Pipeline consumer: unknown message kind {kind}")
        if has_cross:
            on_cross(tensors[1], batch_size)


def check_gradient(dim: int | None, producer: torch.device, grad, batch_size, cross, has_cross_handler: bool):
    """Validates a push before anything is copied: a refused message leaves the
    stream untouched. Returns (kind, batch_size)."""
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
    return (UPDATE if grad.dim() == 1 else UPDATE_MANY), batch_size


def check_solve_argument(dim: int | None, v) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or (dim is not None and v.shape[0] != dim):
        got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"Pipeline.solve: argument 'v' must have shape [{dim}] or [{dim}, m], got {got}")
