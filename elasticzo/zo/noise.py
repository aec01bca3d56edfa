"""Perturbation directions for SPSA, regenerated from seeds instead of stored.

Every direction z is a pure function of (run seed, step, query, layer): a run can be replayed
from its seed log, and the optimiser never touches the global RNG. The float directions are
counter-based (``zo.counter``: entry i of layer l is a hash of (derive_seed(...), i)); the INT8
Rademacher bits are drawn from a reseeded ``torch.Generator`` (``random_bits``).
"""
from __future__ import annotations

import torch

from elasticzo.zo.counter import directions

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a cheap bijective mixer, so nearby inputs give unrelated seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, step: int, query: int = 0, layer: int = 0) -> int:
    """Seed for the direction of ``layer`` in query ``query`` of step ``step`` (63-bit, non-negative)."""
    return derive_seeds(seed, step, query, (layer,))[0]


def derive_seeds(seed: int, step: int, query: int, layers) -> list[int]:
    """``[derive_seed(seed, step, query, l) for l in layers]``, mixing the shared prefix once
    (a step of the optimiser derives one seed per layer and pass)."""
    h = _splitmix64(seed & _MASK64)
    for part in (step, query):
        h = _splitmix64(h ^ (part & _MASK64))
    return [_splitmix64(h ^ (layer & _MASK64)) >> 1 for layer in layers]  # >> 1: fits manual_seed's int64


_generators: dict[torch.device, torch.Generator] = {}


def layer_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of ``device`` reseeded with ``seed`` (one reseed per layer and query).

    One generator object per device is reused: reseeding costs less than constructing one, and
    what is drawn depends on the seed alone. Not for concurrent use from several threads.
    """
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


BITS_CHUNK = 1 << 14  # bits drawn per round (one randint call of 512 words)
EXPAND_WORDS = 64  # words turned into bits at once: int32 temporaries of 8 KiB, not 64 KiB


def random_word_rounds(n: int, generator: torch.Generator, device: torch.device):
    """Yield (lo, hi, words [k, 1] int32): bit i - lo of the round is bit (i - lo) % 32 of word (i - lo) // 32.

    The words ``random_bit_rounds`` expands; a native kernel that expands them itself (the INT8
    perturbation and update) sees exactly the same bits.
    """
    for lo in range(0, n, BITS_CHUNK):
        hi = min(lo + BITS_CHUNK, n)
        yield lo, hi, torch.randint(-(1 << 31), 1 << 31, ((hi - lo + 31) // 32, 1), generator=generator,
                                    device=device, dtype=torch.int32)


def random_bit_rounds(n: int, generator: torch.Generator, device: torch.device):
    """Yield (lo, hi, bits): the bits lo..hi of ``random_bits(n)``, one round at a time.

    A consumer that needs only a piece at a time (the streamed INT8 perturbation and update)
    never holds all n; the values are those of ``random_bits`` because both draw the same words.
    """
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    for lo, hi, words in random_word_rounds(n, generator, device):
        bits = torch.empty(hi - lo, dtype=torch.uint8, device=device)
        for w in range(0, words.shape[0], EXPAND_WORDS):
            a, b = 32 * w, min(32 * (w + EXPAND_WORDS), hi - lo)
            bits[a:b] = ((words[w:w + EXPAND_WORDS] >> shifts) & 1).reshape(-1)[: b - a]
        yield lo, hi, bits


def random_bits(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n fair random bits as uint8 0/1, 32 per random int32 word.

    About 4x faster than randn; drawn in rounds of ``BITS_CHUNK`` so that the word-to-bit
    temporaries stay small (whole, they would be 8x the size of the int8 direction).
    """
    out = torch.empty(n, dtype=torch.uint8, device=device)
    for lo, hi, bits in random_bit_rounds(n, generator, device):
        out[lo:hi] = bits
    return out


def layer_noise(params: list[torch.Tensor], key: int, kind: str) -> list[torch.Tensor]:
    """The direction ``key`` of one layer, materialised (float32, shaped like each parameter): the
    entries of the layer's flat parameter vector, parameter after parameter. For the reference
    twin and tests; the optimiser uses ``counter.LayerDirections``, which never stores z."""
    out, offset = [], 0
    for p in params:
        out.append(directions(key, offset, p.numel(), kind, p.device).view(p.shape))
        offset += p.numel()
    return out

