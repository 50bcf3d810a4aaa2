"""Bad input: every error is a ValueError that names the argument, and no
tensor handed to the op (state, inputs, status) changes, bit for bit, nor is
reallocated. Proved for both implementations behind the Python wrappers of
nhgd_ext.ops, which must agree: the compiled kernels (csrc/checks.cpp,
through torch.ops.nhgd_ext) and the pure-PyTorch reference kernels
(nhgd_ext/_reference.py).

What runs:
- one explicit case per (op, argument, corruption) that is an error on the
  device, for each implementation: float32, unbatched (batch 2 for
  `wrong_batch`, which needs one). A corruption the wrappers reject
  themselves (a str coefficient, a tensor for a list) runs once, with every
  kernel replaced by one that fails if called. The compiled kernels also
  get NaN data in float64, which reaches the float64 instantiation of the
  C++ finiteness scan; otherwise no check depends on the dtype or a batch.
- hypothesis, 300 random bad calls per implementation (the same calls for
  both), for the long tail: any of those corruptions, float32 or float64,
  unbatched or batched (1 to 3), d in 1..9, k in 1..5, float or 0-d tensor
  coefficients, with or without `status`. Every explicit case, and every
  variant of one that the explicit list leaves out, can be drawn.
- K-FAC's aliasing (both implementations) and empty-list errors, and the
  registered operators called without the wrappers.
- hypothesis for valid input: Sherman-Morrison and Woodbury updates match
  the float64 inverse of the updated matrix, for both implementations (the
  reference on the CPU only).
"""

from __future__ import annotations

import functools
import math
import random
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nhgd_ext import ops
from nhgd_testing import (
    CUDA,
    DEVICES,
    DTYPES,
    IMPLEMENTATIONS,
    assert_exactly_symmetric,
    assert_unchanged,
    direct_inverse,
    gen,
    inv64,
    kernels,
    random_spd,
    rel_err,
    tol,
)

OTHER_DEVICE = "cuda" if CUDA else None  # the device a "wrong device" case uses from the CPU


# --------------------------------------------------------------------------- valid arguments


def _rows(shape, seed, dtype, device, scale=None):
    x = torch.randn(shape, generator=gen(seed), dtype=torch.float64)
    x = x * (scale if scale is not None else 1.0 / math.sqrt(shape[-1]))
    return x.to(dtype=dtype, device=device)


def _spd(d, seed, dtype, device, batch=None):
    return random_spd(d, batch=batch, seed=seed).to(dtype=dtype, device=device).contiguous()


def build(op, dtype, device, *, d=4, batch=None, k=2, layers=2, seed=0):
    """A dict of valid arguments of `op` (status None; corruptions may add one)."""
    if op == "sherman_morrison_":
        return {"A": _spd(d, seed, dtype, device, batch),
                "g": _rows((batch, d) if batch else (d,), seed + 1, dtype, device),
                "a": 0.9, "b": 0.1, "status": None, "lower_only": False}
    if op == "symmetrize_":
        return {"A": _spd(d, seed, dtype, device, batch)}
    if op == "woodbury_":
        return {"A": _spd(d, seed, dtype, device, batch),
                "H": _rows((batch, k, d) if batch else (k, d), seed + 1, dtype, device),
                "a": 0.9, "status": None}
    if op in ("kfac_update_", "kfac_apply"):
        dins = [d, d + 1, 2][:layers]
        douts = [d + 2, 3, d][:layers]
        args = {"S_inv": [_spd(i, seed + 10 * j, dtype, device) for j, i in enumerate(dins)],
                "G_inv": [_spd(o, seed + 10 * j + 1, dtype, device) for j, o in enumerate(douts)]}
        if op == "kfac_apply":
            args["V"] = [_rows((o, i), seed + 10 * j + 2, dtype, device) for j, (i, o) in enumerate(zip(dins, douts))]
            return args
        args["acts"] = [_rows((k + j, i), seed + 10 * j + 3, dtype, device) for j, i in enumerate(dins)]
        args["grads"] = [_rows((k + j, o), seed + 10 * j + 4, dtype, device) for j, o in enumerate(douts)]
        args.update(a=0.9, b=0.1, status=None)
        return args
    if op == "running_average_":
        shape = (batch or 3, d)
        return {"L": _rows(shape, seed, dtype, device, scale=1.0), "B": _rows(shape, seed + 1, dtype, device, scale=1.0),
                "a": 0.5, "b": 0.5, "status": None}
    raise AssertionError(op)


