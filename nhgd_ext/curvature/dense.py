"""DenseEFIM: the empirical Fisher of a parameter vector, solved with the
damping exactly as given.

With x the scaled gradients fed so far (one per sample), F is their running
average (``beta=None``, paper Eq. 3.2) or their exponential moving average
(factor ``beta``, paper App. E), both starting from F = 0, and

    solve(v) = (F + damping I)^-1 v

at every step, to the precision of the state's dtype. Two representations
hold F; ``representation="auto"`` picks by cost, and either can be forced.

``"compact"`` (``_compact.py``): the rows that still carry weight, solved
through the Woodbury identity with an r x r core: O(r d) memory and work.
Under an EMA of batch-mean gradients (the paper's own form: one row per
step, a window of a few hundred rows whatever d) this is the cheap exact
form.

``"dense"``: F itself (float64, d x d) and the inverse of a damped matrix,
``inverse_kept = (F + mu I)^-1``, updated in place by the fused
Sherman-Morrison (one row) and Woodbury (k rows) kernels. Every update
scales the damped matrix by some a < 1, so mu decays with it; ``solve``
restores the exact damping by preconditioned conjugate gradients on
(F + damping I) w = v with the kept inverse as the preconditioner, whose
eigenvalues then lie in [1, damping / mu]. When mu would fall below
``refresh_below * damping`` the update only reaches F and the inverse goes
stale (mu = 0): the next solve rebuilds it exactly from F (float64
Cholesky). So the in-place updates never factorize; a solve does, at most
once, and only after the damping has decayed by ``refresh_below`` (a
running average: each time the sample count has grown fourfold).

A step of k >= 2 rows (per-sample gradients) goes in place only while that
is cheaper than factorizing once per solve: a Woodbury update of k rows
costs about 4 k d^2, adding them to F k d^2, a factorization d^3 / 3, so in
place pays while k < d / (9 T), T the steps between solves (learnt from
the solves seen; 10 until the first). A larger step is added to F, and
F + damping I is factorized (Cholesky, no explicit inverse): by the step
itself where that costs at most twice its Gram update (d <= 3 k), so the
solve after the inner loop finds it ready, else by the next solve. A single
row always goes in place (the fused Sherman-Morrison kernel). Every
factorization is counted in ``num_refreshes``.

The auto rule: compact while the rows it keeps number at most d / 2 (then
its Gram upkeep, r d per row, stays below the dense form's d^2 per row and
its core holds at most a quarter of d^2 entries), dense beyond. A running
average keeps every row, so it starts compact and turns dense once; an EMA
stays compact wherever its window is small against d.

The dense state and update rules live in a core object: the compiled
``DenseEFIMCore`` (csrc/curvature/dense_efim.cpp) wherever the extension is
built, so that a Pipeline's consumer thread applies updates without taking
the GIL from the training loop; the pure-PyTorch one in _dense_reference.py
with the reference operators.
"""

from __future__ import annotations

import math

import torch

from .. import _build, ops
from .._finite import NonFiniteError, first_nonfinite
from ._compact import CompactCore
from ._dense_reference import DenseEFIMCore as _ReferenceCore
from ._dense_reference import checked_rows, cholesky_solve

_DENSE_STATE_KEYS = ("inverse", "pending", "fisher")
_DENSE_COUNTER_KEYS = ("num_updates", "num_samples", "num_refreshes", "mu")
_REPRESENTATIONS = ("auto", "dense", "compact")
#: PCG stops once the preconditioned residual is this small against the
#: right-hand side (float64 state; float32 results are rounded anyway)
_SOLVE_TOL = {torch.float64: 1e-13, torch.float32: 1e-8}
_MAX_PCG_STEPS = 60  # far beyond what eigenvalues in [1, 1 / refresh_below] need


def _make_dense_core(dim, beta, damping, refresh_below, dtype, device):
    status = ops.device_status(device)  # where the CUDA kernels count skipped updates
    module = _build.native_module()
    if module is not None and _build.backend(device) != "reference":
        return module.DenseEFIMCore(dim, beta, damping, refresh_below, dtype, device, status)
    return _ReferenceCore(dim, beta, damping, refresh_below, dtype, device, status)


