"""Byte-level encodings of a sparse quantised delta: b-bit codes, positions, seeded positions.

A stored delta of one weight is (positions of the kept entries, their b-bit codes, one scale per
output channel). Positions dominate the size if stored naively (32 bits each against 4 for a
value), so they are stored as LEB128 varints of the gaps between sorted flat positions: at 5 %
density the mean gap is 20, one byte. With ``mask=random`` the positions are not stored at all:
they are the ``k`` smallest hashes of a seed (SHiRA-style fixed indices), reproducible on any
machine because the hash is plain integer arithmetic, not a library's random stream.
"""

from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integer codes ``[n]`` (each < 2**bits) → uint8 bytes, ``ceil(n * bits / 8)`` long."""
    codes = np.asarray(codes, dtype=np.uint16)
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    if bits == 8:
        return codes.astype(np.uint8)
    shifts = np.arange(bits, dtype=np.uint16)
    bitplanes = ((codes[:, None] >> shifts) & 1).astype(np.uint8)  # [n, bits], least significant first
    return np.packbits(bitplanes.reshape(-1), bitorder="little")


def unpack_codes(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 bytes → ``[n]`` codes (int64)."""
    data = np.asarray(data, dtype=np.uint8)
    if bits == 8:
        return data[:n].astype(np.int64)
    flat = np.unpackbits(data, bitorder="little", count=n * bits).reshape(n, bits).astype(np.int64)
    return (flat << np.arange(bits, dtype=np.int64)).sum(1)


def encode_positions(positions: np.ndarray) -> np.ndarray:
    """Strictly increasing flat positions → LEB128 varints of their gaps (first gap from -1)."""
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1)
    if gaps.size and gaps.min() < 1:
        raise ValueError("positions must be strictly increasing and non-negative")
    gaps = gaps.astype(np.uint64)
    # Number of 7-bit groups per gap; bytes laid out gap by gap, low group first.
    nbytes = np.ones(gaps.shape, dtype=np.int64)
    rest = gaps >> np.uint64(7)
    while rest.any():
        nbytes += rest > 0
        rest >>= np.uint64(7)
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    starts = np.cumsum(nbytes) - nbytes
    for j in range(int(nbytes.max(initial=0))):
        has = nbytes > j
        group = ((gaps[has] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        more = (nbytes[has] > j + 1).astype(np.uint8) << 7
        out[starts[has] + j] = group | more
    return out


def decode_positions(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_positions`: varint bytes → int64 flat positions."""
    data = np.asarray(data, dtype=np.uint8)
    if data.size == 0:
        return np.zeros(0, dtype=np.int64)
    if data[-1] & 0x80:
        raise ValueError("truncated position stream")
    ends = np.flatnonzero((data & 0x80) == 0)  # last byte of each varint
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    values = np.zeros(ends.size, dtype=np.int64)
    for j in range(int(lengths.max())):
        has = lengths > j
        values[has] |= (data[starts[has] + j] & 0x7F).astype(np.int64) << (7 * j)
    return np.cumsum(values) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Steele et al.'s SplitMix64 finaliser; uint64 arithmetic wraps, identically everywhere.
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def seeded_positions(numel: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct sorted positions in ``[0, numel)``, a pure function of ``(numel, k, seed)``."""
    if not 0 <= k <= numel:
        raise ValueError(f"cannot choose {k} of {numel} positions")
    salt = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        keys = _splitmix64(np.arange(numel, dtype=np.uint64) ^ salt)
    chosen = np.argpartition(keys, k - 1)[:k] if 0 < k < numel else np.arange(k)
    return np.sort(chosen).astype(np.int64)


def symmetric_qrange(bits: int) -> tuple[int, int]:
    """Integer range of a symmetric b-bit quantiser: 2 bits → [-1, 1] (ternary), 4 → [-7, 7]."""
    qmax = (1 << (bits - 1)) - 1
    return -qmax, qmax


def layer_positions(tensors, name: str, entry: dict) -> np.ndarray:
    """The flat int64 positions of one layer's kept entries, however the delta stores them: a
    seeded mask (regenerated), dense (every entry) or varint-coded gaps."""
    numel, nnz = int(np.prod(entry["shape"])), int(entry["nnz"])
    if "seed" in entry:
        return seeded_positions(numel, nnz, entry["seed"])
    if entry.get("dense"):
        return np.arange(numel, dtype=np.int64)
    return decode_positions(tensors[f"w.{name}.positions"].numpy())
