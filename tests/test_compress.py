"""Quantisation from the formula, checked against PyTorch's own quantiser, observers and dynamic-int8 Linear (used here only
as the reference: they are deprecated in PyTorch 2.13, and the library does not call them)."""
import warnings

import pytest
import torch

from bigmodel_nb.compress import EPS, QParams, QuantError, choose_qparams, int8_linear, qrange

warnings.filterwarnings("ignore", message=".*(quantize_per_tensor|torch.ao.quantization).*")
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver  # noqa: E402


def _observed(x, axis=None, symmetric=True, signed=True, reduce_range=False):
    dtype = torch.qint8 if signed else torch.quint8
    if axis is None:
        obs = MinMaxObserver(dtype=dtype, qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine, reduce_range=reduce_range)
    else:
        obs = PerChannelMinMaxObserver(ch_axis=axis, dtype=dtype, reduce_range=reduce_range,
                                       qscheme=torch.per_channel_symmetric if symmetric else torch.per_channel_affine)
    obs(x)
    s, z = obs.calculate_qparams()
    return s, z, dtype


CASES = [dict(), dict(symmetric=False), dict(axis=0), dict(axis=1), dict(axis=-1, symmetric=False), dict(symmetric=True, signed=False),
         dict(symmetric=False, signed=True), dict(reduce_range=True), dict(symmetric=False, reduce_range=True)]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CASES])
@pytest.mark.parametrize("shift", [0.0, 0.9])
def test_same_scale_zero_point_and_integers_as_pytorch(kw, shift):
    torch.manual_seed(1)
    x = torch.randn(37, 53) * torch.rand(37, 1) * 3 + shift            # rows of different ranges; shifted: not centred on 0
    qp = choose_qparams(x, **kw)
    symmetric = kw.get("symmetric", True)
    s, z, dtype = _observed(x, kw.get("axis"), symmetric, kw.get("signed", symmetric), kw.get("reduce_range", False))
    assert torch.equal(qp.scale, s.reshape(qp.scale.shape)) and torch.equal(qp.zero_point, z.reshape(qp.zero_point.shape).long())
    if qp.axis is None: theirs = torch.quantize_per_tensor(x, s.item(), int(z), dtype)
    else: theirs = torch.quantize_per_channel(x, s, z, qp.axis, dtype)
    q = qp.quantize(x)
    if kw.get("reduce_range"):            # torch's integers still span all 8 bits; the reduced grid clips its one extreme value
        assert torch.equal(q, theirs.int_repr().long().clamp(qp.qmin, qp.qmax))
    else:
        assert torch.equal(q, theirs.int_repr().long())
        assert torch.allclose(qp.dequantize(q), theirs.dequantize(), atol=0, rtol=0)
    assert ((x - qp.fake(x)).abs() <= qp.half_step(x) * (1 + 1e-4)).all()        # the error bound, inside the range
    assert q.min() >= qp.qmin and q.max() <= qp.qmax


def test_ranges_and_zero():
    assert qrange(8) == (-128, 127) and qrange(8, signed=False) == (0, 255) and qrange(4) == (-8, 7)
    zeros = torch.zeros(5, 3)
    qp = choose_qparams(zeros)
    s, _, _ = _observed(zeros)
    assert qp.scale.item() == s.item() == EPS and torch.equal(qp.fake(zeros), zeros)
    x = torch.tensor([-1.0, 0.0, 0.3, 2.0])
    for sym in (True, False):
        assert choose_qparams(x, symmetric=sym).fake(x)[1] == 0.0              # 0 is always exactly on the grid


def test_outside_the_range_is_clipped():
    qp = choose_qparams(torch.tensor([-1.0, 1.0]))
    far = torch.tensor([5.0, -5.0])
    assert qp.quantize(far).tolist() == [127, -128]


def test_int8_linear_matches_pytorchs_dynamic_int8_layer():
    torch.manual_seed(2)
    for d_in, d_out, shape in [(48, 16, (64,)), (384, 384, (3, 11)), (20, 7, (1,))]:
        lin = torch.nn.Linear(d_in, d_out)
        x = torch.randn(*shape, d_in) * 2 + 0.3
        qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)[0]
        with torch.no_grad():
            ours, theirs = int8_linear(x, lin.weight, lin.bias), qlin(x)
            assert ours.shape == theirs.shape
            assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-6), (ours - theirs).abs().max()
            assert qlin.weight().q_scale() == choose_qparams(lin.weight).scale.item()
            no_bias = int8_linear(x, lin.weight)
            assert torch.allclose(no_bias + lin.bias, ours, atol=1e-5)


def test_the_integer_sums_are_exact():
    torch.manual_seed(3)
    x, w = torch.randn(5, 300), torch.randn(10, 300)
    qx, qw = choose_qparams(x, symmetric=False, reduce_range=True), choose_qparams(w)
    a = (qx.quantize(x) - qx.zero_point).to(torch.int32) @ qw.quantize(w).to(torch.int32).T
    b = (qx.quantize(x) - qx.zero_point).double() @ qw.quantize(w).double().T
    assert a.dtype == torch.int32 and torch.equal(a.double(), b)


@pytest.mark.parametrize("call, words", [
    (lambda: qrange(1), "bits=1"), (lambda: qrange(True), "bits=True"),
    (lambda: choose_qparams(torch.tensor([])), "empty"), (lambda: choose_qparams(torch.tensor([1.0, float("nan")])), "NaN"),
    (lambda: choose_qparams(torch.ones(3, 4), axis=2), "axis=2"), (lambda: choose_qparams(torch.ones(3, dtype=torch.long)), "floating-point"),
])
def test_bad_arguments_are_named(call, words):
    with pytest.raises(QuantError, match=words):
        call()
    assert issubclass(QuantError, ValueError) and QParams
