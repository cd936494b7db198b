"""The SALOMI container: a tiny, strict, safetensors-style file.

    bytes 0..8    magic b"SALOMIPK"
    bytes 8..16   header length N, uint64 little-endian
    bytes 16..20  CRC-32 of the header bytes, uint32 little-endian
    bytes 20..24  zero
    bytes 24..24+N  JSON header (UTF-8, space padded so the data starts 8-aligned)
    then the data: raw little-endian tensor buffers, each 8-aligned.

The header holds {"format_version", "metadata", "data_bytes", "tensors"}; each tensor
entry is {"dtype", "shape", "offsets": [begin, end] relative to the data start,
"crc32"}. Nothing is unpickled and no code runs on load; every size, offset and
checksum is checked before a byte is trusted.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from salomi.errors import SalomiError

MAGIC = b"SALOMIPK"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sQII")
ALIGN = 8
MAX_HEADER = 64 << 20

DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("<u1"),
    "int8": np.dtype("<i1"),
    "uint16": np.dtype("<u2"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _dtype_name(a: np.ndarray) -> str:
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    name = _DTYPE_NAMES.get(np.dtype(dt).newbyteorder("<"))
    if name is None:
        raise TypeError(f"dtype {a.dtype} cannot be stored")
    return name


def _pad(n: int) -> int:
    return (-n) % ALIGN


def save(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], metadata: dict[str, Any]) -> int:
    """Write atomically (temp file, fsync, rename). Returns the file size in bytes."""
    path = Path(path)
    entries: dict[str, Any] = {}
    offset = 0
    buffers: list[tuple[int, bytes]] = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dname = _dtype_name(a)
        raw = a.astype(DTYPES[dname], copy=False).tobytes()
        offset += _pad(offset)
        entries[name] = {
            "dtype": dname,
            "shape": list(a.shape),
            "offsets": [offset, offset + len(raw)],
            "crc32": zlib.crc32(raw),
        }
        buffers.append((offset, raw))
        offset += len(raw)
    header = {"format_version": FORMAT_VERSION, "metadata": metadata, "data_bytes": offset, "tensors": entries}
    hb = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    hb += b" " * _pad(PREAMBLE.size + len(hb))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(PREAMBLE.pack(MAGIC, len(hb), zlib.crc32(hb), 0))
            f.write(hb)
            pos = 0
            for off, raw in buffers:
                f.write(b"\0" * (off - pos))
                f.write(raw)
                pos = off + len(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path.stat().st_size


@dataclass
class Container:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]
    file_bytes: int
    entries: dict[str, Any]

    def nbytes(self, name: str) -> int:
        b, e = self.entries[name]["offsets"]
        return e - b


def load(path: str | os.PathLike[str], verify: bool = True) -> Container:
    """Open and validate a container; tensors are read-only views of a memory map."""
    path = Path(path)
    if not path.exists():
        raise SalomiError(f"{path}: no such file; give the path of a .salomi file made by `salomi quantize`")
    size = path.stat().st_size
    bad = f"{path}: not a valid SALOMI file"
    if size < PREAMBLE.size:
        raise SalomiError(f"{bad} (only {size} bytes; truncated?) - re-run `salomi quantize`")
    with open(path, "rb") as f:
        magic, hlen, hcrc, _ = PREAMBLE.unpack(f.read(PREAMBLE.size))
        if magic != MAGIC:
            raise SalomiError(f"{bad} (wrong magic bytes) - give a file written by `salomi quantize`")
        if hlen > MAX_HEADER or PREAMBLE.size + hlen > size:
            raise SalomiError(f"{bad} (header length {hlen} exceeds the file; truncated?) - re-create it")
        hb = f.read(hlen)
    if zlib.crc32(hb) != hcrc:
        raise SalomiError(f"{bad} (header checksum mismatch: edited or corrupt) - re-create it")
    try:
        header = json.loads(hb)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SalomiError(f"{bad} (header is not JSON: {e})") from None
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise SalomiError(f"{path}: format version {version} is not supported (this SALOMI reads {FORMAT_VERSION})")
    data_start = PREAMBLE.size + hlen
    data_bytes = header.get("data_bytes")
    if not isinstance(data_bytes, int) or data_start + data_bytes != size:
        raise SalomiError(
            f"{bad} (expected {data_start + (data_bytes or 0)} bytes, found {size}; truncated or padded) - re-create it"
        )
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_bytes,)) if data_bytes else np.zeros(0, np.uint8)
    tensors: dict[str, np.ndarray] = {}
    spans = []
    for name, ent in header["tensors"].items():
        try:
            dt = DTYPES[ent["dtype"]]
            shape = tuple(int(s) for s in ent["shape"])
            b, e = (int(x) for x in ent["offsets"])
        except (KeyError, TypeError, ValueError):
            raise SalomiError(f"{bad} (tensor {name!r} has a malformed entry)") from None
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if any(s < 0 for s in shape) or not 0 <= b <= e <= data_bytes or e - b != count * dt.itemsize:
            raise SalomiError(f"{bad} (tensor {name!r} size or offsets are inconsistent)")
        buf = mm[b:e]
        if verify and zlib.crc32(memoryview(buf)) != ent.get("crc32"):
            raise SalomiError(f"{bad} (checksum mismatch in tensor {name!r}: corrupt) - re-create it")
        spans.append((b, e, name))
        tensors[name] = buf.view(dt).reshape(shape)
    spans.sort()
    for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise SalomiError(f"{bad} (tensors {n1!r} and {n2!r} overlap)")
    return Container(path, header.get("metadata", {}), tensors, size, header["tensors"])


__all__ = ["save", "load", "Container", "MAGIC", "FORMAT_VERSION", "mmap"]