class DenseEFIM:
    """Empirical Fisher of a ``dim``-dimensional parameter vector, solved exactly.

    Args:
        dim: number of parameters d.
        beta: EMA factor in (0, 1), or ``None`` for the running average.
        damping: lambda > 0: ``solve`` returns (F + lambda I)^-1 v for this lambda.
        representation: ``"auto"`` (by cost, see the module docstring),
            ``"dense"`` or ``"compact"``.
        refresh_below: dense form: the in-place updates stop, and the next
            solve rebuilds the inverse, once its damping has decayed below
            this fraction of ``damping`` (0 < refresh_below < 1).
        window_tol: compact form: a row is dropped once weight * |x|^2 <
            window_tol * damping (the error this allows is ``truncation``).
        dtype, device: of the state and of the solve's result (float32 or
            float64; the compact form and F are float64 whatever it is).
    """

    def __init__(self, dim: int, *, beta: float | None = None, damping: float = 1e-3,
                 representation: str = "auto", refresh_below: float = 0.25, window_tol: float = 1e-12,
                 dtype: torch.dtype = torch.float32, device=None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"DenseEFIM: argument 'dim' must be a positive integer, got {dim!r}")
        if beta is not None and not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
            raise ValueError(f"DenseEFIM: argument 'beta' must be None or lie in (0, 1), got {beta!r}")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
            raise ValueError(f"DenseEFIM: argument 'damping' must be a finite number > 0, got {damping!r}")
        if representation not in _REPRESENTATIONS:
            raise ValueError(f"DenseEFIM: argument 'representation' must be one of "
                             f"{', '.join(map(repr, _REPRESENTATIONS))}, got {representation!r}")
        if not (isinstance(refresh_below, (int, float)) and 0.0 < refresh_below < 1.0):
            raise ValueError(f"DenseEFIM: argument 'refresh_below' must lie in (0, 1), got {refresh_below!r}")
        if not (isinstance(window_tol, (int, float)) and 0.0 <= window_tol < 1.0):
            raise ValueError(f"DenseEFIM: argument 'window_tol' must lie in [0, 1), got {window_tol!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"DenseEFIM: argument 'dtype' must be torch.float32 or torch.float64, got {dtype}")
        self.dim, self.beta, self.damping = dim, None if beta is None else float(beta), float(damping)
        self.requested_representation = representation
        self.refresh_below, self.window_tol = float(refresh_below), float(window_tol)
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        self._core = self._new_core("dense" if representation == "dense" else "compact")

    _updates_at_solve = 0  # the dense core's num_updates at the last solve

    def _new_core(self, kind: str):
        if kind == "compact":
            return CompactCore(self.dim, self.beta, self.damping, self.window_tol, self.dtype, self.device)
        return _make_dense_core(self.dim, self.beta, self.damping, self.refresh_below, self.dtype, self.device)

    @property
    def representation(self) -> str:
        """The form F is held in now: ``"compact"`` or ``"dense"``."""
        return "compact" if isinstance(self._core, CompactCore) else "dense"

    @property
    def compiled_core(self):
        """The compiled object holding a dense state (``None`` for the compact
        form or the reference operators): a Pipeline's consumer thread
        updates it without the GIL."""
        core = self._core
        return None if isinstance(core, (CompactCore, _ReferenceCore)) else core

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Back to no samples: F = 0, in the representation it started in."""
        self._updates_at_solve = 0
        if self.requested_representation == "auto" and self.representation == "dense":
            self._core = self._new_core("compact")
        else:
            self._core.reset()

    num_updates = property(lambda self: self._core.num_updates, doc="calls of update / update_many")
    num_samples = property(lambda self: self._core.num_samples, doc="gradients (rows) fed")
    num_refreshes = property(lambda self: self._core.num_refreshes,
                             doc="factorizations of the dense form (see the module docstring)")
    mu = property(lambda self: self._core.mu,
                  doc="the damping the dense form's kept inverse includes (0: stale); the compact form's is damping")

    @property
    def rank(self) -> int | None:
        """Rows the compact form keeps (``None`` in the dense form)."""
        return self._core.rank if isinstance(self._core, CompactCore) else None

    @property
    def truncation(self) -> float:
        """A bound on |F - F_kept| (2-norm) from the rows the compact form dropped."""
        return self._core.truncation if isinstance(self._core, CompactCore) else 0.0

    def _config(self) -> dict:
        return {"dim": self.dim, "beta": self.beta, "damping": self.damping,
                "representation": self.requested_representation, "refresh_below": self.refresh_below,
                "window_tol": self.window_tol}

    def state_dict(self) -> dict:
        """F (or the compact form's rows and weights), the inverse as kept, the counters and the settings; a round trip resumes bit for bit."""
        core = self._core
        if isinstance(core, CompactCore):
            state = core.state()
        else:
            core.fold()  # fisher becomes F itself (rows added, scale applied): the copy needs no buffer
            state = {k: getattr(core, k).clone() for k in _DENSE_STATE_KEYS}
            ops.symmetrize_(state["fisher"])  # the core keeps its lower triangle current
            state.update({k: getattr(core, k) for k in _DENSE_COUNTER_KEYS})
            state.update(gram_rows=core.gram_rows, updates_at_solve=self._updates_at_solve)
        state["representation"] = self.representation
        state["config"] = self._config()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` saved with the same settings; a refused state changes nothing."""
        if state.get("config") != self._config():
            raise ValueError(f"DenseEFIM.load_state_dict: the state was saved with {state.get('config')}, "
                             f"this object has {self._config()}")
        kind = state.get("representation")
        if kind not in ("compact", "dense"):
            raise ValueError(f"DenseEFIM.load_state_dict: 'representation' must be 'compact' or 'dense', got {kind!r}")
        core = self._core if kind == self.representation else self._new_core(kind)
        if kind == "compact":
            core.load(state)
        else:
            targets = [getattr(core, key) for key in _DENSE_STATE_KEYS]
            for key, target in zip(_DENSE_STATE_KEYS, targets):
                if state[key].shape != target.shape:
                    raise ValueError(f"DenseEFIM.load_state_dict: '{key}' has shape {tuple(state[key].shape)}, "
                                     f"expected {tuple(target.shape)}")
            if int(state["gram_rows"]) < 2:
                raise ValueError(f"DenseEFIM.load_state_dict: 'gram_rows' must be an integer >= 2, "
                                 f"got {state['gram_rows']!r}")
            for key, target in zip(_DENSE_STATE_KEYS, targets):
                target.copy_(state[key])
            core.set_counters(*(state[key] for key in _DENSE_COUNTER_KEYS))
            core.set_gram_rows(int(state["gram_rows"]))
        self._core = core
        self._updates_at_solve = int(state.get("updates_at_solve", 0))

    # ---------------------------------------------------------------- updates

    def update(self, g: torch.Tensor, batch_size: int = 1) -> None:
        """Feeds one gradient. For the mean gradient of a batch of D samples pass
        ``batch_size=D``: it enters as sqrt(D) g, whose outer product has the
        expectation of a single sample's."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DenseEFIM.update: argument 'batch_size' must be a positive integer, got {batch_size!r}")
        self._make_room("g", g, 1)
        self._core.update(g, batch_size)

    def update_many(self, G: torch.Tensor, *, per_step: bool = False) -> None:
        """Feeds the rows of G (k x d) as k samples, oldest first, in one step.

        ``per_step=True``: the rows are the per-sample gradients of one
        optimizer step, and an EMA decays once per step (by ``beta``, as for
        one batch-mean gradient) with the rows sharing the new weight
        ``(1 - beta) / k``, rather than once per row (``beta**k``, which at
        the paper's beta = 0.8 and a batch of 100 would forget everything
        every step). The running average counts rows either way."""
        self._make_room("G", G, 2)
        try:
            self._core.update_many(G, bool(per_step))
        except torch.linalg.LinAlgError:
            # Only the eager factorization that ends a large step raises this,
            # after the rows reached F and the counters moved: a consistent
            # state without a factor, which the next solve builds (or reports).
            pass

    def _make_room(self, name: str, x, ndim: int) -> None:
        """Under ``"auto"``, turns the compact form dense before an update
        would make it keep more than d / 2 rows (checking the update first:
        a refused one changes nothing)."""
        core = self._core
        if self.requested_representation != "auto" or not isinstance(core, CompactCore):
            return
        k = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else 1
        if core.rank + k <= self.dim // 2:
            return
        checked_rows(name, x, ndim, self.dim, self.dtype, self.device)
        dense = self._new_core("dense")
        dense.fisher.copy_(core.fisher())
        # mu = 0: the inverse is stale, and the next solve builds it from F
        dense.set_counters(core.num_updates, core.num_samples, 0, 0.0)
        self._core, self._updates_at_solve = dense, core.num_updates

    # -------------------------------------------------------------- read-outs

    @property
    def inverse(self) -> torch.Tensor:
        """(F + damping I)^-1 as a d x d tensor, exactly symmetric. The dense
        form rebuilds its inverse for this unless it holds the full damping
        (its live state: read it, do not write it); the compact form builds
        it (O(r d^2))."""
        core = self._core
        if isinstance(core, CompactCore):
            eye = torch.eye(self.dim, dtype=torch.float64, device=self.device)
            return ops.symmetrize_(core.solve(eye, dtype=torch.float64)).to(self.dtype)
        if core.mu != self.damping:
            core.refresh()
        core.flush()
        return core.inverse

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """(F + damping I)^-1 v for v of shape [d] or [d, m], in the state's dtype."""
        if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or v.shape[0] != self.dim:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"DenseEFIM.solve: argument 'v' must have shape [{self.dim}] or [{self.dim}, m], got {got}")
        if first_nonfinite([v]) is not None:
            raise NonFiniteError("DenseEFIM.solve: argument 'v' contains NaN or infinite values", "v")
        try:
            if isinstance(self._core, CompactCore):
                return self._core.solve(v)
            b = v.to(device=self.device, dtype=torch.float64)
            w = self._dense_solve(b.unsqueeze(1) if b.dim() == 1 else b)
            self._learn_steps_per_solve()  # only a solve that succeeded counts
        except (torch.linalg.LinAlgError, _NoConvergence) as err:
            # every factorization and rebuild writes its result only once it succeeded
            raise NonFiniteError(f"DenseEFIM.solve: F + damping I is not positive definite in floating point "
                                 f"({_one_line(err)}): F's scale dwarfs the damping {self.damping:g}, so the "
                                 f"gradients fed diverged or the damping is too small for them; the state is "
                                 f"unchanged", "the curvature") from err
        return (w.squeeze(1) if b.dim() == 1 else w).to(self.dtype)

    def _learn_steps_per_solve(self) -> None:
        """Tells the dense core how many steps came since the last solve: a
        step of k >= 2 rows goes in place only while that is cheaper than one
        factorization per solve (k < d / (9 T), see dense_efim.h)."""
        core = self._core
        steps = core.num_updates - self._updates_at_solve
        self._updates_at_solve = core.num_updates
        if steps > 0:
            core.set_gram_rows(max(2, math.ceil(self.dim / (9 * steps))))

    def _dense_solve(self, b: torch.Tensor) -> torch.Tensor:
        """PCG on (F + damping I) w = b (float64, columns independent), with the
        kept inverse as the preconditioner. Rebuilds that inverse first when
        it is stale or its damping has decayed past ``refresh_below``, and
        once more should PCG not converge (the float32 state drifted)."""
        core = self._core
        went_to_fisher = core.last_rows >= core.gram_rows  # how the last step went in
        if core.mu < self.refresh_below * self.damping and went_to_fisher:
            # The steps are too large for the in-place updates: they only
            # reach F, and a Cholesky factor serves the solve (the update
            # may have made it already); an explicit inverse would be three
            # times the work, for this solve alone.
            if core.factor is None:
                core.factorize()
            return cholesky_solve(core.factor, b)
        if core.mu < self.refresh_below * self.damping:
            core.refresh()
        core.fold()  # F exact, its lower triangle current
        F = ops.symmetrize_(core.fisher)  # the upper triangle is the core's scratch space
        tol = _SOLVE_TOL[self.dtype]
        for attempt in range(2):
            core.flush()
            A = core.inverse

            def precondition(r):
                return (A @ r.to(A.dtype)).to(torch.float64)

            w, converged = _pcg(lambda x: torch.addmm(x, F, x, beta=self.damping), precondition, b, tol)
            if converged or attempt == 1:
                break
            core.refresh()
        if not converged:
            raise _NoConvergence("conjugate gradients did not converge on the exactly rebuilt inverse")
        return w


class _NoConvergence(RuntimeError):
    pass


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:160]


def _pcg(apply, precondition, b: torch.Tensor, tol: float) -> tuple[torch.Tensor, bool]:
    """Preconditioned conjugate gradients for the SPD ``apply`` on the columns
    of b at once. Stops when every column's preconditioned residual r^T z has
    fallen below tol^2 b^T P b (the energy-norm error, relative, where P is
    close to the inverse). The step's beta is the flexible one, z^T (r_new - r) / r^T z,
    which tolerates a preconditioner applied in float32."""
    w = precondition(b)
    r = b - apply(w)
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum(0)
    target = tol * tol * (b * w).sum(0).clamp_min(0)
    for _ in range(_MAX_PCG_STEPS):
        if bool((rz <= target).all()):
            return w, True
        q = apply(p)
        pq = (p * q).sum(0)
        alpha = torch.where(pq > 0, rz / pq, torch.zeros_like(pq))
        w.add_(p * alpha)
        r.sub_(q * alpha)
        z = precondition(r)
        rz_new = (r * z).sum(0)
        beta = torch.where(rz > 0, -alpha * (z * q).sum(0) / rz, torch.zeros_like(rz))
        p = z + p * beta
        rz = rz_new
    return w, bool((rz <= target).all())