def call(op, args):
    if op == "sherman_morrison_":
        return ops.sherman_morrison_(args["A"], args["g"], args["a"], args["b"], status=args["status"],
                                     lower_only=args["lower_only"])
    if op == "symmetrize_":
        return ops.symmetrize_(args["A"])
    if op == "woodbury_":
        return ops.woodbury_(args["A"], args["H"], args["a"], status=args["status"])
    if op == "kfac_update_":
        return ops.kfac_update_(args["S_inv"], args["G_inv"], args["acts"], args["grads"], args["a"], args["b"],
                                status=args["status"])
    if op == "kfac_apply":
        return ops.kfac_apply(args["S_inv"], args["G_inv"], args["V"])
    if op == "running_average_":
        return ops.running_average_(args["L"], args["B"], args["a"], args["b"], status=args["status"])
    raise AssertionError(op)


# --------------------------------------------------------------------------- corruptions

STATE = {"sherman_morrison_": ["A"], "symmetrize_": ["A"], "woodbury_": ["A"], "running_average_": ["L"],
         "kfac_update_": ["S_inv[0]", "S_inv[1]", "G_inv[0]", "G_inv[1]"],
         "kfac_apply": ["S_inv[0]", "G_inv[1]"]}
DATA = {"sherman_morrison_": ["g"], "symmetrize_": [], "woodbury_": ["H"], "running_average_": ["B"],
        "kfac_update_": ["acts[0]", "acts[1]", "grads[0]", "grads[1]"], "kfac_apply": ["V[0]", "V[1]"]}
COEFFS = {"sherman_morrison_": ["a", "b"], "symmetrize_": [], "woodbury_": ["a"], "running_average_": ["a", "b"],
          "kfac_update_": ["a", "b"], "kfac_apply": []}
WITH_STATUS = {"sherman_morrison_", "woodbury_", "kfac_update_", "running_average_"}
LISTS = {"kfac_update_": ["S_inv", "G_inv", "acts", "grads"], "kfac_apply": ["S_inv", "G_inv", "V"]}

STATE_KINDS = ["int32", "int64", "float16", "bfloat16", "transposed", "strided", "nonsquare", "rank1", "rank4",
               "device"]
DATA_KINDS = ["int32", "int64", "float16", "other_float", "complex", "extra_col", "extra_dim", "drop_dim",
              "zero_rows", "wrong_batch", "nan", "inf", "neg_inf", "device"]
COEFF_KINDS = ["zero", "negative", "tiny_negative", "nan", "inf", "neg_inf",
               "t_negative", "t_nan", "t_inf", "t_zero", "t_1d", "t_2d", "t_int64", "t_int32", "t_bool",
               "str", "none", "bool", "device"]
STATUS_KINDS = ["int64", "float32", "two", "empty", "device"]
LIST_KINDS = ["drop", "extra", "not_a_list"]


def _get(args, key):
    m = re.fullmatch(r"(\w+)\[(\d+)\]", key)
    return args[m[1]][int(m[2])] if m else args[key]


def _set(args, key, value):
    m = re.fullmatch(r"(\w+)\[(\d+)\]", key)
    if m:
        args[m[1]][int(m[2])] = value
    else:
        args[key] = value


def _name(key):
    return key.split("[")[0]


def _other_device(device):
    return "cpu" if device == "cuda" else OTHER_DEVICE


