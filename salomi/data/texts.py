"""Named evaluation/calibration texts, prepared once from the fetched assets and cached as plain UTF-8.

TEXTS: names accepted by `load_text`
    brown            the whole Brown corpus (500 documents, ~1.0M words of 1961 American English, 15 genres a-r)
    brown:GENRES     only the documents of the given genre letters, e.g. "brown:a-j", "brown:k-r", "brown:abc";
                     lets calibration and evaluation use disjoint genres of the same corpus
    austen           Jane Austen's six novels (~717k words), in publication order
    PATH             any existing file, or any path ending in .txt (read as UTF-8)

Format of the named texts: one paragraph per line, documents (novels, Brown files) separated by one blank line.
"""

from __future__ import annotations

import gzip
import os
import string
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path

from salomi.assets import cache_dir, ensure
from salomi.errors import SalomiError

# Bump when the preparation below changes, so stale cached texts are not reused.
FORMAT_VERSION = 1

BROWN_GENRES = string.ascii_lowercase[: string.ascii_lowercase.index("r") + 1]  # "a".."r"
AUSTEN_NOVELS = (  # publication order, as janeaustenr::austen_books() uses
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
TEXTS: dict[str, str] = {
    "brown": "Brown corpus, all 500 documents (~1.0M words, American English 1961)",
    "brown:GENRES": "Brown documents of the given genre letters a-r, e.g. brown:a-j, brown:k-r, brown:abc",
    "austen": "Jane Austen's six novels (~717k words, British English 1811-1818)",
    "PATH": "any existing file or path ending in .txt, read as UTF-8",
}

_NO_SPACE_BEFORE = frozenset(
    {",", ".", ";", ":", "!", "?", ")", "]", "}", "'", "''", "n't", "'s", "'re", "'ve", "'ll", "'d", "'m"}
)
_NO_SPACE_AFTER = frozenset({"(", "[", "{", "``"})
_QUOTES = {"``": '"', "''": '"'}


# ---------------------------------------------------------------------------------------------- Brown


def _parse_genres(spec: str) -> str:
    """Accept letters and ranges ("a-j", "abc", "a-c,k") so users can name a held-out genre split."""
    chosen: set[str] = set()
    s = spec.replace(",", "").replace(" ", "").lower()
    i = 0
    while i < len(s):
        lo = s[i]
        if i + 2 < len(s) and s[i + 1] == "-":
            hi = s[i + 2]
            if lo not in BROWN_GENRES or hi not in BROWN_GENRES or hi < lo:
                raise SalomiError(f"bad Brown genre range {lo}-{hi} in {spec!r}; use letters a-r, e.g. brown:a-j")
            chosen.update(BROWN_GENRES[BROWN_GENRES.index(lo) : BROWN_GENRES.index(hi) + 1])
            i += 3
        else:
            if lo not in BROWN_GENRES:
                raise SalomiError(f"bad Brown genre {lo!r} in {spec!r}; use letters a-r, e.g. brown:a-j or brown:abc")
            chosen.add(lo)
            i += 1
    if not chosen:
        raise SalomiError(f"no Brown genres in {spec!r}; use letters a-r, e.g. brown:a-j")
    return "".join(sorted(chosen))


def _detokenize(words: Iterable[str]) -> str:
    """Undo the corpus's space-separated tokenization with a few fixed rules, so the result is deterministic."""
    out: list[str] = []
    glue = True  # no space before the first token
    prev = ""
    for w in words:
        if w == "." and prev.endswith(".") and prev.strip("."):
            continue  # "Jr. ." at a sentence end was one period in print
        prev = w
        text = _QUOTES.get(w, w)
        if out and not glue and w not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(text)
        glue = w in _NO_SPACE_AFTER
    return "".join(out)


def _brown_document(raw: str) -> str:
    """Blank lines, tab-indented lines and headlines start paragraphs; other lines are sentences of the same one."""
    paragraphs: list[list[str]] = []
    fresh = True
    for line in raw.split("\n"):
        if not line.strip():
            fresh = True
            continue
        tokens = line.split()
        # Headlines (every tag ends in -hl) are their own paragraph rather than run into the next sentence.
        headline = all(tok.endswith("-hl") for tok in tokens)
        if fresh or headline or line.startswith("\t"):
            paragraphs.append([])
        fresh = headline
        # The tag follows the last slash: "1/2/cd" is the word "1/2", "//in" is the word "/".
        paragraphs[-1].extend(tok.rpartition("/")[0] or tok for tok in tokens)
    return "\n".join(_detokenize(p) for p in paragraphs if p)


def brown_files(genres: str = BROWN_GENRES) -> list[Path]:
    """Brown documents (cXNN, X = genre letter) in sorted order."""
    root = ensure("brown")
    files = sorted(p for p in root.glob("c[a-r][0-9][0-9]") if p.name[1] in genres)
    if not files:
        raise SalomiError(f"no Brown files for genres {genres!r} in {root}; delete that directory and retry")
    return files


def _prepare_brown(genres: str) -> str:
    return "\n\n".join(_brown_document(p.read_text(encoding="utf-8")) for p in brown_files(genres))


# ---------------------------------------------------------------------------------------------- Austen


def _rdb_entry(blob: bytes, offset: int, length: int) -> bytes:
    """Lazy-load database entries are a 4-byte big-endian length followed by a zlib stream."""
    chunk = blob[offset : offset + length]
    size = struct.unpack(">I", chunk[:4])[0]
    raw = zlib.decompress(chunk[4:])
    if len(raw) != size:
        raise SalomiError("janeaustenr Rdata.rdb entry has the wrong length; delete the austen cache dir and retry")
    return raw


def austen_novels() -> dict[str, list[str]]:
    """Each novel as its list of text lines, straight from the R package's data."""
    import rdata  # imported here: only Austen needs it

    data = ensure("austen") / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the bare index stream has no RDS header
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data / "Rdata.rdx").read_bytes())))
        blob = (data / "Rdata.rdb").read_bytes()
        variables = {str(k): v for k, v in index["variables"].items()}
        novels: dict[str, list[str]] = {}
        for name in AUSTEN_NOVELS:
            if name not in variables:
                raise SalomiError(f"janeaustenr data has no {name!r} (has {sorted(variables)}); the package changed")
            offset, length = (int(x) for x in variables[name])
            lines = rdata.conversion.convert(rdata.parser.parse_data(_rdb_entry(blob, offset, length)))
            novels[name] = [str(x) for x in lines]
    return novels


