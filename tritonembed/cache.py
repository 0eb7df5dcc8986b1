"""Where tritonembed keeps what it builds: exports, random test models, tokenizers, repositories."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$TRITONEMBED_CACHE``, else ``$XDG_CACHE_HOME/tritonembed``, else ``~/.cache/tritonembed``."""
    explicit = os.environ.get("TRITONEMBED_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tritonembed"
