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

# One text of about this many tokens (capped at the spec's max_length) checks each export at a length where
# attention spans many kernel tiles; long enough to catch a wrong mask or position, short enough for a 2-core CPU.
LONG_PROBE_TOKENS = 1024


def long_probe_text(count_tokens, tokens: int) -> str:
    """A text of at most ``tokens`` tokens (and close to it): the probe texts repeated, then cut by words.

    ``count_tokens(texts) -> list[int]`` counts tokens without truncation (``SpecTokenizer.count_untruncated``).
    """
    words = " ".join(PROBE_TEXTS).split()
    per_round = max(1, count_tokens([" ".join(words)])[0])
    words = words * (tokens // per_round + 2)
    low, high = 1, len(words)  # the longest prefix of words that fits: binary search on the word count
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens([" ".join(words[:middle])])[0] <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])