def _paragraphs(lines: Iterable[str]) -> list[str]:
    """Blank lines separate paragraphs; whitespace runs collapse so wrapped lines and double spaces read as prose."""
    out: list[str] = []
    cur: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            cur.append(line)
        elif cur:
            out.append(" ".join(" ".join(cur).split()))
            cur = []
    return out


def _prepare_austen() -> str:
    return "\n\n".join("\n".join(_paragraphs(lines)) for lines in austen_novels().values())


# ---------------------------------------------------------------------------------------------- entry point


def _named(name: str) -> tuple[str, str] | None:
    """Map a text name to (cache key, canonical form); None if it is not a named text."""
    if name == "brown":
        return "brown", BROWN_GENRES
    if name.startswith("brown:"):
        genres = _parse_genres(name.split(":", 1)[1])
        return ("brown" if genres == BROWN_GENRES else f"brown-{genres}"), genres
    if name == "austen":
        return "austen", ""
    return None


def _check_nonempty(text: str, what: str) -> str:
    if not text.strip():
        raise SalomiError(f"{what} is empty; give a text with some content")
    return text


def load_text(name: str) -> str:
    """Return a named text (see TEXTS) or a file's contents, preparing and caching named texts on first use."""
    named = _named(name)
    if named is None:
        path = Path(name).expanduser()
        if name.endswith(".txt") or path.exists() or os.sep in name:
            if not path.is_file():
                raise SalomiError(f"text file {name} does not exist; give an existing path or one of: {_known()}")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise SalomiError(f"text file {name} is not valid UTF-8 (byte {e.start}); convert it first") from e
            return _check_nonempty(text, f"text file {name}")
        raise SalomiError(f"unknown text {name!r}; known texts: {_known()}")

    key, genres = named
    cached = cache_dir() / "texts" / f"{key}.v{FORMAT_VERSION}.txt"
    if cached.is_file():
        return _check_nonempty(cached.read_text(encoding="utf-8"), f"cached text {cached}")
    text = _prepare_austen() if key == "austen" else _prepare_brown(genres)
    _check_nonempty(text, f"text {name!r}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=cached.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is meant to be shared like the assets
        os.replace(tmp, cached)  # readers never see a half-written cache file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return text


def _known() -> str:
    return ", ".join(TEXTS)
