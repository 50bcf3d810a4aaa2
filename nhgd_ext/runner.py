"""``run(problem, method)``: the double loop every method shares, timed.

One outer step is ``inner_steps`` calls of ``est.inner_step`` on fresh
mini-batches, then ``est.backward(outer_loss, closure)`` and a plain gradient
step on v (the papers' alpha). Only those two parts are timed; evaluating the
metrics and building the estimator are not (the latter is reported apart as
``setup_seconds``). ``none`` runs the inner loop alone with v as initialized:
training on the data as given.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import estimators as E
from .problems import BilevelProblem

#: method name -> (estimator class, options fixed by the name)
METHODS: dict[str, tuple[type | None, dict[str, Any]]] = {
    "nhgd": (E.NHGD, {}),
    "nhgd-kfac": (E.NHGD, {"curvature": "kfac"}),
    "nhgd-sampled": (E.NHGD, {"fisher": "sampled"}),
    # the paper's own form: each step's batch-mean gradient as one rank-one update
    "nhgd-mean": (E.NHGD, {"per_sample": False}),
    "cg10": (E.ConjugateGradient, {"iters": 10}),
    "cg40": (E.ConjugateGradient, {"iters": 40}),
    "neumann10": (E.Neumann, {"iters": 10}),
    "neumann40": (E.Neumann, {"iters": 40}),
    "stocbio": (E.StocBiO, {}),
    "amigo": (E.AmIGO, {}),
    "ttsa": (E.TTSA, {}),
    "soba": (E.SOBA, {}),
    "aid": (E.SingleLoopAID, {}),
    "itd": (E.SingleLoopITD, {}),
    "broyden": (E.Broyden, {}),
    "none": (None, {}),
}
_COUNTED = re.compile(r"^(cg|neumann)(\d+)$")  # cg25, neumann5, ...: any number of iterations
_REFINED = re.compile(r"^(nhgd(?:-[a-z]+)?)-refine(\d+)$")  # nhgd-refine3, nhgd-kfac-refine2, ...


def method_spec(method: str) -> tuple[type | None, dict[str, Any]]:
    """(estimator class, options) of a method name; for ``<nhgd method>-refineK``
    those of the NHGD method with ``refine=K``."""
    if method in METHODS:
        cls, fixed = METHODS[method]
        return cls, dict(fixed)
    counted = _COUNTED.match(method)
    if counted and int(counted.group(2)) > 0:
        cls = E.ConjugateGradient if counted.group(1) == "cg" else E.Neumann
        return cls, {"iters": int(counted.group(2))}
    refined = _REFINED.match(method)
    if refined and refined.group(1) in METHODS:
        cls, fixed = METHODS[refined.group(1)]
        return cls, {**fixed, "refine": int(refined.group(2))}
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)} "
                     f"(or cgN, neumannN, <nhgd method>-refineK)")


def make_estimator(problem: BilevelProblem, method: str, options: dict[str, Any] | None = None,
                   inner_lr: float | None = None):
    """The estimator ``method`` names, with the problem's options for it,
    then ``options`` on top. ``None`` for ``none``. The NHGD variants
    (``nhgd-mean``, ``nhgd-kfac-refine3``, ...) start from the problem's
    ``nhgd`` options, then their base method's, then their own."""
    cls, fixed = method_spec(method)
    if cls is None:
        return None
    by_name = problem.settings.method_options
    refined = _REFINED.match(method)
    base = refined.group(1) if refined else method
    merged = {}
    if cls is E.NHGD:
        for name in dict.fromkeys(("nhgd", base)):
            merged |= by_name.get(name, {})
    merged |= fixed
    merged |= by_name.get(method, {})
    merged |= options or {}
    model = getattr(problem, "model", None)
    if merged.get("curvature") == "kfac" and model is None:
        raise ValueError(f"method {method!r} needs a problem whose inner parameters belong to a model "
                         f"with nn.Linear layers; {problem.name!r} has none")
    if cls is E.NHGD and model is not None:  # K-FAC's layers, or the dense form's per-sample rows
        merged.setdefault("modules", model)
    merged.setdefault("inner_lr", problem.settings.inner_lr if inner_lr is None else inner_lr)
    return cls(problem.inner_params, problem.outer_params, **merged)


@dataclass
class History:
    """What one run of one method saw, per outer step (step 0: before any)."""

    problem: str
    method: str
    rows: list[dict[str, float]] = field(default_factory=list)
    setup_seconds: float = 0.0
    #: a throwaway first outer step (lazy initialization, kernel caches), not in ``rows``' times
    warmup_seconds: float = 0.0
    peak_memory_bytes: int | None = None
    memory_kind: str = ""

    @property
    def final(self) -> dict[str, float]:
        return self.rows[-1] if self.rows else {}

    def mean_over_last(self, key: str, steps: int) -> float:
        values = [row[key] for row in self.rows[1:][-steps:] if key in row]
        return sum(values) / len(values) if values else float("nan")


