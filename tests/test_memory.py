"""The memory tracker against hand-computed byte counts for tiny models (float32: 4 B/element)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from elasticzo.instrument import memory_tag
from elasticzo.bench.memory import (CATEGORIES, MemoryReport, measure_step_memory,
                                    track_memory)


def breakdown(**nonzero: int) -> dict[str, int]:
    """A full breakdown: every standard category, zero unless given."""
    return {c: nonzero.get(c, 0) for c in CATEGORIES}


@pytest.fixture
def lin() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3, bias=False)  # W [3, 4]: 48 B


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 4)  # 32 B


def test_inference_forward_is_params_plus_input_plus_output(lin, x):
    with torch.no_grad(), track_memory(params=lin, inputs=x) as mem:
        y = lin(x)  # [2, 3]: 24 B
    assert mem.peak_bytes == 48 + 32 + 24
    assert mem.breakdown_at_peak == breakdown(parameters=48, inputs=32, workspace=24)
    assert mem.result().baseline_bytes == 80
    assert mem.result().end_bytes == 104  # y is still alive
    del y


def test_saved_input_counts_as_saved_for_backward(lin):
    with track_memory(params=lin) as mem:
        x = torch.randn(2, 4)  # allocated inside: transient, and mm saves it to compute W.grad
        y = lin(x)
    assert mem.peak_bytes == 48 + 32 + 24
    assert mem.breakdown_at_peak == breakdown(parameters=48, saved_for_backward=32, workspace=24)
    del x, y


def test_registered_input_that_autograd_saves_is_not_counted_twice(lin, x):
    with track_memory(params=lin, inputs=x) as mem:
        y = lin(x)
    assert mem.breakdown_at_peak == breakdown(parameters=48, inputs=32, workspace=24)
    del y


def test_backward_peak_with_saved_activation_and_in_flight_gradient(lin, x):
    with track_memory(params=lin, inputs=x) as mem:
        y = lin(x)  # 24 B, workspace
        h = torch.relu(y)  # 24 B, relu saves its output
        loss = h.sum()  # 4 B
        loss.backward()  # seed ones_like 4 B, threshold_backward 24 B, then W.grad 48 B
    # Peak when W.grad is allocated: W 48 + x 32 + y 24 + h 24 + loss 4 + seed 4 + dL/dy 24 + dW 48.
    # dW is counted as a gradient at the peak although it only became W.grad just after it.
    assert mem.peak_bytes == 208
    assert mem.breakdown_at_peak == breakdown(parameters=48, gradients=48, inputs=32,
                                              saved_for_backward=24, workspace=56)
    # After backward: seed and dL/dy are freed; y, h (no longer saved but alive) and loss remain.
    assert mem.result().breakdown_at_end == breakdown(parameters=48, gradients=48, inputs=32,
                                                      saved_for_backward=24, workspace=28)
    del y, h, loss


def test_sgd_momentum_step(lin, x):
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)

    def step():
        opt.zero_grad()  # frees W.grad (48 B)
        lin(x).sum().backward()
        opt.step()  # in place: momentum buffer and W

    report = measure_step_memory(step, params=lin, optimizer=opt, inputs=x, warmup=1)
    # Start: W 48 + W.grad 48 + momentum 48 + x 32 = 176. zero_grad: 128. Forward: y 24 + loss 4
    # (156), y dies after sum (132). Backward: seed 4 (136), new W.grad 48 (184) = the peak.
    assert report.baseline_bytes == 176
    assert report.peak_bytes == 184
    assert report.breakdown_at_peak == breakdown(parameters=48, gradients=48, optimizer_state=48,
                                                 inputs=32, workspace=8)
    assert report.breakdown_at_end == breakdown(parameters=48, gradients=48, optimizer_state=48, inputs=32)


def test_state_created_inside_the_region_counts_as_optimizer_state(lin, x):
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(x).sum().backward()
    with track_memory(params=lin, optimizer=opt, inputs=x) as mem:
        opt.step()  # first step: momentum buffer = clone of W.grad
    assert mem.peak_bytes == 48 + 48 + 32 + 48
    assert mem.breakdown_at_peak == breakdown(parameters=48, gradients=48, inputs=32, optimizer_state=48)


def test_zo_noise_tag():
    with track_memory() as mem:
        with memory_tag("zo_noise"):
            z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))  # 48 B
        w = z * 2  # outside the tag: workspace
    assert mem.breakdown_at_peak == breakdown(zo_noise=48, workspace=48)
    del z, w


def test_custom_tag_gets_its_own_category():
    with track_memory() as mem:
        with memory_tag("int8_buffers"):
            q = torch.zeros(10, dtype=torch.int8)
    assert mem.breakdown_at_peak == {**breakdown(), "int8_buffers": 10}
    del q


def test_memory_tag_is_inert_without_tracker():
    tag = memory_tag("zo_noise")
    assert tag is memory_tag("anything")  # a shared no-op object: nothing allocated
    with tag:
        pass


def test_freeing_lowers_live_bytes_but_not_peak():
    with track_memory() as mem:
        a = torch.empty(100)  # 400 B
        assert mem.current_bytes == 400
        b = torch.empty(10, dtype=torch.float64)  # 80 B
        del a
        assert mem.current_bytes == 80
        c = torch.empty(25)  # 100 B
    assert mem.peak_bytes == 480
    assert mem.result().end_bytes == 180
    del b, c


def test_views_and_in_place_ops_cost_nothing():
    with track_memory() as mem:
        a = torch.zeros(10)  # 40 B
        views = [a[2:5], a.view(2, 5), a.view(2, 5).t(), a.detach()]
        a.add_(1).mul_(2)
        views[1].clamp_(max=1)
        assert mem.current_bytes == 40
        del a
        assert mem.current_bytes == 40  # the views keep the storage alive
        views.clear()
        assert mem.current_bytes == 0
    assert mem.result().allocations == 1


def test_resize_and_out_arguments_are_tracked():
    with track_memory() as mem:
        out = torch.empty(0)
        torch.add(torch.ones(3), 1, out=out)  # out is resized to 3 elements
        assert mem.current_bytes == 12  # ones(3) was freed, out grew to 12 B
        out.resize_(5)
        assert mem.current_bytes == 20
    assert mem.peak_bytes == 24  # ones(3) and the resized out together


def test_tensor_from_python_data_is_counted():
    with track_memory() as mem:
        t = torch.tensor([1.0, 2.0, 3.0])  # built outside aten, then lift_fresh
    assert mem.peak_bytes == 12
    del t


def test_unregistered_preexisting_tensor_is_not_counted():
    outside = torch.zeros(100)
    with track_memory() as mem:
        outside.add_(1)
        v = outside[:10]
    assert mem.peak_bytes == 0
    del v


def test_tracker_keeps_nothing_alive():
    lin, x = nn.Linear(4, 3, bias=False), torch.randn(2, 4)  # not fixtures: pytest holds those
    with track_memory(params=lin, inputs=x) as mem:
        a = torch.ones(5)
        ref = weakref.ref(a)
        del a
        assert ref() is None
        h = torch.relu(lin(x))  # saved by autograd through the tracker's pack hook
        h_ref = weakref.ref(h)
        del h  # the graph that saved it dies with it: no reference cycle
        assert h_ref() is None
        assert mem.current_bytes == mem.baseline_bytes
    lin_ref, x_ref = weakref.ref(lin), weakref.ref(x)
    del lin, x  # the finished tracker `mem` is still alive here
    gc.collect()
    assert lin_ref() is None and x_ref() is None


def test_saved_tensor_freed_after_backward(lin, x):
    with track_memory(params=lin, inputs=x) as mem:
        loss = torch.relu(lin(x)).sum()
        assert mem.current_bytes == 80 + 24 + 4  # relu output lives on, saved; mm output died
        loss.backward()
        del loss
        assert mem.breakdown() == breakdown(parameters=48, gradients=48, inputs=32)


def test_nested_trackers_both_count():
    with track_memory() as outer:
        a = torch.empty(4)
        with track_memory() as inner:
            b = torch.empty(8)
        assert inner.peak_bytes == 32
    assert outer.peak_bytes == 48
    del a, b


def test_extra_categories_and_module_buffers():
    bn = nn.BatchNorm1d(3)  # weight, bias (params) + running_mean, running_var, num_batches_tracked
    with track_memory(params=bn, extra={"dataset": torch.zeros(50)}) as mem:
        pass
    assert mem.peak_bytes == 12 + 12 + 12 + 12 + 8 + 200
    assert mem.breakdown_at_peak == {**breakdown(parameters=56), "dataset": 200}


def test_report_and_misuse(lin, x):
    with track_memory(params=lin, inputs=x) as mem:
        with pytest.raises(RuntimeError, match="not ended"):
            mem.result()
    report = mem.result()
    assert isinstance(report, MemoryReport)
    text = mem.report()
    assert "peak live tensor memory: 80 B" in text and "parameters" in text
    assert report.to_dict()["peak_bytes"] == 80
    with pytest.raises(RuntimeError, match="one region"):
        with mem.track():
            pass
    with pytest.raises(ValueError, match="warmup=-1"):
        measure_step_memory(lambda: None, params=lin, warmup=-1)


def test_cuda_peak_is_not_reported_on_cpu(lin, x):
    with track_memory(params=lin, inputs=x) as mem:
        pass
    assert mem.result().cuda_peak_bytes is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backward_is_seen_and_allocator_peak_recorded():
    lin, x = nn.Linear(64, 32, bias=False).cuda(), torch.randn(16, 64, device="cuda")
    with track_memory(params=lin, inputs=x) as mem:
        lin(x).relu().sum().backward()  # backward runs in an autograd device thread on CUDA
    report = mem.result()
    assert report.breakdown_at_end["gradients"] == 32 * 64 * 4
    assert report.cuda_peak_bytes >= report.peak_bytes  # allocator blocks round up
