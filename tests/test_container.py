"""The container is strict: it round-trips exactly and refuses anything damaged."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from salomi.errors import SalomiError
from salomi.packing import container


def _sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a": rng.integers(0, 255, (3, 7), dtype=np.uint8),
        "b": rng.standard_normal((5,)).astype(np.float16),
        "c": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "d": np.arange(11, dtype=np.int16),
        "empty": np.zeros((0, 4), dtype=np.int8),
    }


def test_roundtrip_exact(tmp_path: Path) -> None:
    t = _sample()
    size = container.save(tmp_path / "x.salomi", t, {"hello": [1, 2]})
    c = container.load(tmp_path / "x.salomi")
    assert c.file_bytes == size == (tmp_path / "x.salomi").stat().st_size
    assert c.metadata == {"hello": [1, 2]}
    for k, v in t.items():
        assert c.tensors[k].dtype == v.dtype and np.array_equal(c.tensors[k], v)
        assert c.nbytes(k) == v.nbytes


def _saved(tmp_path: Path) -> Path:
    p = tmp_path / "x.salomi"
    container.save(p, _sample(), {"m": 1})
    return p


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SalomiError, match="no such file"):
        container.load(tmp_path / "nope.salomi")


@pytest.mark.parametrize("keep", [0, 10, 30, -1])
def test_truncated(tmp_path: Path, keep: int) -> None:
    p = _saved(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[:keep] if keep >= 0 else data[:-3])
    with pytest.raises(SalomiError, match="truncated|not a valid"):
        container.load(p)


def test_wrong_magic(tmp_path: Path) -> None:
    p = _saved(tmp_path)
    data = bytearray(p.read_bytes())
    data[:8] = b"GGUFxxxx"
    p.write_bytes(bytes(data))
    with pytest.raises(SalomiError, match="magic"):
        container.load(p)


def test_edited_header(tmp_path: Path) -> None:
    p = _saved(tmp_path)
    data = p.read_bytes()
    edited = data.replace(b'"m":1', b'"m":2')
    assert edited != data
    p.write_bytes(edited)
    with pytest.raises(SalomiError, match="header checksum"):
        container.load(p)


def test_edited_header_with_fixed_crc_but_bad_offsets(tmp_path: Path) -> None:
    p = _saved(tmp_path)
    data = p.read_bytes()
    _, hlen, _, _ = container.PREAMBLE.unpack(data[:24])
    header = json.loads(data[24 : 24 + hlen])
    header["tensors"]["a"]["offsets"][1] += 1  # claims one more byte than its shape
    hb = json.dumps(header).encode()
    hb += b" " * (-(24 + len(hb)) % 8)
    body = data[24 + hlen :]
    header["data_bytes"] = len(body)
    p.write_bytes(struct.pack("<8sQII", container.MAGIC, len(hb), zlib.crc32(hb), 0) + hb + body)
    with pytest.raises(SalomiError, match="inconsistent|expected"):
        container.load(p)


def test_checksum_mismatch(tmp_path: Path) -> None:
    p = _saved(tmp_path)
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's data
    p.write_bytes(bytes(data))
    with pytest.raises(SalomiError, match="checksum mismatch in tensor"):
        container.load(p)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _saved(tmp_path)
    before = p.read_bytes()

    def crash(*_a, **_k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(container.os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        container.save(p, {"z": np.ones(1000, np.float32)}, {"new": True})
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["x.salomi"]  # no temp file left behind
