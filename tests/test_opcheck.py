"""torch.library.opcheck on every overload, and torch.compile(fullgraph=True)
through the Python wrappers."""

from __future__ import annotations

import pytest
import torch

from nhgd_ext import ops
from nhgd_testing import DEVICES, DTYPES, rand_rows, random_spd, rel_err, state_from

OPS = torch.ops.nhgd_ext


def _spd(d, dtype, device, batch=None, seed=0):
    return state_from(random_spd(d, batch=batch, seed=seed), dtype, device)


def _scalar(v, dtype, device):
    return torch.tensor(v, dtype=dtype, device=device)


def sample_inputs(device, dtype):
    """(name, overload, args, kwargs) for every overload, valid inputs."""
    A = lambda **kw: _spd(6, dtype, device, **kw)  # noqa: E731
    g = rand_rows(6, seed=1, dtype=dtype).to(device)
    gb = rand_rows(2, 6, seed=2, dtype=dtype).to(device)
    H = rand_rows(3, 6, seed=3, dtype=dtype).to(device)
    Hb = rand_rows(2, 3, 6, seed=4, dtype=dtype).to(device)
    st = lambda: ops.new_status(device)  # noqa: E731

    def pending():  # a pending update that is not empty, so every path runs
        p = ops.new_pending(6, dtype=dtype, device=device)
        p[0], p[1] = 1.25, 0.01
        p[2:] = rand_rows(6, seed=5, dtype=dtype).to(device)
        return p

    S = lambda: [_spd(3, dtype, device, seed=10), _spd(5, dtype, device, seed=11)]  # noqa: E731
    G = lambda: [_spd(2, dtype, device, seed=12), _spd(4, dtype, device, seed=13)]  # noqa: E731
    acts = [rand_rows(4, 3, seed=14, dtype=dtype).to(device), rand_rows(2, 5, seed=15, dtype=dtype).to(device)]
    grads = [rand_rows(4, 2, seed=16, dtype=dtype).to(device), rand_rows(2, 4, seed=17, dtype=dtype).to(device)]
    V = [rand_rows(2, 3, seed=18, dtype=dtype).to(device), rand_rows(4, 5, seed=19, dtype=dtype).to(device)]
    L = lambda: rand_rows(3, 4, seed=20, dtype=dtype).to(device)  # noqa: E731
    B = rand_rows(3, 4, seed=21, dtype=dtype).to(device)
    ta, tb = _scalar(0.9, dtype, device), _scalar(0.1, dtype, device)
    cta, ctb = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    cases = [
        ("sm", OPS.sherman_morrison_.default, (A(), g, 0.9, 0.1), {}),
        ("sm_status", OPS.sherman_morrison_.default, (A(), g, 0.9, 0.1, st()), {}),
        ("sm_batched", OPS.sherman_morrison_.default, (A(batch=2), gb, 0.9, 0.1), {"status": st()}),
        ("sm_tensor", OPS.sherman_morrison_.tensor, (A(), g, ta, tb), {}),
        ("sm_tensor_cpu_coeff", OPS.sherman_morrison_.tensor, (A(batch=2), gb, cta, ctb, st()), {}),
        ("sm_lower_only", OPS.sherman_morrison_.default, (A(), g, 0.9, 0.1, None, True), {}),
        ("sm_tensor_lower_only", OPS.sherman_morrison_.tensor, (A(batch=2), gb, ta, tb),
         {"status": st(), "lower_only": True}),
        ("symmetrize", OPS.symmetrize_.default, (A(),), {}),
        ("deferred", OPS.sherman_morrison_deferred_.default, (A(), pending(), g, 0.9, 0.1), {}),
        ("deferred_status", OPS.sherman_morrison_deferred_.default, (A(), pending(), g, 0.9, 0.1, st()), {}),
        ("apply_pending", OPS.apply_pending_.default, (A(), pending()), {}),
        ("symmetric_matvec", OPS.symmetric_matvec.default, (A(), g), {}),
        ("symmetrize_batched", OPS.symmetrize_.default, (rand_rows(3, 5, 5, seed=22, dtype=dtype).to(device),), {}),
        ("wb", OPS.woodbury_.default, (A(), H, 0.8), {}),
        ("wb_batched_status", OPS.woodbury_.default, (A(batch=2), Hb, 0.8, st()), {}),
        ("wb_tensor", OPS.woodbury_.tensor, (A(), H, ta), {}),
        ("wb_tensor_status", OPS.woodbury_.tensor, (A(batch=2), Hb, cta), {"status": st()}),
        ("kfac", OPS.kfac_update_.default, (S(), G(), acts, grads, 0.9, 0.1), {}),
        ("kfac_status", OPS.kfac_update_.default, (S(), G(), acts, grads, 0.9, 0.1, st()), {}),
        ("kfac_tensor", OPS.kfac_update_.tensor, (S(), G(), acts, grads, ta, tb), {"status": st()}),
        ("kfac_apply", OPS.kfac_apply.default, (S(), G(), V), {}),
        ("ra", OPS.running_average_.default, (L(), B, 0.5, 0.5), {}),
        ("ra_status", OPS.running_average_.default, (L(), B, 0.5, 0.5, st()), {}),
        ("ra_tensor", OPS.running_average_.tensor, (L(), B, ta, tb), {}),
        ("ra_tensor_cpu_coeff", OPS.running_average_.tensor, (L(), B, cta, ctb), {"status": st()}),
    ]
    return cases