def applicable(op, target, kind, device, batch):
    """Whether corruption `kind` of `target` is a meaningful error case here."""
    name = _name(target)
    if kind == "device" and (_other_device(device) is None or op == "symmetrize_"):
        return False  # symmetrize_ has no second tensor to disagree with: any device is fine
    if target in STATE[op]:
        if op == "running_average_" and kind in ("nonsquare", "rank1", "rank4"):
            return False  # L may have any shape
        if op == "kfac_apply" and kind in ("transposed", "strided"):
            return False  # kfac_apply only reads its inputs: any layout is fine
        if op in ("sherman_morrison_", "woodbury_") and kind == "transposed":
            return False  # a column-major symmetric state is the same matrix: accepted (test_sherman_morrison.py)
        return True
    if target in DATA[op]:
        if kind in ("nan", "inf", "neg_inf"):
            # non-finite data: ValueError on the CPU; the CUDA kernels skip instead
            return device == "cpu" and op != "kfac_apply"
        if kind == "zero_rows":
            return name in ("H", "acts", "grads")
        if kind == "wrong_batch":
            return name in ("g", "H") and batch is not None
        return True
    if name in ("a", "b") and kind == "device":
        # a 0-d CPU tensor is valid for a CUDA state; a CUDA one is not for a CPU state
        return device == "cpu"
    return True


def corrupt(op, args, target, kind, device, rng: random.Random):
    """Applies one corruption in place; returns the argument name the error must mention."""
    name = _name(target)
    if target in STATE[op]:
        X = _get(args, target)
        d = X.shape[-1]
        if kind in ("int32", "int64", "float16", "bfloat16"):
            new = X.to(getattr(torch, kind))
        elif kind == "transposed":
            new = X.mT.contiguous().mT  # same shape and values, column-major strides
        elif kind == "strided":
            buf = torch.zeros(*X.shape[:-1], 2 * d, dtype=X.dtype, device=X.device)
            new = buf[..., ::2]
            new.copy_(X)
        elif kind == "nonsquare":
            new = torch.ones(*X.shape[:-1], d + 1, dtype=X.dtype, device=X.device)
        elif kind == "rank1":
            new = X.reshape(-1)[:d].clone()
        elif kind == "rank4":
            new = X.reshape((1,) * (4 - X.dim()) + tuple(X.shape)).clone() if X.dim() < 4 else X
            if op == "kfac_update_":
                new = X.unsqueeze(0).clone()  # 3-D: kfac factors are never batched
        elif kind == "device":
            new = X.to(_other_device(device))
        else:
            raise AssertionError(kind)
        if kind in ("transposed", "strided"):
            assert not new.is_contiguous(), "corruption did not make the state non-contiguous (d == 1?)"
        _set(args, target, new)
        return name
    if target in DATA[op]:
        X = _get(args, target)
        if kind in ("int32", "int64", "float16"):
            new = X.to(getattr(torch, kind))
        elif kind == "other_float":
            new = X.to(torch.float64 if X.dtype == torch.float32 else torch.float32)
        elif kind == "complex":
            new = X.to(torch.complex64)
        elif kind == "extra_col":
            new = torch.cat([X, torch.zeros_like(X[..., :1])], dim=-1)
        elif kind == "extra_dim":
            new = X.unsqueeze(0)
        elif kind == "drop_dim":
            new = X[0].clone() if X.dim() > 0 else X.reshape(1)
        elif kind == "zero_rows":
            new = X[..., :0, :].clone()
        elif kind == "wrong_batch":
            new = torch.cat([X, X[:1]], dim=0)
        elif kind in ("nan", "inf", "neg_inf"):
            new = X.clone()
            flat = new.view(-1)
            flat[rng.randrange(flat.numel())] = {"nan": math.nan, "inf": math.inf, "neg_inf": -math.inf}[kind]
        elif kind == "device":
            new = X.to(_other_device(device))
        else:
            raise AssertionError(kind)
        _set(args, target, new)
        return name
    if name in ("a", "b"):
        good = args[name]
        value = {
            "zero": 0.0, "negative": -1.0, "tiny_negative": -1e-300, "nan": math.nan, "inf": math.inf,
            "neg_inf": -math.inf,
            "t_negative": torch.tensor(-0.5, dtype=torch.float64), "t_nan": torch.tensor(math.nan),
            "t_inf": torch.tensor(math.inf, dtype=torch.float64),
            "t_zero": torch.tensor(0.0, dtype=torch.float64),
            "t_1d": torch.tensor([good], dtype=torch.float64), "t_2d": torch.tensor([[good]], dtype=torch.float64),
            "t_int64": torch.tensor(1), "t_int32": torch.tensor(1, dtype=torch.int32), "t_bool": torch.tensor(True),
            "str": "0.5", "none": None, "bool": True,
        }.get(kind)
        if kind == "device":
            value = torch.tensor(good, dtype=torch.float64, device=_other_device(device))
        if name == "b" and kind in ("zero", "t_zero"):
            value = -0.25  # b = 0 is valid
        if value is None and kind != "none":
            raise AssertionError(kind)
        args[name] = value
        return name
    if name == "status":
        dev = _get(args, STATE[op][0]).device
        args["status"] = {
            "int64": lambda: torch.zeros(1, dtype=torch.int64, device=dev),
            "float32": lambda: torch.zeros(1, dtype=torch.float32, device=dev),
            "two": lambda: torch.zeros(2, dtype=torch.int32, device=dev),
            "empty": lambda: torch.zeros(0, dtype=torch.int32, device=dev),
            "device": lambda: torch.zeros(1, dtype=torch.int32, device=_other_device(device)),
        }[kind]()
        return "status"
    # whole lists
    lst = args[name]
    if kind == "drop":
        args[name] = lst[:-1]
    elif kind == "extra":
        args[name] = lst + [lst[-1].clone()]
    elif kind == "not_a_list":
        args[name] = lst[0]
    else:
        raise AssertionError(kind)
    return name


