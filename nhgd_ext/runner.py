"""``run(problem, method)``: the double loop every method shares, timed.

One outer step is ``inner_steps`` calls of ``est.inner_step`` on fresh
mini-batches, then ``est.backward(outer_loss, closure)`` and a plain gradient
step on v (the papers' alpha). Only those two parts are timed; evaluating the
metrics and building the estimator are not (the latter is reported apart as
``setup_seconds``). ``none`` runs the inner loop alone with v as initialized:
training on the data as given.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import estimators as E
from ._finite import NonFiniteError, refuse_nonfinite
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
PIPELINED = "-pipelined"  # <nhgd method>-pipelined: its curvature updates beside the inner loop


def method_spec(method: str) -> tuple[type | None, dict[str, Any]]:
    """(estimator class, options) of a method name; for ``<nhgd method>-refineK``
    those of the NHGD method with ``refine=K``; for ``<nhgd method>-pipelined``
    those of the NHGD method with ``pipeline=True``."""
    if method.endswith(PIPELINED):
        cls, fixed = method_spec(method[: -len(PIPELINED)])
        if cls is not E.NHGD:
            raise ValueError(f"unknown method {method!r}: only the NHGD methods run pipelined")
        return cls, {**fixed, "pipeline": True}
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
                     f"(or cgN, neumannN, <nhgd method>-refineK, <nhgd method>-pipelined)")


def base_method(method: str) -> str:
    """The method whose problem options a name starts from: ``nhgd-kfac`` for
    ``nhgd-kfac-refine3-pipelined``, the name itself otherwise."""
    method = method.removesuffix(PIPELINED)
    refined = _REFINED.match(method)
    return refined.group(1) if refined else method


def check_method(problem: BilevelProblem | type[BilevelProblem], method: str,
                 options: dict[str, Any] | None = None) -> None:
    """Raises ValueError with a one-line reason where ``method`` is unknown
    or cannot run on ``problem`` (an instance, or a class: then only what the
    class itself declares is checked, before building it)."""
    cls, _ = method_spec(method)
    refusal = problem.unsupported_methods.get(base_method(method))
    if refusal:
        raise ValueError(f"method {method!r} does not fit problem {problem.name!r}: {refusal}")
    if isinstance(problem, type) or cls is None:
        return
    merged = _merged_options(problem, method, options)
    if merged.get("curvature") == "kfac" and problem.model is None:
        raise ValueError(f"method {method!r} needs a problem whose inner parameters belong to a model "
                         f"with nn.Linear or nn.Conv2d layers; {problem.name!r} has none")
    if merged.get("fisher") == "sampled" and _has_no_outputs(problem):
        raise ValueError(f"method {method!r} draws targets from the model's outputs, and problem "
                         f"{problem.name!r} does not give them (BilevelProblem.inner_loss_and_outputs)")


def _merged_options(problem: BilevelProblem, method: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The NHGD variants (``nhgd-mean``, ``nhgd-kfac-refine3``, ...) start
    from the problem's ``nhgd`` options, then their base method's; every
    method then takes the options its name fixes, the problem's for the full
    name, and ``options``."""
    cls, fixed = method_spec(method)
    by_name = problem.settings.method_options
    merged = {}
    for name in dict.fromkeys(("nhgd", base_method(method)) if cls is E.NHGD else ()):
        merged |= by_name.get(name, {})
    return merged | fixed | by_name.get(method, {}) | (options or {})


def make_estimator(problem: BilevelProblem, method: str, options: dict[str, Any] | None = None,
                   inner_lr: float | None = None):
    """The estimator ``method`` names, with the problem's options for it,
    then ``options`` on top (see :func:`_merged_options`). ``None`` for ``none``."""
    check_method(problem, method, options)
    cls, _ = method_spec(method)
    if cls is None:
        return None
    merged = _merged_options(problem, method, options)
    if cls is E.NHGD and problem.model is not None:  # K-FAC's layers, or the dense form's per-sample rows
        merged.setdefault("modules", problem.model)
    merged.setdefault("inner_lr", problem.settings.inner_lr if inner_lr is None else inner_lr)
    return cls(problem.inner_params, problem.outer_params, **merged)


