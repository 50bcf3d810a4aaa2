"""KFAC: a block-diagonal inverse Fisher with Kronecker-factored blocks for
``nn.Linear`` and ``nn.Conv2d`` layers and a diagonal block for every other
parameter (the layers that get one are named in a warning).

For a linear layer with inputs a (n x (d_in + 1), a column of ones for the
bias) and per-sample output gradients delta (n x d_out), the Fisher block of
the row-major weight [W | b] is approximated by G (x) S with the EMAs
(factor beta per update, from S = G = 0, no bias correction)

    S <- beta S + (1 - beta) a^T a / n,    G <- beta G + (1 - beta) delta^T delta / n,

and ``solve`` applies, per layer and with exactly the damping asked for,

    (G + sqrt(lambda) I)^-1 V (S + sqrt(lambda) I)^-1

to the weight-shaped piece V of the vector; every other parameter gets
(diag + lambda)^-1, diag the EMA of its squared per-sample gradient entries.

A convolution (Grosse & Martens, 2016) is the same with one row per output
position of every sample: a is the input patch the kernel covers there
(``F.unfold``), delta the output gradient there, the weight the
out_channels x (in_channels kh kw) matrix. With T positions per sample its
S is the per-sample *sum* over positions, E_n[sum_t a a^T], and G the mean
over samples and positions: the recorder scales the patches by sqrt(T).
Supported: any stride, padding (zeros), dilation, groups = 1, bias or not.

An update only accumulates the factors (one GEMM each, n d^2, about a
quarter of what an in-place Woodbury update of the inverse costs, and that
would also leave the damping to decay). The factor inverses are rebuilt
exactly (float64 Cholesky) at the first read after updates, so at most once
per ``solve``; ``num_refreshes`` counts these rebuilds. The factors and the
diagonal EMAs are kept in float64 (see the note below), the inverses and
what ``solve`` returns in the state dtype.

The hooks (_hooks.py) record what the last forward/backward pass saw;
``update`` folds it in. Output gradients of a loss that is a mean over n
samples are n times smaller than per-sample ones: they are scaled back by n
(the batch size the hook saw), so the convention matches the per-sample
Fisher. The hooks come off at :meth:`KFAC.close`, at the end of a ``with``
block, or when the KFAC is collected.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import ops
from .._data_parallel import DataParallel
from .._finite import NonFiniteError, first_nonfinite
from ._hooks import conv_geometry, paused, recorder_for, release, weight_matrix_shape

# Factor precision, measured: 10^4 updates of 32 rows into a 64 -> 32 layer,
# float32 state, damping 1e-3 (damped factors conditioned ~2500), against the
# same captures accumulated in float64. Kept in float32, the EMA's roundings
# (a multiply and an add per update, the last 1/(1-beta) of them remembered)
# cost the factors 2.5e-7 / 1e-6 / 1.3e-5 (beta 0.9 / 0.99 / 0.999; relative,
# Frobenius), which the conditioning turns into 8e-6 / 5e-5 / 2e-4 in the
# solve. So the factors are float64 whatever the state dtype. Each update's
# product a^T a is still formed in the state dtype, as one GEMM: a single
# rounding that is not carried from update to update (2e-8 / 6e-9 / 2e-9 in
# the factors, 2e-6 / 6e-7 / 2.5e-7 in the solve, whose float32 floor with
# exact factors is 1.7e-7). The diagonal blocks' EMAs are float64 for the
# same reason; the inverses and the solve keep the state dtype.
#
# A small product (n d^2 below this) is formed in float64 instead, in one
# addmm: on factors of a few dozen rows the three calls of the float32 path
# cost more than the arithmetic.
_FLOAT32_PRODUCT_ABOVE = 1 << 22


class _Block:
    """The state of one tracked layer: its factors and their damped inverses."""

    def __init__(self, module: nn.Module, dtype, device, root_damping: float):
        self.module = module
        self.has_bias = module.bias is not None
        self.d_out, self.weight_columns = weight_matrix_shape(module)
        self.d_in = self.weight_columns + (1 if self.has_bias else 0)
        zeros = lambda d, dt: torch.zeros(d, d, dtype=dt, device=device)  # noqa: E731
        self.S, self.G = zeros(self.d_in, torch.float64), zeros(self.d_out, torch.float64)
        self.S_inv, self.G_inv = zeros(self.d_in, dtype), zeros(self.d_out, dtype)
        self.reset(root_damping)

    def reset(self, root_damping: float) -> None:
        self.S.zero_()
        self.G.zero_()
        for inverse in (self.S_inv, self.G_inv):
            inverse.zero_().diagonal().fill_(1.0 / root_damping)  # (sqrt(lambda) I)^-1

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"S": self.S, "G": self.G, "S_inv": self.S_inv, "G_inv": self.G_inv}


def _factored(module: nn.Module) -> bool:
    """Whether K-FAC keeps Kronecker factors for ``module``."""
    return isinstance(module, nn.Linear) or conv_geometry(module) is not None


def _warn_of_diagonal_layers(model: nn.Module, params: list[torch.Tensor]) -> None:
    """One warning naming the layers whose own parameters (among ``params``)
    get diagonal blocks, not Kronecker factors, if there are any."""
    given = {id(p) for p in params}
    plain = [f"{name or '(the model itself)'} ({type(m).__name__})" for name, m in model.named_modules()
             if not _factored(m) and any(id(p) in given for p in m.parameters(recurse=False))]
    if plain:
        warnings.warn(f"KFAC: these layers get diagonal blocks, not Kronecker factors: {', '.join(plain)} "
                      "(factors are kept for nn.Linear and for nn.Conv2d with groups=1 and zero padding)",
                      UserWarning, stacklevel=3)


class KFAC:
    """Per-sample information comes from the layer hooks, so per-sample
    gradient rows (``takes_rows``) are not asked for.

    Args:
        modules: a module (its ``nn.Linear`` submodules are used) or a list of ``nn.Linear``.
        params: the parameters the flat vectors of ``update``/``solve`` are made of,
            in order (default: all parameters of ``modules``); those not in a
            tracked linear layer get a diagonal block. A tracked layer's
            weight and bias are both among them or neither is.
        beta: EMA factor of the factors and diagonal blocks, in (0, 1).
        damping: lambda > 0; each factor gets sqrt(lambda), each diagonal block lambda.
        dtype, device: of the state (float32 or float64); by default those of
            the first tracked layer's weight.
        process_group: of a data-parallel training (equal per-rank batches):
            each update folds in the captures of every rank.

    Use it as a context manager, or call :meth:`close`, to take its hooks off
    the model; they also come off when the object is collected.
    """

    def __init__(self, modules, *, params: Iterable[torch.Tensor] | None = None, beta: float = 0.95,
                 damping: float = 1e-3, dtype=None, device=None, process_group=None):
        if isinstance(modules, nn.Module):
            linears = [m for m in modules.modules() if _factored(m)]
            default_params = list(modules.parameters())
        else:
            linears = list(modules)
            if not all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in linears):
                raise ValueError("KFAC: argument 'modules' must be an nn.Module or a list of nn.Linear and "
                                 "nn.Conv2d layers")
            unfit = [m for m in linears if not _factored(m)]
            if unfit:
                raise ValueError(f"KFAC: argument 'modules' holds {unfit[0]}, whose input patches are not what "
                                 "it multiplies its weight with (groups != 1, a padding mode other than zeros, "
                                 "or an uneven padding='same'); pass the model to give it a diagonal block")
            default_params = [p for m in linears for p in m.parameters()]
        if not linears:
            raise ValueError("KFAC: argument 'modules' holds no nn.Linear or nn.Conv2d layer")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
            raise ValueError(f"KFAC: argument 'beta' must lie in (0, 1), got {beta!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (
                math.isfinite(damping) and damping > 0):
            raise ValueError(f"KFAC: argument 'damping' must be a finite number > 0, got {damping!r}")
        first = linears[0].weight
        dtype = first.dtype if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"KFAC: argument 'dtype' must be torch.float32 or torch.float64, got {dtype}")
        self.dtype, self.device = dtype, first.device if device is None else torch.device(device)
        self.params = list(params) if params is not None else default_params
        # a data-parallel training: every rank folds in the union of the ranks' captures
        self._data_parallel = DataParallel.of(process_group)
        if isinstance(modules, nn.Module):
            _warn_of_diagonal_layers(modules, self.params)
        self.beta, self.damping = float(beta), float(damping)
        self._root = math.sqrt(self.damping)

        owner = {}
        for i, m in enumerate(linears):
            owner[id(m.weight)] = (i, "weight")
            if m.bias is not None:
                owner[id(m.bias)] = (i, "bias")
        self._owner = [owner.get(id(p)) for p in self.params]
        # Where each tracked layer's pieces sit among the parameters; a layer
        # none of whose parameters is given is tracked but never solved for.
        self._slots: dict[int, dict[str, int]] = {}
        for k, o in enumerate(self._owner):
            if o is not None:
                self._slots.setdefault(o[0], {})[o[1]] = k
        for i, slot in self._slots.items():
            want = {"weight", "bias"} if linears[i].bias is not None else {"weight"}
            if set(slot) != want:
                missing = sorted(want - set(slot))[0]
                raise ValueError(f"KFAC: argument 'params' holds part of the tracked layer {linears[i]} but not its "
                                 f"{missing}: give both its weight and bias, or neither")
        self._sizes = [p.numel() for p in self.params]
        self.dim = sum(self._sizes)  # the length of the flat vectors of update and solve

        self.layers = [_Block(m, self.dtype, self.device, self._root) for m in linears]
        self._has_diagonal = any(o is None for o in self._owner)
        self._diag = [torch.zeros(p.numel(), dtype=torch.float64, device=self.device) if o is None else None
                      for p, o in zip(self.params, self._owner)]
        self.num_updates = 0
        self.num_refreshes = 0
        self._stale = False  # whether the factors moved since the inverses were built

        self._recorders = [recorder_for(m) for m in linears]
        self._finalizer = weakref.finalize(self, release, self._recorders)

    #: whether estimators should hand per-sample gradient rows to update_many
    takes_rows = False

    # ------------------------------------------------------------- the hooks

    def close(self) -> None:
        """Takes every hook this object registered off the model (idempotent).
        The state stays readable (``solve``, ``state_dict``); updates are refused."""
        self._finalizer()

    remove_hooks = close

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` took the hooks off (updates are then refused)."""
        return not self._finalizer.alive

    def __enter__(self) -> KFAC:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"KFAC.{what}: this KFAC is closed (close() took its hooks off the model); "
                               "build a new one to go on recording")

    def paused(self):
        """Backward passes inside do not replace the recorded output gradients
        (for extra derivatives an estimator takes of the same graph)."""
        return paused(self._recorders)

    def take_captures(self) -> list[torch.Tensor]:
        """What the hooks recorded of the last pass, [inputs, output gradients]
        per tracked layer in order, taken out of the layers (the next update
        needs a new pass). Raises, changing nothing, if a layer saw none."""
        captures = self._peek_captures("take_captures")
        self._clear_captures()
        return captures

    def _peek_captures(self, what: str) -> list[torch.Tensor]:
        self._check_open(what)
        if any(r.acts is None or r.grads is None for r in self._recorders):
            raise RuntimeError(f"KFAC.{what}: a tracked layer saw no forward and backward pass since the last update")
        return [t for r in self._recorders for t in (r.acts, r.grads)]

    def _clear_captures(self) -> None:
        for recorder in self._recorders:
            recorder.acts = recorder.grads = None

    # ---------------------------------------------------------------- state

    def reset(self) -> None:
        """Back to no updates: S = G = 0, diagonal blocks 0."""
        for layer in self.layers:
            layer.reset(self._root)
        for diag in self._diag:
            if diag is not None:
                diag.zero_()
        self.num_updates = self.num_refreshes = 0
        self._stale = False

    # -------------------------------------------------------------- updates

    def update(self, g: torch.Tensor, batch_size: int = 1, *, captures: Sequence[torch.Tensor] | None = None) -> None:
        """Folds in the last forward/backward pass of the tracked layers, and
        ``g`` (the flat mean gradient, scaled by sqrt(batch_size)) into the
        diagonal blocks. ``captures``: that pass's :meth:`take_captures`, taken
        earlier (a pipelined update carries them to the consumer); by default
        taken now. Everything is checked first: a refused update changes nothing."""
        self._check_open("update")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"KFAC.update: argument 'batch_size' must be a positive integer, got {batch_size!r}")
        if not isinstance(g, torch.Tensor) or not g.is_floating_point() or g.dim() != 1 or g.numel() != self.dim:
            got = f"shape {list(g.shape)}, {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"KFAC.update: argument 'g' must be a floating-point vector of {self.dim} entries, got {got}")
        rows = g.detach().to(device=self.device, dtype=self.dtype).reshape(1, -1)
        if self._has_diagonal:  # else g is only checked, not used
            rows = rows * math.sqrt(batch_size)
        self._apply("update", rows, "g", captures)

    def update_many(self, rows: torch.Tensor, *, per_step: bool = True,
                    captures: Sequence[torch.Tensor] | None = None) -> None:
        """Per-sample gradient rows (n x dim) feed the diagonal blocks; the
        factors come from the hooks (or ``captures``). Both decay once per
        call (``per_step`` is accepted for the curvature protocol; K-FAC
        always works per step). A refused update changes nothing."""
        self._check_open("update_many")
        if (not isinstance(rows, torch.Tensor) or not rows.is_floating_point() or rows.dim() != 2
                or rows.shape[0] < 1 or rows.shape[1] != self.dim):
            got = f"shape {list(rows.shape)}, {rows.dtype}" if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"KFAC.update_many: argument 'rows' must be a floating-point matrix of shape "
                             f"[n >= 1, {self.dim}], got {got}")
        self._apply("update_many", rows.detach().to(device=self.device, dtype=self.dtype), "rows", captures)

    def _apply(self, what: str, rows: torch.Tensor, rows_name: str, given: Sequence[torch.Tensor] | None) -> None:
        captures = self._peek_captures(what) if given is None else self._check_captures(what, given)
        if self._data_parallel is not None:
            captures = [self._data_parallel.rows(t) for t in captures]
        acts = [t.detach().to(device=self.device, dtype=self.dtype) for t in captures[0::2]]
        grads = [t.detach().to(device=self.device, dtype=self.dtype) for t in captures[1::2]]
        bad = first_nonfinite([rows, *acts, *grads])
        if bad is not None:
            name = rows_name if bad == 0 else ("captures (layer inputs)" if bad <= len(acts)
                                               else "captures (output gradients)")
            raise NonFiniteError(f"KFAC.{what}: argument '{name}' contains NaN or infinite values; nothing was "
                                 "updated", name)
        if given is None:
            self._clear_captures()

        a, b = self.beta, 1.0 - self.beta
        start = 0
        for diag, size in zip(self._diag, self._sizes) if self._has_diagonal else ():
            if diag is not None:
                diag.mul_(a).add_(rows[:, start:start + size].pow(2).mean(0), alpha=b)
            start += size
        for layer, x, d in zip(self.layers, acts, grads):
            for F, r in ((layer.S, x), (layer.G, d)):
                if r.dtype != F.dtype and r.shape[0] * r.shape[1] ** 2 >= _FLOAT32_PRODUCT_ABOVE:
                    # the product in the state dtype, its running sum in float64 (see the note above)
                    F.mul_(a).add_(r.mT @ r, alpha=b / r.shape[0])
                else:
                    r = r.to(F.dtype)
                    F.addmm_(r.mT, r, beta=a, alpha=b / r.shape[0])
        self.num_updates += 1
        self._stale = True

    def _check_captures(self, what: str, given: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        given = list(given)
        if len(given) != 2 * len(self.layers) or not all(isinstance(t, torch.Tensor) for t in given):
            raise ValueError(f"KFAC.{what}: argument 'captures' must hold {2 * len(self.layers)} tensors (inputs and "
                             f"output gradients of {len(self.layers)} layers), got {len(given)}")
        for i, layer in enumerate(self.layers):
            for t, width, kind in ((given[2 * i], layer.d_in, "inputs"), (given[2 * i + 1], layer.d_out,
                                                                           "output gradients")):
                if not t.is_floating_point() or t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != width:
                    raise ValueError(f"KFAC.{what}: argument 'captures' must hold layer {i}'s {kind} as a "
                                     f"floating-point [n >= 1, {width}] matrix, got shape {list(t.shape)}, {t.dtype}")
        return given

    # ------------------------------------------------------------- read-outs

    def _refresh(self) -> None:
        """Each inverse <- (factor + sqrt(damping) I)^-1 exactly: float64
        Cholesky, then cast. All are computed before any is written, so a
        failure leaves the state as it was."""
        built, infos = [], []
        for layer in self.layers:
            for factor in (layer.S, layer.G):
                D = factor.to(torch.float64, copy=True)
                D.diagonal().add_(self._root)
                L, info = torch.linalg.cholesky_ex(D)  # reads the lower triangle only
                built.append(torch.cholesky_inverse(L))
                infos.append(info)
        if bool(torch.stack(infos).any()):
            raise NonFiniteError("KFAC: a damped factor is not positive definite in floating point (its scale "
                                 "dwarfs the damping: the inputs or gradients fed diverged, or the damping is too "
                                 "small for them); the inverses were left unchanged", "the curvature")
        targets = [t for layer in self.layers for t in (layer.S_inv, layer.G_inv)]
        for inverse, exact in zip(targets, built):
            inverse.copy_(ops.symmetrize_(exact.contiguous()))  # exactly symmetric, then cast
        self.num_refreshes += 1
        self._stale = False

    def inverses(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(S + sqrt(lambda) I)^-1, (G + sqrt(lambda) I)^-1] per tracked layer,
        rebuilt first if updates came since. The live state: read, do not write."""
        if self._stale:
            self._refresh()
        return [(layer.S_inv, layer.G_inv) for layer in self.layers]

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """The block-diagonal inverse applied to the flat vector v."""
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.numel() != self.dim:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"KFAC.solve: argument 'v' must be a vector of {self.dim} entries, got {got}")
        inverses = self.inverses()
        pieces = list(torch.split(v.detach().to(device=self.device, dtype=self.dtype), self._sizes))
        out = [(piece / (diag + self.damping)).to(self.dtype) if diag is not None else None
               for piece, diag in zip(pieces, self._diag)]
        order = sorted(self._slots)
        V = []
        for i in order:
            layer, slot = self.layers[i], self._slots[i]
            parts = [pieces[slot["weight"]].view(layer.d_out, layer.weight_columns)]
            if layer.has_bias:
                parts.append(pieces[slot["bias"]].view(-1, 1))
            V.append(torch.cat(parts, dim=1))
        if order:
            solved = ops.kfac_apply([inverses[i][0] for i in order], [inverses[i][1] for i in order], V)
            for i, X in zip(order, solved):
                layer, slot = self.layers[i], self._slots[i]
                out[slot["weight"]] = X[:, :layer.weight_columns].reshape(-1)
                if layer.has_bias:
                    out[slot["bias"]] = X[:, -1]
        return torch.cat(out)

    # ------------------------------------------------------------ state dict

    def _config(self) -> dict:
        return {"beta": self.beta, "damping": self.damping}

    def state_dict(self) -> dict:
        """Factors, inverses (as kept: ``stale`` says whether they predate the
        last updates), diagonal blocks and counters; a round trip resumes bit for bit."""
        return {
            "layers": [{k: t.clone() for k, t in layer.tensors().items()} for layer in self.layers],
            "diag": [None if d is None else d.clone() for d in self._diag],
            "num_updates": self.num_updates, "num_refreshes": self.num_refreshes, "stale": self._stale,
            "config": self._config(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Checks the whole state against this object's layers first: a refused
        state changes nothing."""
        if "config" in state and state["config"] != self._config():
            raise ValueError(f"KFAC.load_state_dict: the state was saved with {state['config']}, "
                             f"this object has {self._config()}")
        if len(state["layers"]) != len(self.layers) or len(state["diag"]) != len(self._diag):
            raise ValueError("KFAC.load_state_dict: the state was saved for other layers or parameters")
        for layer, saved in zip(self.layers, state["layers"]):
            for key, target in layer.tensors().items():
                if key not in saved or saved[key].shape != target.shape:
                    raise ValueError(f"KFAC.load_state_dict: a layer's '{key}' is missing or has another shape "
                                     f"than {tuple(target.shape)}")
        for diag, saved in zip(self._diag, state["diag"]):
            if (diag is None) != (saved is None) or (diag is not None and saved.shape != diag.shape):
                raise ValueError("KFAC.load_state_dict: the diagonal blocks were saved for other parameters")
        for layer, saved in zip(self.layers, state["layers"]):
            for key, target in layer.tensors().items():
                target.copy_(saved[key])
        for diag, saved in zip(self._diag, state["diag"]):
            if diag is not None:
                diag.copy_(saved)
        self.num_updates, self.num_refreshes = int(state["num_updates"]), int(state["num_refreshes"])
        # A state saved before the inverses were rebuilt lazily has no 'stale'
        # and inverses whose damping had decayed: rebuild them from its factors.
        self._stale = bool(state.get("stale", True))