def all_cases(op):
    out = []
    for t in STATE[op]:
        out += [(t, k) for k in STATE_KINDS]
    for t in DATA[op]:
        out += [(t, k) for k in DATA_KINDS]
    for t in COEFFS[op]:
        out += [(t, k) for k in COEFF_KINDS]
    if op in WITH_STATUS:
        out += [("status", k) for k in STATUS_KINDS]
    for t in LISTS.get(op, []):
        out += [(t, k) for k in LIST_KINDS]
    return out


BATCHED = ("sherman_morrison_", "symmetrize_", "woodbury_")
OPS = ["sherman_morrison_", "symmetrize_", "woodbury_", "kfac_update_", "kfac_apply", "running_average_"]


def _tensors(args):
    out = []
    for v in args.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, list):
            out += [x for x in v if isinstance(x, torch.Tensor)]
    # a tensor listed twice (an aliasing corruption) is checked once
    seen, uniq = set(), []
    for t in out:
        if id(t) not in seen:
            seen.add(id(t))
            uniq.append(t)
    return uniq


def snapshot_all(tensors):
    return [(t.clone(), t.data_ptr()) for t in tensors]


def check_rejected(op, args, name):
    tensors = _tensors(args)
    snap = snapshot_all(tensors)
    with pytest.raises(ValueError, match=re.escape(f"'{name}'")):
        call(op, args)
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize()
    assert_unchanged(tensors, snap)


# --------------------------------------------------------------------------- explicit cases


#: corruptions the Python wrappers of nhgd_ext.ops reject before any kernel
#: runs (a coefficient that is no float and no tensor, a tensor for a list):
#: the same code for both implementations, so run once, with no kernel at all
WRAPPER_KINDS = ("str", "none", "bool", "not_a_list")


def _explicit_params():
    """Each (op, target, kind) that is an error on a device, once per
    implementation (once with no kernel for WRAPPER_KINDS): float32,
    unbatched unless the corruption needs a batch. Cases that are no error
    on a device (a second device where there is none, ...) are not
    generated. The compiled kernels also get NaN data in float64: their
    finiteness scan is compiled once per dtype (checks.cpp: all_finite), the
    reference's is not."""
    params = []
    for device_param in DEVICES:
        device = device_param.values[0]
        for op in OPS:
            for target, kind in all_cases(op):
                batch = 2 if kind == "wrong_batch" else None
                if not applicable(op, target, kind, device, batch):
                    continue
                impls = ["wrapper"] if kind in WRAPPER_KINDS else IMPLEMENTATIONS
                runs = [(impl, torch.float32) for impl in impls]
                if kind == "nan" and target in DATA[op]:
                    runs.append(("compiled", torch.float64))
                for impl, dtype in runs:
                    tags = ["batched"] * (batch is not None) + ["f64"] * (dtype == torch.float64)
                    params.append(pytest.param(device, impl, dtype, op, target, kind, batch,
                                               id="-".join([device, impl, op, target, kind, *tags]),
                                               marks=device_param.marks))
    return params


