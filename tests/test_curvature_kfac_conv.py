"""K-FAC for nn.Conv2d: the factors against patches gathered by explicit
loops in float64, the solve against the dense Kronecker product of the same
factors, a network of convolutions and linear layers, the fallback for the
layers it does not factor, and NHGD-K-FAC's hypergradient on a small CNN
against the exact one."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhgd_ext.curvature import KFAC
from nhgd_ext.estimators import NHGD

# (in, out, kernel, stride, padding, dilation, bias): odd sizes, every option
CONVS = [
    (3, 4, (3, 2), (2, 1), (1, 0), (1, 2), True),
    (2, 5, 3, 1, "same", 1, False),
    (1, 3, 2, 2, 0, 1, True),
    (4, 2, 1, 1, 0, 1, True),
    (2, 3, 3, (1, 2), "valid", (2, 1), True),
]


def explicit_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """n x T x (C kh kw): every output position's input patch, gathered one
    kernel tap at a time (no unfold), in the weight's (C, kh, kw) order."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv.padding, str):
        pads = (0, 0) if conv.padding == "valid" else (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    else:
        pads = conv.padding
    xp = F.pad(x, (pads[1], pads[1], pads[0], pads[0]))
    n, c, H, W = xp.shape
    out_h = (H - dh * (kh - 1) - 1) // sh + 1
    out_w = (W - dw * (kw - 1) - 1) // sw + 1
    rows = torch.empty(n, out_h * out_w, c, kh, kw, dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            for a in range(kh):
                for b in range(kw):
                    rows[:, i * out_w + j, :, a, b] = xp[:, :, i * sh + a * dh, j * sw + b * dw]
    return rows.reshape(n, out_h * out_w, -1)


def per_sample_losses(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.flatten(1).tanh() * target).sum(1) + 0.5 * out.flatten(1).pow(2).sum(1)


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "-".join(map(str, s)))
def test_conv_factors_match_the_explicit_float64_computation(spec):
    c_in, c_out, kernel, stride, padding, dilation, bias = spec
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    x = torch.randn(3, c_in, 7, 6, dtype=torch.float64)
    beta = 0.25
    with KFAC(conv, beta=beta) as kfac:
        out = conv(x)
        target = torch.randn(out.shape[0], out[0].numel(), dtype=torch.float64)
        per_sample_losses(out, target).mean().backward()
        kfac.update(torch.cat([p.grad.reshape(-1) for p in conv.parameters()]), batch_size=3)
        layer = kfac.layers[0]

        # the reference: S = E_n[sum_t a a^T], G = E_{n,t}[delta delta^T], per-sample output gradients
        patches = explicit_patches(x, conv)
        if bias:
            patches = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=torch.float64)], dim=2)
        n, T = patches.shape[:2]
        S = torch.einsum("nti,ntj->ij", patches, patches) / n
        out = F.conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        (delta,) = torch.autograd.grad(per_sample_losses(out, target).sum(), out)
        delta = delta.flatten(2).transpose(1, 2)  # n x T x out, per sample (each loss sees its own output)
        G = torch.einsum("nti,ntj->ij", delta, delta) / (n * T)
        assert patches.shape[1] == out.shape[2] * out.shape[3]
        torch.testing.assert_close(layer.S, (1 - beta) * S, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.G, (1 - beta) * G, rtol=1e-12, atol=1e-12)


