"""Counter-based directions (zo.counter, zo/kernels/ezo_noise.c): the kernel equals its portable
twin bit for bit, slices are slices, the statistics SPSA needs hold, and a whole ElasticZO run is
the same bits with and without the kernel (the portable path is what CUDA runs)."""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticzo.models import MLP
from elasticzo.optim.closure import pass_rng
from elasticzo.optim.elastic import ElasticZO
from elasticzo.zo import native
from elasticzo.zo.counter import GAUSS_SCALE, MAX_ELEMENTS, LayerDirections, axpy, axpy_layer, directions
from elasticzo.zo.noise import derive_seed, derive_seeds, layer_noise

FAST = settings(max_examples=60, deadline=None)
KINDS = ("gaussian", "rademacher")
KEYS = st.one_of(st.sampled_from([0, 1, (1 << 63) - 1, (1 << 32) - 1, 1 << 32]), st.integers(0, (1 << 63) - 1))
needs_kernel = pytest.mark.skipif(native.load() is None, reason="no C compiler: the native kernel is not built")


def portable(fn):
    """fn() with the native kernel switched off (the path of CUDA tensors and ELASTICZO_NATIVE=0)."""
    saved = native.kernel_for
    native.kernel_for = lambda x, out: None
    try:
        return fn()
    finally:
        native.kernel_for = saved


@needs_kernel
@FAST
@given(KEYS, st.integers(0, 5000), st.integers(0, 700), st.sampled_from(KINDS),
       st.sampled_from([1e-3, -1e-3, 0.37, -2.5, 0.0, 1e30]))
def test_kernel_equals_the_portable_twin(key, offset, n, kind, a):
    x = torch.linspace(-3, 3, n)
    want = x + directions(key, offset, n, kind) * a  # the definition: two roundings
    assert torch.equal(axpy(x, key, offset, kind, a), want)
    assert torch.equal(portable(lambda: axpy(x, key, offset, kind, a)), want)


@needs_kernel
@FAST
@given(KEYS, st.integers(1, 300), st.sampled_from(KINDS))
def test_in_place_update_with_a_tensor_coefficient(key, n, kind):
    coef = torch.tensor(-0.0123)
    theta = torch.randn(n, generator=torch.Generator().manual_seed(key % 1000))
    want = theta + coef * directions(key, 0, n, kind)
    a, b = theta.clone(), theta.clone()
    axpy(a, key, 0, kind, coef, out=a)
    portable(lambda: axpy(b, key, 0, kind, coef, out=b))
    assert torch.equal(a, want) and torch.equal(b, want)


def test_the_highest_counters_and_the_range_check():
    top = directions(5, MAX_ELEMENTS - 3, 3, "gaussian")
    assert torch.equal(top, directions(5, MAX_ELEMENTS - 10, 10, "gaussian")[-3:])
    with pytest.raises(ValueError, match="2\\^32"):
        directions(5, MAX_ELEMENTS - 2, 3, "gaussian")
    with pytest.raises(ValueError, match="'uniform'"):
        axpy(torch.zeros(3), 5, 0, "uniform", 1.0)


def test_a_mismatched_out_is_refused_before_anything_is_written():
    buf = torch.zeros(2000)
    for out in (buf[:10], buf[:1000].double(), buf[:1000].view(10, 100)):
        with pytest.raises(ValueError, match="must match"):
            axpy(torch.randn(1000), 5, 0, "gaussian", 1.0, out=out)
    assert not buf.any()  # the native kernel would have written 1000 entries from buf[0]


@given(KEYS, st.integers(0, 3000), st.integers(0, 200), st.integers(0, 200), st.sampled_from(KINDS))
@FAST
def test_a_slice_is_the_slice_of_the_whole(key, offset, head, n, kind):
    whole = directions(key, offset, head + n, kind)
    assert torch.equal(directions(key, offset + head, n, kind), whole[head:])


def test_layer_directions_run_across_its_parameters():
    weight, bias = torch.zeros(4, 3), torch.zeros(4)
    z = layer_noise([weight, bias], 99, "gaussian")
    flat = directions(99, 0, 16, "gaussian")
    assert torch.equal(z[0].reshape(-1), flat[:12]) and torch.equal(z[1], flat[12:])
    shifted = axpy_layer([weight, bias], 99, "gaussian", [1.0, 2.0])
    assert torch.equal(shifted[0], z[0]) and torch.equal(shifted[1], 0 + 2.0 * z[1])


