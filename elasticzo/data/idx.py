"""Reading IDX files (the MNIST container format), gzip-compressed or raw.

IDX layout (all integers big-endian): two zero bytes, a type code (0x08 = unsigned byte), the
number of dimensions d, then d 32-bit sizes, then prod(sizes) data bytes in row-major order.

Every defect is reported as an ``IDXError`` that names the file and says in plain words what is
wrong; a damaged download must never surface as a numpy reshape traceback or, worse, as a tensor
of garbage that trains to a silently bad accuracy.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08  # the only IDX type code we support; MNIST-style datasets use nothing else
_NOUNS = {1: "labels", 3: "images"}  # what an IDX file of that rank holds in practice


class IDXError(ValueError):
    """An IDX file is malformed; the message names the file and the defect."""


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an unsigned-byte IDX file into a uint8 tensor shaped as its header says.

    Gzip is detected by its magic bytes (1f 8b), not by the extension, so ``x`` and ``x.gz``
    may hold either form. The exact data length is checked: a truncated file and one with
    trailing bytes are both errors, because either means the file is not what it claims to be.

    Example::

        images = read_idx("data/mnist/t10k-images-idx3-ubyte.gz")  # uint8 [10000, 28, 28]
    """
    path = Path(path)
    data = _file_bytes(path)
    dims, offset = _parse_header(path, data)
    _check_length(path, dims, len(data) - offset)
    flat = np.frombuffer(data, dtype=np.uint8, offset=offset)  # view, no copy yet
    # The one copy: frombuffer over ``bytes`` is read-only, and torch wants writable memory.
    return torch.from_numpy(flat.reshape(dims).copy())


def _file_bytes(path: Path) -> bytes:
    """The IDX bytes of ``path``: decompressed when the file starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except OSError as err:  # no read permission, a folder in its place, an I/O error
        raise IDXError(f"{path}: cannot read the file ({err.strerror or err})") from None
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # bad header, cut-off stream, bad CRC/deflate
        raise IDXError(f"{path}: corrupt gzip stream ({err}); delete the file and fetch it again") from err


def _parse_header(path: Path, data: bytes) -> tuple[tuple[int, ...], int]:
    """(dims, header length in bytes) from the start of ``data``, checked."""
    if not data:
        raise IDXError(f"{path}: empty: 0 bytes of data, expected an IDX header")
    if len(data) < 4:
        raise IDXError(f"{path}: truncated header: {len(data)} bytes, an IDX magic number alone needs 4")
    zero0, zero1, type_code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0:
        raise IDXError(
            f"{path}: not an IDX file: wrong magic number {data[:4].hex(' ')} "
            f"(an IDX file starts with 00 00, then the type code and the number of dimensions)"
        )
    if type_code != UBYTE:
        raise IDXError(
            f"{path}: unsupported IDX data type 0x{type_code:02x} in the magic number "
            f"(only 0x08, unsigned byte, is supported)"
        )
    if ndim == 0:
        raise IDXError(f"{path}: wrong magic number {data[:4].hex(' ')}: the header declares 0 dimensions")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise IDXError(
            f"{path}: truncated header: {ndim} dimensions need {offset} header bytes "
            f"but the file has only {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return dims, offset


def _check_length(path: Path, dims: tuple[int, ...], actual: int) -> None:
    """Raise unless exactly prod(dims) data bytes follow the header."""
    expected = math.prod(dims)
    if actual == expected:
        return
    claim = f"header says {_describe(dims)} ({expected} bytes)"
    if actual < expected:
        raise IDXError(f"{path}: truncated: {claim} but only {actual} bytes follow")
    raise IDXError(f"{path}: trailing bytes: {claim} but {actual} bytes follow ({actual - expected} extra)")


def _describe(dims: tuple[int, ...]) -> str:
    """'60000 images of 28x28', '60000 labels', '5 records of 2x3x4': the header in words."""
    noun = _NOUNS.get(len(dims), "records")
    if len(dims) == 1:
        return f"{dims[0]} {noun}"
    return f"{dims[0]} {noun} of {'x'.join(str(d) for d in dims[1:])}"
