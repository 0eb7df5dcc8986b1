"""What every ``tritonembed`` sub-command shares: environment defaults, the help format, common flags.

Its own module so that ``tritonembed.cli`` (the entry point) imports the sub-command modules and none of
them imports the entry point back.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ENV_PREFIX = "TRITONEMBED_"


def env_default(flag: str, default=None, cast=str):
    """Default of ``--flag``: ``TRITONEMBED_FLAG`` when set, else ``default``."""
    value = os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"))
    if value is None:
        return default
    if cast is bool:
        return value.lower() in ("1", "true", "yes", "on")
    return cast(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default appended to its help (when it has a real one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings:
            return text
        if action.default in (None, False, argparse.SUPPRESS) or action.default == ():
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with :class:`HelpFormatter`; its sub-parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_static_shapes_flag(p: argparse.ArgumentParser) -> None:
    """``--[no-]static-shapes`` (env ``TRITONEMBED_NO_STATIC_SHAPES=1`` turns the default off): ``--no-static-shapes``
    exports the graph as torch traced it."""
    p.add_argument("--static-shapes", action=argparse.BooleanOptionalAction,
                   default=not env_default("no_static_shapes", False, bool),
                   help="--static-shapes: the traced shape arithmetic becomes constant shape inputs, faster on "
                        "the CPU; --no-static-shapes: the graph as torch traced it (docs/export.md)")
