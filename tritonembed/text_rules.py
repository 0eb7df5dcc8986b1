"""The one rule for input text that carries nothing to embed. Standard library only.

A text is **blank** when nothing is left after removing every character that is whitespace
(``str.isspace``) or in the Unicode categories ``Cc`` (control), ``Cf`` (format: zero-width space,
joiners, BOM, bidi marks, tags), ``Zs`` (space separators), ``Zl`` / ``Zp`` (line and paragraph
separators). ``""``, ``"   "``, ``"\\x00\\x01"``, ``"\\u200b"`` and ``"\\ufeff\\n"`` are blank;
``"a"``, ``"\\u200ba"`` and ``"."`` are not. Blank texts are refused ("input[i] is empty"); a
text that is not blank is embedded exactly as sent (nothing is stripped).

The gateway, the Python client and the Triton tokenizer model all call :func:`is_blank`, so the
three layers refuse the same texts.
"""

from __future__ import annotations

import functools
import sys
import unicodedata
from collections.abc import Iterable

BLANK_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


@functools.lru_cache(maxsize=1)
def blank_characters() -> str:
    """Every code point the rule removes (about 250; computed once, from this Python's Unicode tables)."""
    return "".join(
        ch
        for ch in map(chr, range(sys.maxunicode + 1))
        if ch.isspace() or unicodedata.category(ch) in BLANK_CATEGORIES
    )


def is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing but whitespace, control, format and separator characters."""
    if not text:
        return True
    first = text[0]
    # Fast path: most texts start with a visible character.
    if not first.isspace() and unicodedata.category(first) not in BLANK_CATEGORIES:
        return False
    return not text.strip(blank_characters())


def first_blank(texts: Iterable[str]) -> int | None:
    """The index of the first blank text in ``texts``, or None."""
    return next((i for i, text in enumerate(texts) if is_blank(text)), None)