class ConvNet(nn.Module):
    """A convolution, a 1x1 convolution without bias, a linear head and a
    free scale (not in any layer: a diagonal block)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 1, bias=False)
        self.head = nn.Linear(2 * 4 * 3, 5)
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1)) * self.scale


def test_solve_is_the_dense_kronecker_inverse_of_the_same_factors_on_a_conv_and_linear_net():
    torch.manual_seed(1)
    model = ConvNet().double()
    x = torch.randn(6, 1, 7, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    damping = 0.03
    with pytest.warns(UserWarning, match=r"diagonal blocks, not Kronecker factors: \(the model itself\) \(ConvNet\)"):
        kfac = KFAC(model, beta=0.5, damping=damping)
    with kfac:
        for _ in range(3):
            model.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            kfac.update(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), batch_size=6)
        v = torch.randn(kfac.dim, dtype=torch.float64)
        found = kfac.solve(v)
        pieces = dict(zip([name for name, _ in model.named_parameters()],
                          torch.split(v, [p.numel() for p in model.parameters()])))
        got = dict(zip(pieces, torch.split(found, [p.numel() for p in model.parameters()])))
        root = math.sqrt(damping)
        layers = {"conv1": kfac.layers[0], "conv2": kfac.layers[1], "head": kfac.layers[2]}
        assert [type(layer.module) for layer in kfac.layers] == [nn.Conv2d, nn.Conv2d, nn.Linear]
        for name, layer in layers.items():
            W = pieces[f"{name}.weight"].reshape(layer.d_out, -1)
            V = torch.cat([W, pieces[f"{name}.bias"].reshape(-1, 1)], dim=1) if layer.has_bias else W
            eye = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
            dense = torch.kron(layer.G + root * eye(layer.d_out), layer.S + root * eye(layer.d_in))
            expected = torch.linalg.solve(dense, V.reshape(-1)).reshape(V.shape)
            torch.testing.assert_close(got[f"{name}.weight"].reshape(layer.d_out, -1),
                                       expected[:, :W.shape[1]], rtol=1e-10, atol=1e-12)
            if layer.has_bias:
                torch.testing.assert_close(got[f"{name}.bias"], expected[:, -1], rtol=1e-10, atol=1e-12)
        # the free scale: its diagonal block, the EMA of its squared batch-gradient rows scaled by sqrt(6)
        diag = kfac._diag[list(pieces).index("scale")]
        torch.testing.assert_close(got["scale"], pieces["scale"] / (diag + damping), rtol=1e-12, atol=0)


def test_layers_without_factors_fall_back_to_diagonal_blocks_named_once():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3, padding=1,
                                                                                    padding_mode="reflect"),
                          nn.Flatten(), nn.Linear(3 * 3 * 3, 2))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        kfac = KFAC(model)
    messages = [str(w.message) for w in seen]
    assert len(messages) == 1
    assert "0 (Conv2d)" in messages[0] and "1 (BatchNorm2d)" in messages[0] and "2 (Conv2d)" in messages[0]
    assert [type(layer.module) for layer in kfac.layers] == [nn.Linear]
    kfac.close()
    with pytest.raises(ValueError, match="groups != 1"):
        KFAC([model[0]])


def test_nhgd_kfac_on_a_small_cnn_points_along_the_exact_hypergradient():
    """Per-layer weight decay (v = log decays of two convolutions and the
    head) of a small CNN, trained to its optimum by full-batch gradient
    descent in float64; the exact hypergradient from the Hessian. NHGD-K-FAC
    fed along the last inner steps must point the same way (cosine > 0; the
    figure is printed for the record)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(40, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    Xv, yv = torch.randn(30, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    params = list(model.parameters())
    weights = [model[0].weight, model[2].weight, model[5].weight]
    v = torch.tensor([-2.0, -2.5, -1.5], dtype=torch.float64, requires_grad=True)

    def inner_losses(rows=slice(None)):
        decay = sum(0.5 * v[i].exp() * w.pow(2).sum() for i, w in enumerate(weights))
        return F.cross_entropy(model(X[rows]), y[rows], reduction="none") + decay

    def outer():
        return F.cross_entropy(model(Xv), yv)

    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(3000):
        opt.zero_grad()
        inner_losses().mean().backward(inputs=params)
        opt.step()

    # exact: grad_v f - (d2_{v theta} l) H^-1 grad_theta f at the optimum
    flat = torch.cat([p.reshape(-1) for p in params])
    grad_theta = torch.autograd.grad(inner_losses().mean(), params, create_graph=True)
    g_flat = torch.cat([t.reshape(-1) for t in grad_theta])
    assert g_flat.norm() < 1e-6
    H = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(g_flat[i], params, retain_graph=True)])
                     for i in range(flat.numel())])
    f_theta = torch.cat([t.reshape(-1) for t in torch.autograd.grad(outer(), params)])
    w = torch.linalg.solve(H, f_theta)
    (cross,) = torch.autograd.grad(g_flat @ w, v)
    exact = -cross  # f does not depend on v directly

    est = NHGD(params, [v], curvature="kfac", modules=model, beta=0.9, damping=float(v.detach().exp().min()))
    with est:
        frozen = torch.optim.SGD(params, lr=0.0)  # feed the curvature at the optimum
        batches = torch.Generator().manual_seed(3)
        for _ in range(40):
            est.inner_step(inner_losses(torch.randint(0, 40, (16,), generator=batches)), frozen)
        (found,) = est.hypergradient(outer(), lambda: inner_losses().mean())
    cosine = float(found @ exact / (found.norm() * exact.norm()))
    print(f"NHGD-K-FAC on a small CNN: cosine with the exact hypergradient {cosine:.3f}")
    assert cosine > 0.0
