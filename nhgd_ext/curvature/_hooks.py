"""The layer hooks of :class:`~nhgd_ext.curvature.KFAC`: what one
``nn.Linear`` or ``nn.Conv2d`` saw in the last forward/backward pass.

The hooks reference only their :class:`LinearRecorder`, never the KFAC that
owns it, so a KFAC nobody holds is collected, and its finalizer
(:func:`release`) takes the hooks off the model. Batched backward passes
(``torch.autograd.grad(..., is_grads_batched=True)``) are not recorded.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn

# is_grads_batched runs the backward under the legacy vmap; functorch's vmap
# wraps tensors differently. A torch with neither has none to find.
_FUNCTORCH = getattr(torch._C, "_functorch", None)
_BATCHED_TESTS = tuple(getattr(_FUNCTORCH, name) for name in ("is_legacy_batchedtensor", "is_batchedtensor")
                       if hasattr(_FUNCTORCH, name))


def _is_batched_grad(grad: torch.Tensor) -> bool:
    return any(test(grad) for test in _BATCHED_TESTS)


def _graph_alive(handle) -> bool:
    # A tensor hook's handle refers weakly to the hook dict, which the graph
    # owns; a torch whose handles say nothing keeps every handle (removing a
    # dead one is harmless).
    ref = getattr(handle, "hooks_dict_ref", None)
    return ref is None or ref() is not None


class LinearRecorder:
    """Records the inputs (with a column of ones for the bias, unless
    ``bias_column=False``) and the per-sample output gradients of one
    ``nn.Linear``."""

    def __init__(self, module: nn.Module, *, bias_column: bool = True):
        # The module is not kept: the hooks get it as an argument, and a
        # reference here would put the model in a cycle with its own hooks.
        self.out_features, self.in_features = weight_matrix_shape(module)
        self.has_bias = module.bias is not None
        self.bias_column = self.has_bias and bias_column
        self.acts: torch.Tensor | None = None
        self.grads: torch.Tensor | None = None
        self.recording = True
        self.closed = False
        self._module_handle = module.register_forward_hook(self._forward)
        self._tensor_handles: list = []

    def _forward(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if self.closed or not (torch.is_grad_enabled() and output.requires_grad):
            return
        # The inputs are recorded with the output gradient, by the backward
        # pass itself: a forward pass that is never backpropagated (a logged
        # validation loss) must not replace this step's inputs.
        handle = output.register_hook(functools.partial(self._output_grad, inputs[0].detach()))
        # Only hooks on graphs still alive can fire, and only those need
        # taking off at close: handles of collected graphs are dropped.
        self._tensor_handles = [h for h in self._tensor_handles if _graph_alive(h)]
        self._tensor_handles.append(handle)

    def _output_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        if self.closed or not self.recording:
            return
        if _is_batched_grad(grad):
            # A batched backward (autograd.grad(..., is_grads_batched=True))
            # takes several vector-Jacobian products of the graph, none of
            # them the step's loss gradient; detach() has no batching rule
            # there either.
            return
        a, delta, samples, input_scale = self._rows(inputs, grad.detach())
        if self.bias_column:
            a = torch.nn.functional.pad(a, (0, 1), value=1.0)
        self.acts = a if input_scale == 1.0 else a * input_scale
        self.grads = delta * samples  # per-sample output gradients of a mean loss over ``samples``

    def _rows(self, inputs: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """(input rows, output-gradient rows, samples the loss averages over,
        the factor on the input rows, bias column included): for a linear
        layer one row per sample (every leading index), unscaled."""
        delta = grad.reshape(-1, self.out_features)
        return inputs.reshape(-1, self.in_features), delta, delta.shape[0], 1.0

    def remove(self) -> None:
        """Takes every hook off (idempotent) and drops what was recorded."""
        self.closed = True
        self._module_handle.remove()
        for handle in self._tensor_handles:
            handle.remove()
        self._tensor_handles = []
        self.acts = self.grads = None


def conv_geometry(module: nn.Conv2d) -> dict | None:
    """``F.unfold``'s arguments for ``module``'s patches, or ``None`` where
    its input patches are not what it multiplies its weight with (groups,
    a padding mode other than zeros, an uneven ``padding="same"``)."""
    if not isinstance(module, nn.Conv2d) or module.groups != 1 or module.padding_mode != "zeros":
        return None
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": the total padding split evenly, or not supported
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(t % 2 for t in totals):
                return None
            padding = tuple(t // 2 for t in totals)
    return {"kernel_size": module.kernel_size, "dilation": module.dilation, "padding": padding,
            "stride": module.stride}


class ConvRecorder(LinearRecorder):
    """Records an ``nn.Conv2d`` as K-FAC for convolutions sees it (Grosse &
    Martens, 2016): every output position of every sample is a row, the
    input row being the patch the kernel covers there (``F.unfold``, a one
    for the bias) and the output row the per-sample gradient at that
    position. With T positions per sample, the patches are scaled by
    sqrt(T) so that S = E_n[sum_t a a^T] (the sum over positions of the
    factor's definition) while G = E_{n,t}[delta delta^T] stays a mean; the
    output gradients of a loss that is a mean over the batch are scaled back
    by the batch size."""

    def __init__(self, module: nn.Conv2d):
        self.geometry = conv_geometry(module)
        if self.geometry is None:
            raise ValueError(f"KFAC: {module} has no Kronecker factors here (groups != 1, a padding mode "
                             "other than zeros, or an uneven padding='same')")
        super().__init__(module)

    def _rows(self, inputs: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        patches = torch.nn.functional.unfold(inputs, **self.geometry)  # n x (C kh kw) x T
        a = patches.transpose(1, 2).reshape(-1, self.in_features)
        delta = grad.flatten(2).transpose(1, 2).reshape(-1, self.out_features)
        return a, delta, grad.shape[0], math.sqrt(patches.shape[2])


def weight_matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(rows, columns) of the layer's weight as the matrix K-FAC factors:
    out x in for ``nn.Linear``, out_channels x (in_channels kh kw) for ``nn.Conv2d``."""
    weight = module.weight
    return weight.shape[0], weight[0].numel()


def recorder_for(module: nn.Module) -> LinearRecorder:
    return ConvRecorder(module) if isinstance(module, nn.Conv2d) else LinearRecorder(module)


@contextlib.contextmanager
def paused(recorders: list[LinearRecorder]):
    """Backward passes inside (extra derivatives of a step's graph) record nothing."""
    for recorder in recorders:
        recorder.recording = False
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.recording = True


def release(recorders: list[LinearRecorder]) -> None:
    """The finalizer of a KFAC: it must not reference the KFAC itself."""
    for recorder in recorders:
        recorder.remove()
