"""Which malloc a long training run uses, and re-running a command under mimalloc.

Recovery allocates and frees thousands of weight-sized tensors per step. With glibc's malloc
they either fragment the heap (16 GB resident; see api.map_large_allocations) or, served by
mmap as we ask, come back as fresh zero pages every step: 3.4 M page faults and ~30% of the
CPU time in the kernel. mimalloc with purging off keeps freed pages mapped and reuses them
without that fragmentation: the same losses, no faults, 1.5-1.9x faster steps (docs/RESULTS.md,
"Session 23"). mimalloc must be loaded before the interpreter's first malloc, so the command
re-executes itself once with LD_PRELOAD set; SALOMI_ALLOCATOR=system opts out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_CHOICE = "SALOMI_ALLOCATOR"  # "mimalloc" (default where available) or "system"
# Freed memory stays mapped for reuse (never purged back to the OS): resident memory is the
# run's peak footprint, measured under 8 GiB for recovery of the default model.
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "-1"}
_REEXECUTED = "SALOMI_ALLOCATOR_REEXEC"


def mimalloc_library() -> Path | None:
    """libmimalloc shipped by the cmeel-mimalloc package (a dependency on Linux), or None."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name.startswith("libmimalloc.so"):
            path = Path(str(dist.locate_file(f)))
            if path.exists():
                return path
    return None


def active_allocator() -> str:
    """'mimalloc' if it serves this process's malloc (loaded by LD_PRELOAD), else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"


def reexec_under_mimalloc(command: str) -> None:
    """Replace this process by the same command line with mimalloc preloaded, unless it is
    already loaded, opted out (SALOMI_ALLOCATOR=system) or not available on this platform."""
    choice = os.environ.get(ENV_CHOICE, "mimalloc")
    if choice not in ("mimalloc", "system"):
        from salomi.errors import SalomiError

        raise SalomiError(f"{ENV_CHOICE}={choice!r}: use mimalloc (default) or system")
    if choice == "system" or not sys.platform.startswith("linux") or active_allocator() == "mimalloc":
        return
    if os.environ.get(_REEXECUTED):  # preloaded, yet not loaded: say so once, never loop
        print(f"[salomi] {command}: LD_PRELOAD of mimalloc did not take; using the system malloc", file=sys.stderr)
        return
    lib = mimalloc_library()
    if lib is None:
        print(f"[salomi] {command}: mimalloc not installed (pip install cmeel-mimalloc); using the system malloc, "
              f"~2x slower training steps", file=sys.stderr)
        return
    env = dict(os.environ)
    env.update(MIMALLOC_ENV)
    env["LD_PRELOAD"] = ":".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    env[_REEXECUTED] = "1"
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
