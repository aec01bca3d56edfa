"""The native int8 kernels equal the portable path bit for bit; without them, the portable path runs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticzo.int8 import native, ops
from elasticzo.int8.bias import accumulator_room
from elasticzo.int8.format import QTensor, requantize_int32
from elasticzo.int8.layers import IntConv2d, requantize_tiled

pytestmark = pytest.mark.skipif(native.load() is None, reason="native kernels do not build here (see the log line)")
FAST = settings(max_examples=40, deadline=None)
FILLS = ("random", "all+127", "all-127", "all-128", "relu")  # the extremes a property must survive


def _fill(shape, fill: str, gen: torch.Generator) -> torch.Tensor:
    if fill == "random":
        return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    if fill == "relu":  # NITI activations after ReLU: 0..127
        return torch.randint(0, 128, shape, generator=gen, dtype=torch.int8)
    return torch.full(shape, int(fill[3:]), dtype=torch.int8)


def _ops():
    from elasticzo.int8.native_ops import OPS

    return OPS


@FAST
@given(st.integers(1, 70), st.integers(1, 40), st.integers(0, 300), st.sampled_from(FILLS), st.sampled_from(FILLS),
       st.integers(0, 2**31))
def test_gemm_equals_int64_matmul(m, n, k, fill_a, fill_b, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = _fill((m, k), fill_a, gen), _fill((n, k), fill_b, gen)
    assert torch.equal(_ops().gemm_nt(a, b), (a.long() @ b.long().t()).int())


conv_shapes = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 10),  # B, C, O (> 8: two row blocks)
                        st.integers(1, 5), st.integers(1, 5),  # kh, kw
                        st.integers(0, 9), st.integers(0, 20),  # extra H, W beyond the kernel (OW >= 16: wide runs)
                        st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(0, 2))  # stride, pad


def _conv_case(shape, fill_x, fill_w, seed):
    b, c, o, kh, kw, eh, ew, sh, sw, ph, pw = shape
    gen = torch.Generator().manual_seed(seed)
    x, w = _fill((b, c, kh + eh, kw + ew), fill_x, gen), _fill((o, c, kh, kw), fill_w, gen)
    return x, w, (sh, sw), (min(ph, kh - 1), min(pw, kw - 1))


@FAST
@given(conv_shapes, st.sampled_from(FILLS), st.sampled_from(FILLS), st.integers(0, 2**31))
def test_conv2d_equals_float64_conv(shape, fill_x, fill_w, seed):
    x, w, stride, padding = _conv_case(shape, fill_x, fill_w, seed)
    want = F.conv2d(x.double(), w.double(), stride=stride, padding=padding)  # exact: |acc| < 2**53
    assert torch.equal(_ops().conv2d(x, w, list(stride), list(padding)), want.int())


@FAST
@given(conv_shapes, st.sampled_from(FILLS), st.sampled_from(FILLS), st.integers(0, 2**31), st.integers(0, 4))
def test_fused_requantisation_equals_whole_accumulator(shape, fill_x, fill_w, seed, quiet):
    """One pass with per-image provisional shifts == requantize_int32 of the whole accumulator."""
    x, w, stride, padding = _conv_case(shape, fill_x, fill_w, seed)
    x[: min(quiet, x.shape[0] - 1)] >>= 5  # images with smaller shifts than the loudest one
    acc = F.conv2d(x.double(), w.double(), stride=stride, padding=padding).long()
    want = requantize_int32(acc, 0)
    values, shift = _ops().conv2d_requant(x, w, list(stride), list(padding))
    assert torch.equal(values, want.values) and int(shift) == int(want.exponent)


def _edge_bias(o: int, kind: str, room: int, gen: torch.Generator) -> torch.Tensor:
    """int32 [o]: at the saturation edges +-room (what a large bias becomes), alternating, or random within."""
    if kind == "random":
        return torch.randint(-room, room + 1, (o,), generator=gen, dtype=torch.int64).int()
    edge = torch.full((o,), room, dtype=torch.int32)
    return edge if kind == "+room" else (-edge if kind == "-room" else edge * (1 - 2 * (torch.arange(o) % 2)).int())


@FAST
@given(conv_shapes, st.sampled_from(FILLS), st.sampled_from(FILLS), st.sampled_from(("random", "+room", "-room", "alt")),
       st.integers(0, 2**31))
def test_fused_requantisation_with_bias_equals_whole_accumulator(shape, fill_x, fill_w, bias_kind, seed):
    """acc + bias (saturated to the accumulator's room) requantised in one fused pass == the int64 reference."""
    x, w, stride, padding = _conv_case(shape, fill_x, fill_w, seed)
    bias = _edge_bias(w.shape[0], bias_kind, accumulator_room(w[0].numel()), torch.Generator().manual_seed(seed))
    acc = F.conv2d(x.double(), w.double(), stride=stride, padding=padding).long() + bias.long().view(1, -1, 1, 1)
    assert acc.abs().max() <= 2**31 - 1  # the room keeps the biased sum in int32
    want = requantize_int32(acc, 0)
    values, shift = _ops().conv2d_requant(x, w, list(stride), list(padding), bias)
    assert torch.equal(values, want.values) and int(shift) == int(want.exponent)


@FAST
@given(conv_shapes, st.sampled_from(FILLS), st.sampled_from(FILLS), st.sampled_from(FILLS), st.integers(-30, 30),
       st.integers(0, 2**31))
def test_biased_conv_layer_native_equals_reference(shape, fill_x, fill_w, fill_b, shift, seed):
    """IntConv2d with an int8 bias: the fused native forward == the portable reference forward, bit for bit,
    over bias alignments from far right (rounded away) to far left (saturated to the room)."""
    x, w, stride, padding = _conv_case(shape, fill_x, fill_w, seed)
    w[w == -128] = -127  # NITI weights are symmetric
    bias = _fill((w.shape[0],), fill_b, torch.Generator().manual_seed(seed + 1))
    q = QTensor(x, -7)
    results = []
    for impl in ("reference", "native"):
        with ops.matmul_impl(impl):
            layer = IntConv2d(w, -6, stride=stride, padding=padding, bias=bias, bias_exponent=-13 + shift)
            out = layer.forward(q, store=False)
            results.append((out.values, int(out.exponent)))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def test_native_conv_rejects_a_bias_of_the_wrong_length():
    x, w = torch.zeros(1, 1, 4, 4, dtype=torch.int8), torch.zeros(3, 1, 2, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match="2 entries"):
        _ops().conv2d_requant(x, w, [1, 1], [0, 0], torch.zeros(2, dtype=torch.int32))


@FAST
@given(conv_shapes, st.sampled_from(FILLS), st.integers(0, 2**31))
def test_conv_weight_gradient_equals_reference(shape, fill, seed):
    x, w, stride, padding = _conv_case(shape, fill, "random", seed)
    g = torch.randint(-127, 128, ops.int8_conv2d(x, w, stride, padding, "reference").shape, dtype=torch.int8)
    want = ops.int8_conv2d_grad_weight(g, x, w.shape, stride, padding, "reference")
    got = ops.int8_conv2d_grad_weight(g, x, w.shape, stride, padding, "native")
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("tile", [0, 3])
def test_layer_native_equals_reference_forward_and_backward(tile):
    """IntConv2d through the native path == through the reference path: output, exponent, gradients."""
    gen = torch.Generator().manual_seed(3)
    x = QTensor(torch.randint(0, 128, (7, 3, 12, 12), generator=gen, dtype=torch.int8), -7)
    w = torch.randint(-127, 128, (5, 3, 5, 5), generator=gen, dtype=torch.int8)
    g = QTensor(torch.randint(-127, 128, (7, 5, 10, 10), generator=gen, dtype=torch.int8), -9)
    results = {}
    for impl in ("reference", "native"):
        ops.set_matmul_impl(impl)
        try:
            layer = IntConv2d(w, -6, padding=1, tile=tile)
            out = layer.forward(x, store=True)
            gin = layer.backward(g)
            results[impl] = (out.values, int(out.exponent), layer.grad_acc, gin.values, int(gin.exponent))
        finally:
            ops.set_matmul_impl("auto")
    for ref, nat in zip(results["reference"], results["native"]):
        assert ref == nat if isinstance(ref, int) else torch.equal(ref, nat)


def test_tiled_requantisation_still_equals_fused():
    """The portable tiled path and the native fused one agree on a real LeNet-5 conv shape."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (64, 6, 14, 14), generator=gen, dtype=torch.int8)
    w = torch.randint(-127, 128, (16, 6, 5, 5), generator=gen, dtype=torch.int8)
    tiled = requantize_tiled(lambda lo, hi: ops.int8_conv2d(x[lo:hi], w, 1, 0, "reference"), 64, 8, 0)
    values, shift = ops.int8_conv2d_requant(x, w, 1, 0, "native")
    assert torch.equal(values, tiled.values) and int(shift) == int(tiled.exponent)


def test_auto_picks_an_available_exact_implementation():
    choice = ops.choose_impl("cpu")
    assert set(choice) == {"matmul", "conv"}
    from elasticzo.int8.speed_probe import candidates

    assert all(impl in candidates() for impl in choice.values())


def test_cache_key_includes_the_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("ELASTICZO_CACHE", str(tmp_path))
    cc = native._compiler()
    a = native.build(cc, native.compile_flags() + ["-DEZO_PROBE_A"])
    b = native.build(cc, native.compile_flags() + ["-DEZO_PROBE_B"])
    assert a != b and a.exists() and b.exists()
    assert native.build(cc, native.compile_flags() + ["-DEZO_PROBE_A"]) == a  # cached, not rebuilt


def _load_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "import torch\nfrom elasticzo.int8 import native, ops\n"
            "print('LOADED', native.load() is not None)\n"
            "a = torch.randint(-127, 128, (5, 7), dtype=torch.int8)\n"
            "print('EXACT', torch.equal(ops.int8_matmul(a, a.t(), 'native'), (a.long() @ a.long().t()).int()))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.parametrize("env", [{"ELASTICZO_NATIVE": "0"}, {"ELASTICZO_CC": "/bin/false"}])
def test_falls_back_to_the_portable_path_with_one_log_line(env, tmp_path):
    res = _load_in_subprocess({**env, "ELASTICZO_CACHE": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "LOADED False" in res.stdout and "EXACT True" in res.stdout  # "native" falls back, still exact
    assert sum("portable PyTorch path" in line for line in (res.stdout + res.stderr).splitlines()) == 1


# ---------------------------------------------------------------- the elementwise kernels of a step


def _portable(fn):
    """fn() with the portable PyTorch path everywhere."""
    with ops.matmul_impl("reference"):
        return fn()


@FAST
@given(st.integers(1, 300), st.integers(-(2**31) + 1, 2**31 - 1), st.integers(0, 2**31))
def test_requantize_native_equals_portable(n, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    acc = (torch.randint(-(2**15), 2**15, (n,), generator=gen, dtype=torch.int64) * scale // 2**15).to(torch.int32)
    want = _portable(lambda: requantize_int32(acc, 3))
    got = requantize_int32(acc, 3)
    assert torch.equal(got.values, want.values) and int(got.exponent) == int(want.exponent)


@FAST
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4),
       st.sampled_from(FILLS), st.booleans(), st.integers(0, 2**31))
def test_maxpool_native_equals_portable(b, c, kh, kw, sh, sw, fill, with_argmax, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _fill((b, c, kh + 5, kw + 6), fill, gen)
    want = _portable(lambda: ops.int8_maxpool2d(x, (kh, kw), (sh, sw), with_argmax))
    got = ops.int8_maxpool2d(x, (kh, kw), (sh, sw), with_argmax)
    assert torch.equal(got[0], want[0])
    assert (got[1] is None and want[1] is None) or torch.equal(got[1], want[1])


@FAST
@given(st.integers(1, 500), st.integers(-(2**62), 2**62), st.integers(0, 62), st.sampled_from(FILLS),
       st.integers(0, 2**31))
def test_zo_update_and_perturb_native_equal_portable(n, d, s, fill, seed):
    from elasticzo.int8.update import perturb_weight as perturb, zo_update

    gen = torch.Generator().manual_seed(seed)
    w = _fill((n,), fill, gen).clamp(min=-127)
    z = torch.randint(-1, 2, (n,), generator=gen, dtype=torch.int8)
    carry = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    dt, st_ = torch.tensor(d), torch.tensor(s)
    c_want, c_got = carry.clone(), carry.clone()
    want = _portable(lambda: zo_update(w, z, dt, st_, carry=c_want))
    got = zo_update(w, z, dt, st_, carry=c_got)
    assert torch.equal(got, want) and torch.equal(c_got, c_want)
    for eps in (1, -1, 127, -127):
        assert torch.equal(perturb(w, z, eps), _portable(lambda: perturb(w, z, eps)))


@FAST
@given(st.integers(1, 70), st.integers(2, 40), st.integers(-14, 6), st.sampled_from(FILLS), st.integers(0, 2**31))
def test_cross_entropy_native_equals_portable(b, c, exponent, fill, seed):
    from elasticzo.int8.loss import cross_entropy, cross_entropy_loss

    gen = torch.Generator().manual_seed(seed)
    logits = QTensor(_fill((b, c), fill, gen).clamp(min=-127), exponent)
    y = torch.randint(0, c, (b,), generator=gen)
    want_loss, want_grad = _portable(lambda: cross_entropy(logits, y))
    got_loss, got_grad = cross_entropy(logits, y)
    assert torch.equal(got_loss, want_loss) and torch.equal(got_grad.values, want_grad.values)
    assert got_grad.exponent == want_grad.exponent
    per = cross_entropy_loss(logits, y, reduction="none")
    assert torch.equal(per, _portable(lambda: cross_entropy_loss(logits, y, reduction="none")))
    per = cross_entropy_loss(logits, y, reduction="none")
    assert torch.equal(per, _portable(lambda: cross_entropy_loss(logits, y, reduction="none")))


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (1, 2, 10, 17), (3, 1, 9, 19), (1, 1, 4, 16)])
@pytest.mark.parametrize("with_argmax", [False, True])
def test_maxpool_2x2_fast_path_equals_portable(shape, with_argmax):
    """LeNet's 2x2 / stride-2 pools take a vector path (8 outputs at a time, overlapping tail)."""
    x = _fill(shape, "random", torch.Generator().manual_seed(sum(shape)))
    want = _portable(lambda: ops.int8_maxpool2d(x, 2, 2, with_argmax))
    got = ops.int8_maxpool2d(x, 2, 2, with_argmax)
    assert torch.equal(got[0], want[0]) and (not with_argmax or torch.equal(got[1], want[1]))


@FAST
@given(st.integers(1, 40000), st.integers(-(2**40), 2**40), st.integers(0, 40), st.sampled_from([1, -1, 3, -127]),
       st.sampled_from(FILLS), st.integers(0, 2**31))
def test_streamed_zo_steps_native_equal_portable(n, d, s, eps, fill, seed):
    """perturbed_weight / zo_update_ expand the same random words inside the kernel (rounds of 16384 bits)."""
    from elasticzo.int8.update import perturbed_weight, zo_update_

    gen = torch.Generator().manual_seed(seed)
    w = _fill((n,), fill, gen).clamp(min=-127)
    carry = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    g = lambda: torch.Generator().manual_seed(seed + 1)
    assert torch.equal(perturbed_weight(w, g(), eps), _portable(lambda: perturbed_weight(w, g(), eps)))
    w_nat, c_nat, w_ref, c_ref = w.clone(), carry.clone(), w.clone(), carry.clone()
    zo_update_(w_nat, g(), torch.tensor(d), torch.tensor(s), c_nat)
    _portable(lambda: zo_update_(w_ref, g(), torch.tensor(d), torch.tensor(s), c_ref))
    assert torch.equal(w_nat, w_ref) and torch.equal(c_nat, c_ref)


def _train_steps(method: dict, through_dispatcher: bool, monkeypatch, steps: int = 2):
    """The weights of an INT8 LeNet-5 after ``steps`` steps on a fixed random batch."""
    from elasticzo.config import TrainConfig
    from elasticzo.int8 import native_ops
    from elasticzo.train.loop import make_learner

    monkeypatch.setattr(native_ops, "_watched", (lambda: True) if through_dispatcher else native_ops._watched)
    torch.manual_seed(0)
    learner = make_learner(TrainConfig(precision="int8", batch_size=8, **method), 10, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (8, 1, 28, 28), generator=gen, dtype=torch.uint8), torch.randint(0, 10, (8,), generator=gen)
    for _ in range(steps):
        learner.train_step(x, y)
    monkeypatch.undo()
    return [t.clone() for t in learner.model.state_dict().values()]


@pytest.mark.parametrize("method", [{"method": "zo"}, {"method": "elasticzo", "bp_layers": 1}, {"method": "bp"}])
def test_direct_calls_equal_the_dispatcher_path(method, monkeypatch):
    """OPS skips torch's dispatcher when nothing watches; a training step's weights are the same bits."""
    direct = _train_steps(method, False, monkeypatch)
    dispatched = _train_steps(method, True, monkeypatch)
    assert len(direct) == len(dispatched) > 0
    assert all(torch.equal(a, b) for a, b in zip(direct, dispatched))


def test_a_dispatch_mode_still_sees_the_native_ops():
    """The integer-only audit (a TorchDispatchMode) records the registered op, not nothing."""
    from elasticzo.int8.audit import DtypeAudit
    from elasticzo.int8.native_ops import OPS

    acc = torch.arange(-300, 300, dtype=torch.int32)
    with DtypeAudit() as audit:
        values, s = OPS.requantize(acc)
    assert any("elasticzo_int8.requantize" in name for name, _ in audit.ops)
    assert torch.equal(values, OPS.requantize(acc)[0]) and int(s) == 2  # bitlength(300) - 7


def test_a_direct_call_refuses_a_non_cpu_tensor():
    """Called directly, an op still names a tensor off the CPU instead of passing its pointer to C."""
    from elasticzo.int8.native_ops import OPS

    with pytest.raises(TypeError, match="CPU"):
        OPS.relu_forward(torch.zeros(4, dtype=torch.int8, device="meta"))