@FAST
@given(KEYS, st.sampled_from(KINDS), st.lists(st.integers(0, 300), min_size=1, max_size=4))
def test_layer_directions_equal_one_axpy_per_tensor_and_follow_a_moved_tensor(key, kind, sizes):
    """The per-layer native call (sizes and pointers kept) gives the bits of one ``axpy`` per tensor
    at the running offsets; after a tensor is replaced by one in new storage it reads the new one."""
    layer = LayerDirections()
    xs = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
    scales = [0.5 * (t + 1) for t in range(len(sizes))]
    want = [axpy(x, key, sum(sizes[:t]), kind, a) for t, (x, a) in enumerate(zip(xs, scales))]
    assert all(torch.equal(a, b) for a, b in zip(layer(xs, key, kind, scales), want))
    xs[0] = xs[0] + 1  # new storage, as after model.to() or p.data = ...
    assert torch.equal(layer(xs, key, kind, scales)[0], axpy(xs[0], key, 0, kind, scales[0]))
    base = torch.randn(2 * max(sizes) + 2)
    xs[-1] = base[: sizes[-1]]
    layer(xs, key, kind, scales)
    xs[-1] = base[: 2 * sizes[-1] + 1]  # same storage and pointer, more entries: the sizes are made again
    assert torch.equal(layer(xs, key, kind, scales)[-1], axpy(xs[-1], key, sum(sizes[:-1]), kind, scales[-1]))
    updated = [x.clone() for x in xs]
    layer(updated, key, kind, scales, in_place=True)
    offsets = [sum(x.numel() for x in xs[:t]) for t in range(len(xs))]
    assert all(torch.equal(u, axpy(x, key, o, kind, a)) for u, x, o, a in zip(updated, xs, offsets, scales))


def test_non_contiguous_and_float64_parameters_take_the_portable_path():
    base = torch.randn(6, 5, dtype=torch.float64)
    theta = base.t()  # strides (1, 5): entries still follow the logical order
    want = theta + 0.5 * directions(7, 0, 30, "gaussian").to(torch.float64).view(5, 6)
    axpy(theta, 7, 0, "gaussian", 0.5, out=theta)
    assert torch.equal(theta, want) and torch.equal(base, want.t())


def test_gaussian_moments_and_range():
    z = directions(123, 0, 1 << 20, "gaussian").double()
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n) * 1.3  # var of the sample variance of a kurtosis-2.7 law
    assert abs((z ** 4).mean() - 2.7) < 0.03  # Irwin-Hall n=4: 3 - 1.2 / 4
    assert z.abs().max() <= float(torch.tensor(510.0) * GAUSS_SCALE)  # |sum of 4 bytes - 510| <= 510, in float32
    assert abs(GAUSS_SCALE ** 2 * 4 * (256 ** 2 - 1) / 12 - 1) < 1e-6  # unit variance by construction


def test_rademacher_is_balanced_and_directions_of_different_keys_are_uncorrelated():
    r = directions(5, 0, 1 << 18, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 5 / math.sqrt(r.numel())
    n = 1 << 18
    for kind in KINDS:
        a, b = directions(1, 0, n, kind).double(), directions(2, 0, n, kind).double()
        neighbour = directions(1, 1, n, kind).double()  # the same key one entry further
        for other in (b, neighbour):
            assert abs((a * other).mean()) < 5 / math.sqrt(n)


def test_a_run_is_the_same_bits_with_and_without_the_kernel():
    def run():
        torch.manual_seed(0)
        model = MLP(in_features=20, hidden=(16, 8), num_classes=4)
        opt = ElasticZO.for_model(model, 1, lr_zo=1e-2, queries=2, zo_weight_decay=1e-3, seed=4)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 20, generator=gen), torch.randint(0, 4, (8,), generator=gen)
            opt.step(lambda: F.cross_entropy(model(x), y))
        return [p.detach().clone() for p in model.parameters()]

    native_run, portable_run = run(), portable(run)
    assert all(torch.equal(a, b) for a, b in zip(native_run, portable_run))


