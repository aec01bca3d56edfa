"""Data-parallel training over ``torch.distributed`` (torchrun): shards, one reduction, checksums.

Every rank holds a full replica and draws the same global batches (the loader order depends on
the seed alone); rank r trains on its slice of each batch. After its perturbed passes a rank has
the 2q loss values and the summed BP-tail gradients of its slice; ``Replicas.reduce_float`` /
``reduce_int`` combine them across ranks in ONE all-reduce, and every rank then applies the
same update from the same bytes, so the replicas stay bit-identical. The ZO part costs 2q
scalars per step instead of a gradient: every rank regenerates z from the shared seed.

- FP32: each rank weights its mean loss and gradients by n_r / B before the sum, so the result
  is the global-batch mean; it equals a single-process step up to float summation order.
- INT8: losses and weight gradients are integer sums, so the sum over ranks is exact (int32 on
  the wire). Tail gradients carry a per-rank power-of-two exponent, aligned first to the largest
  one (a MAX all-reduce of two int64 per BP layer, so INT8 with a BP tail needs two collectives
  per step).
  A single process is NOT reproduced bit for bit: NITI rescales activations by the largest value
  in the batch, so a slice of a batch is quantised differently from the whole batch.

Every ``--check-every`` steps (0: each epoch end) the ranks compare a hash of their state and
stop with ``ReplicaMismatch`` if they differ. Only rank 0 writes the run directory; at start it
sends every rank the state it created or resumed.
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

from elasticzo.int8.rounding import bitlength, shift_round_nearest

RANK_FREE = ("progress", "data_root", "download", "device", "threads", "tensorboard")  # may differ between ranks


class ReplicaMismatch(RuntimeError):
    """The replicas' weights or optimiser state differ: a non-deterministic op or a bad rank."""


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1) or in an initialised group."""
    return dist.is_available() and (dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of an n-row batch that ``rank`` of ``world`` trains on (sizes differ by <= 1)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class Replicas:
    """This process's place in a data-parallel group, and the collectives of a training run."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl's object collectives use the current device
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.weight = 1.0  # n_r / B of the current step (0 for an empty slice)
        self.batch_count = 0  # B, the global batch size of the current step
        self.bytes_per_step = 0  # payload of this rank's collectives in the last step
        self.collectives = 0  # collectives in the last step

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ batches

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a global batch. An empty slice (a last batch smaller than the
        world) becomes one example with weight 0: it takes part in the collectives, adds nothing."""
        n = x.shape[0]
        lo, hi = shard_bounds(n, self.rank, self.world)
        self.batch_count, self.weight = n, (hi - lo) / n
        if hi == lo:
            lo, hi = 0, 1
        return x[lo:hi], y[lo:hi]

    # ------------------------------------------------------------------ the one reduction per step

    def reduce_float(self, losses: torch.Tensor, grads: list, params: list) -> tuple[torch.Tensor, list]:
        """Global-batch mean of the losses [2q] and of the summed BP gradients of the passes."""
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
        flat = torch.cat([losses.reshape(-1)] + [g.reshape(-1) for g in grads]).mul_(self.weight)
        self._all_reduce(flat, first=True)
        sums = flat[losses.numel():].split([g.numel() for g in grads])
        return flat[:losses.numel()].view(losses.shape), [g.view(p.shape) for g, p in zip(sums, params)]

    def reduce_int(self, losses: torch.Tensor, layers: list) -> torch.Tensor:
        """Exact integer sums of the losses and of the tail gradients, in int32.

        A MAX all-reduce first agrees on each tail layer's largest exponent and top bit, so that
        every rank aligns its gradient to that exponent with enough headroom for the sum of
        ``world`` of them in int32 (an extra, rounding right shift only when the sum would not fit
        otherwise). The int64 losses travel as three 21-bit limbs, whose int32 sums are exact.
        """
        keep = int(self.weight > 0)
        shifts = self._common_exponents(layers, keep) if layers else None
        parts = [_limbs(losses.to(torch.int64).reshape(-1)) * keep]
        for i, layer in enumerate(layers):
            aligned = _shift_right(layer.grad_acc.to(torch.int64), shifts[i] - _exponent(layer, self.device))
            parts.append(aligned.to(torch.int32).reshape(-1) * keep)
        flat = torch.cat(parts)
        self._all_reduce(flat, first=not layers)
        sums = flat.split([t.numel() for t in parts])
        for i, (layer, g) in enumerate(zip(layers, sums[1:])):
            layer.grad_acc, layer.grad_exponent = g.view(layer.grad_acc.shape), shifts[i]
        return _from_limbs(sums[0]).view(losses.shape)

    def _common_exponents(self, layers: list, keep: int) -> torch.Tensor:
        """Per layer, the exponent all ranks align to: the largest, raised until world sums fit int32."""
        never = torch.full((len(layers),), -(1 << 40), dtype=torch.int64, device=self.device)
        exps = torch.stack([_exponent(l, self.device) for l in layers]) if keep else never
        tops = torch.stack([bitlength(l.grad_acc).to(self.device) for l in layers]) + exps if keep else never
        both = torch.cat([exps, tops])
        self._all_reduce(both, op=dist.ReduceOp.MAX, first=True)
        exp, top = both.split(len(layers))
        headroom = (self.world - 1).bit_length() + 1  # sum of `world` terms, plus one for rounding up
        return exp + (top - exp + headroom - 31).clamp(min=0)

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, first: bool = False) -> None:
        if first:
            self.bytes_per_step = self.collectives = 0
        dist.all_reduce(tensor, op=op)
        self.bytes_per_step += tensor.numel() * tensor.element_size()
        self.collectives += 1

    # ------------------------------------------------------------------ agreement between ranks

    def check_configs(self, config_dict: dict) -> None:
        """ValueError on every rank, naming the settings and ranks, if the ranks' configs differ."""
        mine = {k: v for k, v in config_dict.items() if k not in RANK_FREE}
        every = [None] * self.world
        dist.all_gather_object(every, mine)
        diff = sorted({k for other in every for k in mine if other.get(k) != mine.get(k)})
        if diff:
            detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {c.get(k)!r}" for r, c in enumerate(every)) for k in diff)
            raise ValueError(f"the {self.world} ranks were started with different settings ({detail}); "
                             "start every rank with the same flags")

    def check_replicas(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """ReplicaMismatch on every rank if the hashes of the ranks' state tensors differ."""
        digest = state_digest(tensors)
        every = [None] * self.world
        dist.all_gather_object(every, digest)
        odd = [r for r, d in enumerate(every) if d != every[0]]
        if odd:
            raise ReplicaMismatch(f"replicas differ after step {step}: ranks {odd} hold other weights than "
                                  f"rank 0 (state hash {every[0][:16]} vs {every[odd[0]][:16]}); training stopped")

    def share_outcome(self, error: Exception | None) -> None:
        """Rank 0 tells the others whether its start (new or resumed run dir) failed; all raise alike."""
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            raise ValueError(f"rank 0 could not start: {box[0]}")

    def broadcast_state(self, state: tuple | None) -> tuple:
        """Rank 0's (tensors, meta, position) on every rank (tensors on the CPU)."""
        box = [state]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: int) -> int:
        """Integer sum over ranks (test-set counts; once per epoch, not per step)."""
        total = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(total)
        return int(total.item())