def run(problem: BilevelProblem, method: str, *, outer_steps: int | None = None, inner_steps: int | None = None,
        inner_lr: float | None = None, outer_lr: float | None = None, options: dict[str, Any] | None = None,
        seed: int = 0, progress=None) -> History:
    """Runs ``method`` on ``problem`` (from its current v; theta re-initialized)
    and returns its :class:`History`. Settings left ``None`` come from
    ``problem.settings``; ``progress`` is an optional callable(step, row)."""
    settings = problem.settings
    outer_steps = settings.outer_steps if outer_steps is None else outer_steps
    inner_steps = settings.inner_steps if inner_steps is None else inner_steps
    inner_lr = settings.inner_lr if inner_lr is None else inner_lr
    outer_lr = settings.outer_lr if outer_lr is None else outer_lr
    for name, value in (("outer_steps", outer_steps), ("inner_steps", inner_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"run: argument '{name}' must be a positive integer, got {value!r}")
    for name, value in (("inner_lr", inner_lr), ("outer_lr", outer_lr)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"run: argument '{name}' must be > 0, got {value!r}")

    torch.manual_seed(seed)
    device = problem.device
    memory = _PeakMemory(device)
    start = time.perf_counter()
    problem.reset_inner()
    est = make_estimator(problem, method, options, inner_lr)
    history = History(problem=problem.name, method=method, setup_seconds=time.perf_counter() - start)
    inner_opt = torch.optim.SGD(problem.inner_params, lr=inner_lr)
    outer_opt = torch.optim.SGD(problem.outer_params, lr=outer_lr)
    per_sample = est is not None and est.wants_per_sample_rows
    if getattr(est, "fisher", None) == "sampled" and _has_no_outputs(problem):
        raise ValueError(f"method {method!r} draws targets from the model's outputs, and problem "
                         f"{problem.name!r} does not give them (BilevelProblem.inner_loss_and_outputs)")

    def inner_loss():
        return problem.inner_loss_and_outputs(problem.sample_batch(), reduction="none" if per_sample else "mean")

    def closure():
        return problem.inner_loss(problem.sample_batch())

    elapsed = 0.0
    history.rows.append(_evaluate(problem, 0, elapsed))
    for step in range(1, outer_steps + 1):
        _sync(device)
        tick = time.perf_counter()
        for _ in range(inner_steps):
            if est is None:
                inner_opt.zero_grad(set_to_none=True)
                problem.inner_loss(problem.sample_batch()).backward(inputs=problem.inner_params)
                inner_opt.step()
            else:
                loss, outputs = inner_loss()
                est.inner_step(loss, inner_opt, batch_size=_batch_size(problem), outputs=outputs)
        if est is not None:
            outer_opt.zero_grad(set_to_none=True)
            est.backward(problem.outer_loss(), closure)
            outer_opt.step()
            problem.project_outer()
        _sync(device)
        elapsed += time.perf_counter() - tick
        memory.sample()
        history.rows.append(_evaluate(problem, step, elapsed))
        if progress is not None:
            progress(step, history.rows[-1])
    history.peak_memory_bytes, history.memory_kind = memory.peak(), memory.kind
    return history


def _has_no_outputs(problem: BilevelProblem) -> bool:
    return type(problem).inner_loss_and_outputs is BilevelProblem.inner_loss_and_outputs


def _batch_size(problem: BilevelProblem) -> int:
    size = getattr(problem, "batch_size", None)
    return size if isinstance(size, int) and size > 0 else 1


def _evaluate(problem: BilevelProblem, step: int, elapsed: float) -> dict[str, float]:
    with torch.no_grad():
        row = {"step": step, "wall_time": elapsed, "outer_loss": float(problem.outer_loss())}
        row.update(problem.metrics())
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory of a run: the CUDA allocator's peak on a GPU; on the CPU the
    growth of the process's resident set over its value at the start,
    sampled after every outer step (torch's CPU allocator keeps no peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "cuda max_memory_allocated"
        else:
            self.kind = "resident set growth"
            self.base = self.highest = _resident_bytes()

    def sample(self) -> None:
        if self.device.type != "cuda" and self.base is not None:
            self.highest = max(self.highest, _resident_bytes())

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None if self.base is None else self.highest - self.base


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