CASE_NAMES = [c[0] for c in sample_inputs("cpu", torch.float64)]


def test_every_overload_is_covered():
    covered = {str(c[1]) for c in sample_inputs("cpu", torch.float64)}
    expected = {
        "nhgd_ext.sherman_morrison_.default", "nhgd_ext.sherman_morrison_.tensor",
        "nhgd_ext.woodbury_.default", "nhgd_ext.woodbury_.tensor",
        "nhgd_ext.kfac_update_.default", "nhgd_ext.kfac_update_.tensor",
        "nhgd_ext.kfac_apply.default",
        "nhgd_ext.running_average_.default", "nhgd_ext.running_average_.tensor",
        "nhgd_ext.symmetrize_.default",
        "nhgd_ext.sherman_morrison_deferred_.default", "nhgd_ext.apply_pending_.default",
        "nhgd_ext.symmetric_matvec.default",
    }
    assert covered == expected


def test_schemas():
    """The mutating ops return nothing at the schema level and declare their mutations."""
    for name in ("sherman_morrison_", "woodbury_", "kfac_update_", "running_average_"):
        for ov in ("default", "tensor"):
            schema = getattr(getattr(OPS, name), ov)._schema
            assert len(schema.returns) == 0, (name, ov, str(schema))
            mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
            assert mutated[-1] == "status", str(schema)
            assert set(mutated[:-1]) == ({"A"} if name in ("sherman_morrison_", "woodbury_") else
                                         {"L"} if name == "running_average_" else {"S_inv", "G_inv"}), str(schema)
            if name == "sherman_morrison_":
                last = schema.arguments[-1]
                assert last.name == "lower_only" and str(last.type) == "bool" and last.default_value is False
    sym = OPS.symmetrize_.default._schema
    assert len(sym.returns) == 0
    assert [a.name for a in sym.arguments if a.alias_info is not None and a.alias_info.is_write] == ["A"]
    assert len(OPS.kfac_apply.default._schema.returns) == 1


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, dtype, case):
    name, op, args, kwargs = next(c for c in sample_inputs(device, dtype) if c[0] == case)
    torch.library.opcheck(op, args, kwargs)


def _program(A, Ab, g, gb, H, L, B, S_inv, G_inv, acts, grads, V, a, b):
    ops.sherman_morrison_(A, g, a, b)
    ops.sherman_morrison_(Ab, gb, a, b, lower_only=True)
    ops.symmetrize_(Ab)
    ops.woodbury_(A, H, a)
    ops.running_average_(L, B, a, b)
    ops.kfac_update_(S_inv, G_inv, acts, grads, a, b)
    out = ops.kfac_apply(S_inv, G_inv, V)
    # some ordinary ops around the custom ones: read-after-write must be kept
    return A.trace() + Ab.sum(), L * 2, [o + 1 for o in out]