def test_pass_rng_seeds_each_pass_and_gives_the_callers_state_back():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with pass_rng([]) as seed:
        seed(11)
        first = torch.rand(4)
        seed(11)
        assert torch.equal(torch.rand(4), first)
    assert torch.equal(torch.get_rng_state(), before)


def test_without_a_compiler_the_portable_path_runs_after_one_log_line(tmp_path):
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "import torch\nfrom elasticzo.zo import native, counter\n"
            "print('LOADED', native.load() is not None)\n"
            "x = torch.zeros(5)\nprint('EXACT', torch.equal(counter.axpy(x, 3, 0, 'gaussian', 1.0), counter.directions(3, 0, 5, 'gaussian')))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ELASTICZO_CC": "/bin/false", "ELASTICZO_CACHE": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "LOADED False" in res.stdout and "EXACT True" in res.stdout
    assert sum("elasticzo.zo" in line and "portable PyTorch path" in line for line in res.stderr.splitlines()) == 1



DIGEST = Path(__file__).resolve().parents[1] / "elasticzo" / "zo" / "kernels" / "noise_digest.c"


def fnv1a(y: torch.Tensor) -> int:
    h = 0xCBF29CE484222325
    for byte in y.numpy().tobytes():  # little-endian float32, as the driver reads it
        h = ((h ^ byte) * 0x100000001B3) & ((1 << 64) - 1)
    return h


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


AVX2 = pytest.param(["-march=x86-64-v3"], marks=pytest.mark.skipif(not _has_avx2(), reason="no AVX2 here"))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("flags", [[], ["-march=native"], AVX2], ids=["portable", "native", "avx2"])
def test_the_torch_free_driver_prints_the_twins_digests(flags, tmp_path):
    """The driver that scripts/aarch64_exactness.sh runs under qemu, checked here against the twin;
    the x86 builds take the hand-vectorised paths (AVX-512 VNNI with -march=native where the CPU has
    it, AVX2 with x86-64-v3), the portable build the plain C loop."""
    exe = tmp_path / "digest"
    subprocess.run(["cc", "-O3", "-ffp-contract=off", "-std=c11", *flags, str(DIGEST), "-o", str(exe)], check=True, timeout=120)
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    assert len(lines) == 256
    x_all = (torch.arange(515) % 97).float() * 0.01 - 0.5
    for line in lines:
        kind, key, offset, n, a, digest = line.split()
        a = float(torch.tensor(float(a), dtype=torch.float32))
        y = x_all[: int(n)] + directions(int(key), int(offset), int(n), KINDS[int(kind)]) * a
        assert fnv1a(y) == int(digest, 16), line


def _splitmix_chain(*parts: int) -> int:
    """derive_seed written out from its definition (SplitMix64 over seed, step, query, layer)."""
    def mix(x):
        x = (x + 0x9E3779B97F4A7C15) % 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        return x ^ (x >> 31)
    h = mix(parts[0] % 2**64)
    for part in parts[1:]:
        h = mix(h ^ (part % 2**64))
    return h >> 1


@settings(max_examples=50, deadline=None)
@given(st.integers(-2**63, 2**64 - 1), st.integers(0, 2**40), st.integers(0, 64),
       st.lists(st.integers(0, 2**21), max_size=8))
def test_derive_seeds_is_derive_seed_per_layer(seed, step, query, layers):
    """The optimiser's one-prefix seeds are the per-layer seeds of the definition (replays depend on it)."""
    want = [_splitmix_chain(seed, step, query, layer) for layer in layers]
    assert derive_seeds(seed, step, query, layers) == want
    assert [derive_seed(seed, step, query, layer) for layer in layers] == want


@pytest.mark.parametrize("per_layer", [True, False])
def test_an_update_in_place_bumps_the_version_so_a_stale_graph_refuses_backward(per_layer):
    """The native kernel writes outside torch; like torch's in-place ops it must bump the tensor's
    version, or a graph that saved the old values would silently use the new ones."""
    w = torch.ones(5, requires_grad=True)
    loss = (w * w).sum()  # saves w for backward
    with torch.no_grad():
        if per_layer:
            LayerDirections()([w], 7, "gaussian", [0.1], in_place=True)
        else:
            axpy(w, 7, 0, "gaussian", 0.1, out=w)
    assert not torch.equal(w.detach(), torch.ones(5))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
