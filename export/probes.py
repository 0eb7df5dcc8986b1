"""The fixed probe set every export is validated on: mixed lengths and scripts, code, emoji, one token."""

from __future__ import annotations

PROBE_TEXTS: tuple[str, ...] = (
    "a",
    "Hello, world!",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "量子计算利用叠加和纠缠来处理信息。",
    "北京是中华人民共和国的首都，也是全国的政治、文化中心。",
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '7 days' ORDER BY name;",
    "I love this! 🎉🚀😊 Best day ever 👍🏽",
    "Die Katze sitzt auf der Matte, während draußen der Regen fällt.",
    "   leading and trailing whitespace   ",
    "Retrieval-augmented generation combines a search index with a language model so that answers "
    "are grounded in documents. " * 12,
)