def _program_inputs(device, dtype, coeffs):
    c = {name: args for name, _, args, _ in sample_inputs(device, dtype)}
    A, g = c["sm"][:2]
    Ab, gb = c["sm_batched"][:2]
    H = c["wb"][1]
    L, B = c["ra"][:2]
    S_inv, G_inv, acts, grads = c["kfac"][:4]
    V = c["kfac_apply"][2]
    if coeffs == "float":
        a, b = 0.9, 0.1
    else:
        a, b = _scalar(0.9, dtype, device), _scalar(0.1, dtype, device)
    return [A, Ab, g, gb, H, L, B, S_inv, G_inv, acts, grads, V, a, b]


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, list):
        return [_clone(y) for y in x]
    return x


def _flat(xs):
    for x in xs:
        if isinstance(x, (list, tuple)):
            yield from _flat(x)
        else:
            yield x


def _compare_compiled(backend, device, dtype, coeffs):
    torch._dynamo.reset()
    inputs = _program_inputs(device, dtype, coeffs)
    eager_in, compiled_in = _clone(inputs), _clone(inputs)
    eager_out = _program(*eager_in)
    compiled = torch.compile(_program, fullgraph=True, backend=backend)
    compiled_out = compiled(*compiled_in)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    # the returned values and the mutated state both match eager
    for e, c in zip(_flat([eager_out, eager_in[:2], eager_in[5], eager_in[7], eager_in[8]]),
                    _flat([compiled_out, compiled_in[:2], compiled_in[5], compiled_in[7], compiled_in[8]])):
        assert e.shape == c.shape
        assert rel_err(c.reshape(1, 1, -1) if c.dim() < 2 else c, e.double().cpu().reshape(1, 1, -1) if e.dim() < 2
                       else e.double().cpu()) <= rtol


@pytest.mark.parametrize("coeffs", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_compile_aot_eager_matches_eager(device, dtype, coeffs):
    _compare_compiled("aot_eager", device, dtype, coeffs)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_matches_eager(device):
    _compare_compiled("inductor", device, torch.float32, "float")


def _to_meta(x):
    if isinstance(x, (list, tuple)):
        return type(x)(t.to("meta") for t in x)
    return x.to("meta")


def _movable(args) -> list[int]:
    """The positions after the first of the arguments that hold tensors (not 0-d coefficients)."""
    return [i for i, a in enumerate(args) if i > 0 and (
        (isinstance(a, torch.Tensor) and a.dim() > 0) or (isinstance(a, list) and a))]


MIXABLE = [c[0] for c in sample_inputs("cpu", torch.float64) if _movable(c[2])]
assert len(MIXABLE) == len(CASE_NAMES) - 2  # only symmetrize_'s two cases take one tensor


@pytest.mark.parametrize("case", MIXABLE)
def test_a_meta_argument_beside_real_tensors_is_refused_not_silently_skipped(case):
    """Any meta argument sends an op to its Meta kernel, which must not
    return as if it had updated the real state."""
    name, op, args, kwargs = next(c for c in sample_inputs("cpu", torch.float64) if c[0] == case)
    first = args[0]
    before = [t.clone() for t in first] if isinstance(first, list) else first.clone()
    for i in _movable(args):
        mixed = list(args)
        mixed[i] = _to_meta(args[i])
        with pytest.raises(ValueError, match="is on meta, but"):
            op(*mixed, **kwargs)
    after = args[0]
    if isinstance(before, list):
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    else:
        assert torch.equal(after, before)


def test_the_registered_schemas_are_the_ones_in_csrc_schemas_h():
    """One list of schemas (csrc/schemas.h): what the compiled module
    registered, what the reference backend defines and what the fake kernels
    cover are that list, and the namespace holds nothing else."""
    import nhgd_ext
    from nhgd_ext._reference import SCHEMAS

    assert nhgd_ext.backend("cpu") == "cpp"
    registered = {}
    for op in dir(torch.ops.nhgd_ext):
        packet = getattr(torch.ops.nhgd_ext, op)
        if not hasattr(packet, "overloads") or op.startswith("_"):
            continue
        for overload in packet.overloads():
            name = op if overload == "default" else f"{op}.{overload}"
            registered[name] = str(getattr(packet, overload)._schema).removeprefix("nhgd_ext::" + name)
    assert registered == SCHEMAS
    assert len(SCHEMAS) == 13