@dataclass
class History:
    """What one run of one method saw, per outer step (step 0: before any).

    A run that diverged (an estimator's :class:`NonFiniteError`, or a NaN
    or infinite outer loss) stops there: ``rows`` hold the finite steps
    before it and ``diverged`` says where and what. A run stopped by Ctrl-C
    holds the steps it finished, and ``interrupted`` is set."""

    problem: str
    method: str
    rows: list[dict[str, float]] = field(default_factory=list)
    setup_seconds: float = 0.0
    #: a throwaway first outer step (lazy initialization, kernel caches), not in ``rows``' times
    warmup_seconds: float = 0.0
    peak_memory_bytes: int | None = None
    memory_kind: str = ""
    #: {"step": the outer step that failed, "quantity": what was not finite, "message": the error}
    diverged: dict[str, Any] | None = None
    interrupted: bool = False

    @property
    def status(self) -> str:
        """finished, diverged or interrupted (see the class)."""
        return "diverged" if self.diverged else "interrupted" if self.interrupted else "finished"

    @property
    def final(self) -> dict[str, float]:
        """The last row (the last finished step), or {}."""
        return self.rows[-1] if self.rows else {}

    def mean_over_last(self, key: str, steps: int) -> float:
        """The mean of ``key`` over the last ``steps`` outer steps (step 0 excluded); NaN where none has it."""
        values = [row[key] for row in self.rows[1:][-steps:] if key in row]
        return sum(values) / len(values) if values else float("nan")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run`: ``history`` holds the steps finished before it."""

    def __init__(self, history: History):
        super().__init__()
        self.history = history


def run(problem: BilevelProblem, method: str, *, outer_steps: int | None = None, inner_steps: int | None = None,
        inner_lr: float | None = None, outer_lr: float | None = None, options: dict[str, Any] | None = None,
        seed: int = 0, progress=None, pipeline: bool = False) -> History:
    """Runs ``method`` on ``problem`` (from its current v; theta re-initialized)
    and returns its :class:`History`. Settings left ``None`` come from
    ``problem.settings``; ``progress`` is an optional callable(step, row).
    A divergence ends the run early and is recorded in ``History.diverged``
    (not raised); Ctrl-C raises :class:`Interrupted` carrying the history so far.

    ``pipeline=True`` (an NHGD method only; the same as the name
    ``<method>-pipelined``) runs the curvature updates beside the inner loop
    (paper Algorithm 2, see :func:`pipeline_options`); the history is then
    that method's ``-pipelined`` twin."""
    if pipeline is not False:
        if pipeline is not True:
            raise ValueError(f"run: argument 'pipeline' must be True or False, got {pipeline!r}")
        if method_spec(method)[0] is not E.NHGD:
            raise ValueError(f"run: argument 'pipeline' is for the NHGD methods, not {method!r}")
        if not method.endswith(PIPELINED):
            method += PIPELINED
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
    options = dict(options or {})
    threads = torch.get_num_threads()
    if method.endswith(PIPELINED):
        threads, options["pipeline"] = pipeline_options(device, options.get("pipeline", True))
    with _intra_op_threads(threads):
        return _run(problem, method, device, outer_steps, inner_steps, inner_lr, outer_lr, options, progress)


def pipeline_options(device: torch.device, given=True) -> tuple[int, dict[str, Any]]:
    """(producer's intra-op threads, Pipeline options) for NHGD pipelined on
    ``device``. On the CPU the consumer thread gets its own share of the
    threads torch uses now and the producer the rest, so that the two do not
    oversubscribe the cores between them; on a GPU the consumer is a second
    stream on the same GPU, or the next GPU where there are several."""
    threads = torch.get_num_threads()
    options = {} if given is True else dict(given)
    if device.type == "cpu":
        consumer_threads = max(1, threads // 2)
        options.setdefault("consumer_threads", consumer_threads)
        threads = max(1, threads - options["consumer_threads"])
    elif device.type == "cuda" and torch.cuda.device_count() > 1:
        index = torch.cuda.current_device() if device.index is None else device.index
        options.setdefault("consumer", torch.device("cuda", (index + 1) % torch.cuda.device_count()))
    return threads, options


@contextlib.contextmanager
def _intra_op_threads(threads: int):
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads != before:
            torch.set_num_threads(before)


def _run(problem, method, device, outer_steps, inner_steps, inner_lr, outer_lr, options, progress) -> History:
    memory = _PeakMemory(device)
    start = time.perf_counter()
    problem.reset_inner()
    est = make_estimator(problem, method, options, inner_lr)
    history = History(problem=problem.name, method=method, setup_seconds=time.perf_counter() - start)
    inner_opt = torch.optim.SGD(problem.inner_params, lr=inner_lr)
    outer_opt = torch.optim.SGD(problem.outer_params, lr=outer_lr)
    per_sample = est is not None and est.wants_per_sample_rows

    def inner_loss():
        return problem.inner_loss_and_outputs(problem.sample_batch(), reduction="none" if per_sample else "mean")

    def closure():
        return problem.inner_loss(problem.sample_batch())

    with contextlib.ExitStack() as cleanup:
        if hasattr(est, "close"):  # hooks off the model, a pipeline's consumer stopped
            cleanup.callback(est.close)
        elapsed = 0.0
        try:
            history.rows.append(_evaluate(problem, 0, elapsed))
            for step in range(1, outer_steps + 1):
                _sync(device)
                tick = time.perf_counter()
                try:
                    _outer_step(problem, est, inner_opt, outer_opt, inner_steps, inner_loss, closure)
                except NonFiniteError as err:
                    history.diverged = {"step": step, "quantity": err.quantity, "message": str(err)}
                    break
                _sync(device)
                elapsed += time.perf_counter() - tick
                memory.sample()
                row = _evaluate(problem, step, elapsed)
                if not math.isfinite(row["outer_loss"]):
                    history.diverged = {"step": step, "quantity": "the outer loss",
                                        "message": f"the outer loss is {row['outer_loss']} after step {step}"}
                    break
                history.rows.append(row)
                if progress is not None:
                    progress(step, row)
        except KeyboardInterrupt:
            history.interrupted = True
            history.peak_memory_bytes, history.memory_kind = memory.peak(), memory.kind
            raise Interrupted(history) from None
    history.peak_memory_bytes, history.memory_kind = memory.peak(), memory.kind
    return history


def _outer_step(problem, est, inner_opt, outer_opt, inner_steps, inner_loss, closure) -> None:
    """``inner_steps`` inner steps and, with an estimator, one outer step.
    Raises NonFiniteError (from the estimator, or for ``none`` from its own
    check of the inner loss) where the run diverged."""
    for _ in range(inner_steps):
        if est is None:
            inner_opt.zero_grad(set_to_none=True)
            loss = problem.inner_loss(problem.sample_batch())
            refuse_nonfinite("inner step", [loss.detach()], ["the inner loss"], "theta is unchanged")
            loss.backward(inputs=problem.inner_params)
            inner_opt.step()
        else:
            loss, outputs = inner_loss()
            est.inner_step(loss, inner_opt, batch_size=_batch_size(problem, loss, outputs), outputs=outputs)
    if est is not None:
        outer_opt.zero_grad(set_to_none=True)
        est.backward(problem.outer_loss(), closure)
        outer_opt.step()
        problem.project_outer()


def _has_no_outputs(problem: BilevelProblem) -> bool:
    return type(problem).inner_loss_and_outputs is BilevelProblem.inner_loss_and_outputs


def _batch_size(problem: BilevelProblem, loss: torch.Tensor, outputs: torch.Tensor | None) -> int | None:
    """What the runner tells ``inner_step``: nothing where the loss (per
    sample) or the outputs (one row per sample) say it; else the problem's
    batch size, or 1 for a problem without batches."""
    if loss.dim() == 1 or outputs is not None:
        return None
    size = getattr(problem, "batch_size", None)
    return size if isinstance(size, int) and size > 0 else 1


def _evaluate(problem: BilevelProblem, step: int, elapsed: float) -> dict[str, float]:
    """The outer loss and the problem's metrics; the metrics only where the
    outer loss is finite (metrics of diverged parameters mean nothing)."""
    with torch.no_grad():
        row = {"step": step, "wall_time": elapsed, "outer_loss": float(problem.outer_loss())}
        if math.isfinite(row["outer_loss"]):
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
