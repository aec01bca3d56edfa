"""Data-parallel training under torchrun (gloo, CPU): real multi-process runs on small subsets.

Each launch costs 10-30 s on a busy 2-core machine (torch imports in every process), so the
default run has three: a 2-rank FP32 run (replicas compared every step, and compared with one
process), a 4-rank INT8 run with uneven and empty slices, and the ranks-disagree scenario. The
SIGKILL-resume test (two more launches; the 2-rank run is its uninterrupted reference) is slow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from elasticzo.config import TrainConfig
from elasticzo.models import build_model, parametrised_layers
from elasticzo.train.distributed import _from_limbs, _limbs, shard_bounds, state_digest
from elasticzo.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).with_name("dp_worker.py")
SMALL = ["--train-limit", "512", "--test-limit", "128", "--batch-size", "32", "--epochs", "3", "--no-progress",
         "--bp-layers", "2", "--check-every", "1", "--no-download"]


def torchrun(nproc: int, args: list[str], **popen) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node nproc`` with one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] + args
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def train_cli(nproc: int, run_dir: Path, data_root: Path, *extra: str) -> subprocess.Popen:
    return torchrun(nproc, ["-m", "elasticzo", "train", "--data-root", str(data_root), "--run-dir", str(run_dir)]
                    + SMALL + list(extra))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, data_root) -> Path:
    """3 epochs of ElasticZO k=2 on 2 ranks, replica hashes compared after every step."""
    run_dir = tmp_path_factory.mktemp("dp") / "two"
    proc = train_cli(2, run_dir, data_root)
    out = finish(proc)
    assert proc.returncode == 0, out
    return run_dir


@given(n=st.integers(1, 500), world=st.integers(1, 9))
def test_shard_bounds_partition_the_batch(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))  # contiguous, disjoint
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


@given(values=st.lists(st.lists(st.integers(-(2**52), 2**52), min_size=2, max_size=2), min_size=1, max_size=8))
def test_int64_losses_sum_exactly_as_int32_limbs(values):
    """What INT8 ranks send for their losses: the int32 sum of the limbs gives the exact int64 sum."""
    per_rank = [_limbs(torch.tensor(v, dtype=torch.int64)) for v in values]
    assert all(t.dtype == torch.int32 for t in per_rank)
    total = _from_limbs(torch.stack(per_rank).sum(0, dtype=torch.int32))
    assert total.tolist() == [sum(v[i] for v in values) for i in range(2)]


def test_state_digest_sees_one_bit_and_ignores_order():
    a = {"w": torch.randn(5, generator=torch.Generator().manual_seed(0)), "n": torch.arange(3)}
    flipped = dict(a, w=a["w"].clone())
    flipped["w"].view(torch.int32)[2] ^= 1  # the lowest mantissa bit of one weight
    assert state_digest(a) != state_digest(flipped)
    assert state_digest(a) == state_digest(dict(reversed(list(a.items()))))


def test_two_ranks_train_and_stay_identical(two_rank_run):
    """The run ended (every step's hash check passed) and reduced 2 losses + the tail's gradients."""
    records = metrics(two_rank_run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    tail = parametrised_layers(build_model("lenet5", 10))[-2:]
    expected = 4 * (2 + sum(p.numel() for layer in tail for p in layer.parameters()))
    assert all(r["world_size"] == 2 and r["comm_bytes_per_step"] == expected for r in records)
    assert all(r["collectives_per_step"] == 1 for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_two_ranks_match_one_process_up_to_float_rounding(two_rank_run, data_root, tmp_path):
    """Same global batch, same seeds: the 2-rank weights equal a 1-process run's up to summation order."""
    config = TrainConfig(data_root=str(data_root), train_limit=512, test_limit=128, batch_size=32, epochs=3,
                         bp_layers=2, progress=False, download=False, run_dir=str(tmp_path / "one"))
    train(config, log=lambda *a: None)
    two = load_file(str(two_rank_run / "checkpoint.safetensors"))
    one = load_file(str(tmp_path / "one" / "checkpoint.safetensors"))
    assert two.keys() == one.keys()
    # g = (L+ - L-) / (2 eps) magnifies the float rounding of the loss (~1e-7) to 0.1-1 % of g per
    # step, and the trajectories drift apart chaotically: after 48 steps the largest weight
    # difference measured 1.4e-3, 1.6e-4, 3.4e-4 for seeds 0, 1, 2 (torch.randn directions before
    # issue 8: 5.5e-5, 6.1e-5, 5.9e-4). A wrong weighting of the ranks (a sum instead of the mean)
    # would move them by far more.
    for name in [k for k in one if k.startswith("model.")]:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=5e-3, msg=name)
    losses = [[json.loads(line)["loss"] for line in (d / "seeds.jsonl").read_text().splitlines()]
              for d in (two_rank_run, tmp_path / "one")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=0)


def _rank_pid(agent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among the descendants of ``agent``."""
    todo = [agent]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
        todo += [int(c) for c in children]
    return None


@pytest.mark.slow  # two more launches (~60 s on a busy 2-core machine); run with -m slow
def test_resume_after_sigkill_of_one_rank(two_rank_run, data_root, tmp_path):
    """Kill rank 1 with SIGKILL mid-run; --resume ends bit-identical to the uninterrupted run."""
    run_dir = tmp_path / "killed"
    proc = train_cli(2, run_dir, data_root, "--checkpoint-every", "4")
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoint.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    finish(proc)
    assert proc.returncode != 0
    steps = json.loads((run_dir / "config.json").read_text())["epochs"] * 16
    assert len((run_dir / "seeds.jsonl").read_text().splitlines()) < steps  # it really stopped early
    resumed = train_cli(2, run_dir, data_root, "--checkpoint-every", "4", "--resume")
    out = finish(resumed)
    assert resumed.returncode == 0, out
    want = load_file(str(two_rank_run / "checkpoint.safetensors"))
    got = load_file(str(run_dir / "checkpoint.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r["test_acc"] for r in metrics(run_dir)] == [r["test_acc"] for r in metrics(two_rank_run)]


def test_four_ranks_int8_with_empty_slices(data_root, tmp_path):
    """INT8 ElasticZO k=2 on 4 ranks; 258 examples leave a last batch of 2, so 2 ranks get no data.
    Integer sums in int32: 2 losses as 3 limbs each + the tail gradients, after a MAX of the 2
    layers' exponents and top bits (int64)."""
    run_dir = tmp_path / "int8"
    proc = train_cli(4, run_dir, data_root, "--precision", "int8", "--train-limit", "258", "--epochs", "2")
    out = finish(proc)
    assert proc.returncode == 0, out
    records = metrics(run_dir)
    tail_weights = sum(layer.weight.numel() for layer in parametrised_layers(build_model("lenet5", 10))[-2:])
    assert all(r["comm_bytes_per_step"] == 4 * (2 * 3 + tail_weights) + 8 * 2 * 2 for r in records)
    assert all(r["collectives_per_step"] == 2 and r["world_size"] == 4 for r in records)
    assert records[-1]["test_acc"] > 30  # it learns (a 10-class guess is 10 %)


def test_ranks_that_disagree_stop_with_clear_errors(data_root, tmp_path):
    proc = torchrun(2, [str(WORKER), "disagree", str(tmp_path / "run"), str(data_root)])
    out = finish(proc)
    assert proc.returncode == 0, out
    for rank in (0, 1):
        assert f"rank {rank} ReplicaMismatch: replicas differ after step 7: ranks [1]" in out
        assert f"rank {rank} ValueError: the 2 ranks were started with different settings " \
               "(lr_bp: rank 0 0.05, rank 1 0.1)" in out