@functools.cache
def _built(op, dtype, device, batch):
    return build(op, dtype, device, d=4, batch=batch)


def _fresh(args):
    """A copy of `args` with every tensor cloned (the explicit cases share their valid arguments)."""
    return {key: value.clone() if isinstance(value, torch.Tensor)
            else [x.clone() for x in value] if isinstance(value, list) else value
            for key, value in args.items()}


@pytest.mark.parametrize("device,impl,dtype,op,target,kind,batch", _explicit_params())
def test_bad_argument(device, impl, dtype, op, target, kind, batch):
    args = _fresh(_built(op, dtype, device, batch))
    name = corrupt(op, args, target, kind, device, random.Random(0))
    with kernels(impl):
        check_rejected(op, args, name)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_kfac_update_rejects_repeated_state_tensors(device, dtype, impl):
    """The same tensor twice among S_inv/G_inv would be updated twice, each
    from data read before the other wrote: an aliasing error."""
    for i, j, lists in ((0, 1, ("S_inv", "S_inv")), (0, 1, ("G_inv", "G_inv")), (0, 0, ("S_inv", "G_inv"))):
        args = build("kfac_update_", dtype, device, d=3)
        # make the two layers / factors the same size, so only the aliasing is wrong
        args["S_inv"][1] = _spd(3, 100, dtype, device)
        args["acts"][1] = _rows((2, 3), 101, dtype, device)
        args["G_inv"][1] = _spd(5, 102, dtype, device)
        args["grads"][1] = _rows((2, 5), 103, dtype, device)
        if lists == ("S_inv", "G_inv"):
            args["G_inv"][0] = args["S_inv"][0]
            args["grads"][0] = _rows((2, 3), 104, dtype, device)
        else:
            args[lists[1]][j] = args[lists[0]][i]
        with kernels(impl):
            check_rejected("kfac_update_", args, lists[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kfac_update_rejects_empty_lists(dtype):
    args = build("kfac_update_", dtype, "cpu")
    for key in ("S_inv", "G_inv", "acts", "grads"):
        args[key] = []
    with pytest.raises(ValueError, match="'S_inv'"):
        call("kfac_update_", args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_ops_layer_checks_without_the_wrapper(dtype):
    """The registered operators themselves (not only the Python wrappers) check."""
    A = _spd(4, 0, dtype, "cpu")
    snap = snapshot_all([A])
    with pytest.raises(ValueError, match="'g'"):
        torch.ops.nhgd_ext.sherman_morrison_(A, torch.ones(5, dtype=dtype), 0.9, 0.1)
    with pytest.raises(ValueError, match="'a'"):
        torch.ops.nhgd_ext.sherman_morrison_.tensor(A, torch.ones(4, dtype=dtype), torch.tensor([0.9]),
                                                    torch.tensor(0.1))
    with pytest.raises(ValueError, match="'b'"):
        torch.ops.nhgd_ext.sherman_morrison_(A, torch.ones(4, dtype=dtype), 0.9, -0.1)
    with pytest.raises(ValueError, match="'H'"):
        torch.ops.nhgd_ext.woodbury_(A, torch.ones(2, 3, dtype=dtype), 0.9)
    with pytest.raises(ValueError, match="'B'"):
        torch.ops.nhgd_ext.running_average_(A, torch.ones(4, dtype=dtype), 0.9, 0.1)
    with pytest.raises(ValueError, match="'status'"):
        torch.ops.nhgd_ext.running_average_(A, A.clone(), 0.9, 0.1, torch.zeros(1, dtype=torch.int64))
    assert_unchanged([A], snap)


# --------------------------------------------------------------------------- hypothesis: bad input

HYP = settings(max_examples=300, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("device", DEVICES)
@HYP
@given(data=st.data())
def test_random_bad_arguments(device, impl, data):
    op = data.draw(st.sampled_from(OPS), label="op")
    batch = data.draw(st.sampled_from([None, 1, 2, 3]), label="batch") if op in BATCHED else None
    cases = [c for c in all_cases(op) if applicable(op, c[0], c[1], device, batch)]
    target, kind = data.draw(st.sampled_from(cases), label="corruption")
    dmin = 2 if kind in ("transposed", "strided") else 1
    d = data.draw(st.integers(dmin, 9), label="d")
    k = data.draw(st.integers(1, 5), label="k")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    with_status = data.draw(st.booleans(), label="with_status") and op in WITH_STATUS
    float_coeffs = data.draw(st.booleans(), label="float_coeffs")
    args = build(op, dtype, device, d=d, batch=batch, k=k, seed=seed)
    if with_status:
        args["status"] = ops.new_status(device)
    if op == "sherman_morrison_":
        args["lower_only"] = data.draw(st.booleans(), label="lower_only")
    if not float_coeffs:  # the tensor overload: 0-d CPU tensors
        for c in COEFFS[op]:
            args[c] = torch.tensor(args[c], dtype=torch.float64)
    name = corrupt(op, args, target, kind, device, random.Random(seed))
    with kernels(impl):
        check_rejected(op, args, name)


# --------------------------------------------------------------------------- hypothesis: valid input


#: the reference kernels are checked against the float64 inverse on the CPU only
VALID_RUNS = [pytest.param(p.values[0], impl, id=f"{p.values[0]}-{impl}", marks=p.marks)
              for p in DEVICES for impl in IMPLEMENTATIONS if impl == "compiled" or p.values[0] == "cpu"]


@pytest.mark.parametrize("device,impl", VALID_RUNS)
@HYP
@given(
    op=st.sampled_from(["sherman_morrison_", "woodbury_"]),
    d=st.integers(1, 8),
    batch=st.sampled_from([None, 1, 2]),
    k=st.integers(1, 6),
    a=st.floats(0.1, 1.0, exclude_min=True),
    b=st.floats(0.0, 1.0),
    scale=st.floats(0.0, 2.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    tensor_coeffs=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_valid_updates_match_direct_inverse(device, impl, op, d, batch, k, a, b, scale, dtype, tensor_coeffs,
                                                   seed):
    with kernels(impl):
        _check_valid_update(device, op, d, batch, k, a, b, scale, dtype, tensor_coeffs, seed)


def _check_valid_update(device, op, d, batch, k, a, b, scale, dtype, tensor_coeffs, seed):
    A = _spd(d, seed, dtype, device, batch)
    M = inv64(A)
    scaled_before = float(A.double().norm()) / a
    lead = (batch,) if batch else ()
    if op == "sherman_morrison_":
        g = _rows(lead + (d,), seed + 1, dtype, device, scale=scale / math.sqrt(d))
        ca, cb = (torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)) if tensor_coeffs \
            else (a, b)
        ops.sherman_morrison_(A, g, ca, cb)
        g64 = g.double().cpu()
        M_new = a * M + b * g64.unsqueeze(-1) * g64.unsqueeze(-2)
    else:
        H = _rows(lead + (k, d), seed + 1, dtype, device, scale=scale / math.sqrt(d * k))
        ops.woodbury_(A, H, torch.tensor(a, dtype=torch.float64) if tensor_coeffs else a)
        H64 = H.double().cpu()
        M_new = a * M + H64.mT @ H64
    ev = torch.linalg.eigvalsh(M_new)
    cond = float((ev[..., -1] / ev[..., 0]).max())
    assert_exactly_symmetric(A)
    expected = direct_inverse(M_new)
    err = rel_err(A, expected)
    # Both updates subtract a correction from A / a: where the new inverse is
    # much smaller than A / a (a large update against a small a), rounding
    # errors of A / a's size are left on a small result. That cancellation
    # factor joins the condition number in the bound.
    cancellation = scaled_before / float(expected.norm())
    # woodbury_ solves a k x k system on top: its error grows like sqrt(k)
    bound = tol(dtype, d, steps=k if op == "woodbury_" else 1, cond=max(cond, cancellation, 4.0))
    assert err <= bound, f"relative error {err:.3e} (cond {cond:.1f})"