def _shift_right(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x / 2**s rounded to nearest (s >= 0, a 0-dim tensor), exact for s == 0."""
    return shift_round_nearest(x, s.clamp(min=0, max=62))


def _exponent(layer, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(layer.grad_exponent, dtype=torch.int64, device=device)


LIMB = 21  # bits per limb: 3 limbs hold an int64, and 2**10 ranks' sums of a limb fit in int32


def _limbs(x: torch.Tensor) -> torch.Tensor:
    """int64 [n] -> int32 [3n]: x = l0 + l1 2**21 + l2 2**42 (l0, l1 unsigned, l2 signed)."""
    mask = (1 << LIMB) - 1
    return torch.cat([x & mask, (x >> LIMB) & mask, x >> (2 * LIMB)]).to(torch.int32)


def _from_limbs(limbs: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_limbs`` applied to (sums of) limbs: exact while the total fits int64."""
    l0, l1, l2 = limbs.to(torch.int64).chunk(3)
    return l0 + (l1 << LIMB) + (l2 << (2 * LIMB))


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE2b of the names, dtypes, shapes and bytes of ``tensors`` (order-independent)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def attach(learner, replicas: Replicas) -> None:
    """Route the learner's one reduction per step through ``replicas`` (FP32 or INT8 optimiser)."""
    from elasticzo.int8.elastic import IntElasticZO

    optimizer = learner.optimizer
    optimizer.reduce = replicas.reduce_int if isinstance(optimizer, IntElasticZO) else replicas.reduce_float
    learner.replicas = replicas


def device_for_rank(device: torch.device) -> torch.device:
    """cuda -> cuda:LOCAL_RANK (one GPU per process); cpu stays cpu."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
