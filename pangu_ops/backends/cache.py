"""The one folder where pangu_ops keeps what it builds (the AscendC CPU twin, triton-ascend's
lowered kernels, compile-check results).

`$PANGU_OPS_CACHE` if set, else `$XDG_CACHE_HOME/pangu-ops`, else `~/.cache/pangu-ops`: per user,
and named so that Python can never import it (a folder called `pangu_ops` in the temp folder or the
working directory would shadow the installed package for every script run from there).
"""
from __future__ import annotations

import os
from pathlib import Path

NAME = "pangu-ops"  # the hyphen keeps it from being importable as a package


def cache_dir(*parts: str) -> Path:
    """`<cache root>/<parts...>`, created if missing."""
    root = os.environ.get("PANGU_OPS_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / NAME
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
