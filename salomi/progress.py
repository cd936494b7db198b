"""Progress bars with ETA; quiet redraws when stderr is not a terminal (logs, CI)."""

from __future__ import annotations

import sys
from typing import Any


def bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **kw: Any) -> Any:
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=interactive,
                mininterval=0.2 if interactive else 15.0, **kw)
