"""Bit packing shared by every storage format.

Layout (the one rule every kernel relies on): each row of unsigned codes is packed
into its own run of bytes as a little-endian bit stream -- code j of the row occupies
bits [j*K, (j+1)*K) counting from bit 0 of byte 0 -- and each row is padded with zero
bits to a whole byte. Rows are independent so a kernel can start any row at
`row * row_bytes`.
"""

from __future__ import annotations

import numpy as np


def row_bytes(n_codes: int, bits: int) -> int:
    return (n_codes * bits + 7) // 8


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack a [rows, n] array of codes in [0, 2**bits) into [rows, row_bytes] uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    codes = np.ascontiguousarray(codes)
    if codes.ndim != 2:
        raise ValueError("pack_rows expects a 2-D array")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    rows, n = codes.shape
    c = codes.astype(np.uint8)
    # Expand each code into its bits (LSB first), then let packbits gather 8 at a time.
    bit_planes = ((c[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, n * bits)
    return np.packbits(bit_planes, axis=1, bitorder="little")


def unpack_rows(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of pack_rows: [rows, row_bytes] uint8 -> [rows, n] uint8 codes."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    rows = packed.shape[0]
    if packed.shape[1] != row_bytes(n, bits):
        raise ValueError(f"packed row has {packed.shape[1]} bytes, expected {row_bytes(n, bits)}")
    flat = np.unpackbits(packed, axis=1, bitorder="little", count=n * bits)
    planes = flat.reshape(rows, n, bits).astype(np.uint8)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (planes * weights).sum(axis=2, dtype=np.uint8)


TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256: 1.6 bits per ternary weight


def pack_trits(trits: np.ndarray) -> np.ndarray:
    """Pack [rows, n] values in {0,1,2} five to a byte: byte = sum t_k * 3**k.

    Padding digits are 1 (the code for zero) so a padded weight contributes nothing.
    """
    trits = np.ascontiguousarray(trits)
    if trits.size and (trits.min() < 0 or trits.max() > 2):
        raise ValueError("trits must be in {0, 1, 2}")
    rows, n = trits.shape
    nb = (n + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE
    padded = np.ones((rows, nb * TRITS_PER_BYTE), dtype=np.uint16)
    padded[:, :n] = trits
    digits = padded.reshape(rows, nb, TRITS_PER_BYTE)
    powers = np.array([1, 3, 9, 27, 81], dtype=np.uint16)
    return (digits * powers).sum(axis=2).astype(np.uint8)


def unpack_trits(packed: np.ndarray, n: int) -> np.ndarray:
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    rows, nb = packed.shape
    if nb != (n + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE:
        raise ValueError("packed ternary row has the wrong length")
    if packed.size and packed.max() > 242:
        raise ValueError("packed ternary byte out of range (> 242)")
    v = packed.astype(np.int32)[:, :, None]
    powers = np.array([1, 3, 9, 27, 81], dtype=np.int32)
    digits = (v // powers) % 3
    return digits.reshape(rows, nb * TRITS_PER_BYTE)[:, :n].astype(np.uint8)
