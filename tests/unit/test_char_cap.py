"""The character cap before tokenization, on the real MiniLM (WordPiece) and Qwen3 (byte-level BPE) tokenizers.

The cut must give exactly the ids of tokenizing the whole text and truncating, on long random and adversarial
texts, and a text that is too long with truncation off must be refused without tokenizing it.
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tritonembed.errors import InputError
from tritonembed.export import qwen_tokenizer as qt
from tritonembed.export.families import BertLikeFamily, ExportOptions, read_json
from tritonembed.export.resolve import resolve_model
from tritonembed.model_repository.stages import TokenizeRequest, tokenize_requests
from tritonembed.model_repository.tokenization import CHAR_CAP_MARGIN_TOKENS, SpecTokenizer
from tritonembed.spec import ModelSpec

MAX_LENGTH = 16  # small, so texts of a few hundred kB are far past the cap and the references stay cheap


@functools.cache
def _minilm(max_length: int) -> SpecTokenizer:
    resolved = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    config = read_json(resolved.path / "config.json")
    spec = BertLikeFamily().make_spec(resolved.path, resolved.model_id, config, ExportOptions(max_length=max_length))
    return SpecTokenizer(resolved.path / "tokenizer.json", spec)


@functools.cache
def _qwen(directory: Path, max_length: int) -> SpecTokenizer:
    if not (directory / "tokenizer.json").exists():
        qt.save_qwen3_tokenizer(directory)
    spec = ModelSpec(
        name="qwen-test", model_id="qwen-test", family="qwen3", pooling="last_token", normalize=True, hidden_size=8,
        max_length=max_length, padding_side="left", pad_token_id=151643, precision="fp32",
        query_template="Instruct: {instruction}\nQuery:{text}",
    )
    return SpecTokenizer(directory / "tokenizer.json", spec)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen-tokenizer")


@pytest.fixture(scope="module", params=["minilm", "qwen"])
def spec_tokenizer(request, qwen_dir) -> SpecTokenizer:
    return _minilm(MAX_LENGTH) if request.param == "minilm" else _qwen(qwen_dir, MAX_LENGTH)


def _reference(tok: SpecTokenizer, text: str) -> tuple[list[int], bool]:
    """The whole text tokenized and truncated by a fresh copy of the same tokenizer (no cap involved)."""
    whole = Tokenizer.from_str(tok.tokenizer.to_str())
    whole.no_padding()
    whole.enable_truncation(max_length=tok.spec.max_length)
    encoding = whole.encode(text)
    return encoding.ids, bool(encoding.overflowing)


def _ours(tok: SpecTokenizer, text: str, instruction: str | None = None) -> tuple[list[int], bool]:
    formatted = tok.format([text], None if instruction is None else [instruction])
    batch = tok.encode(formatted)
    return batch.ids[0], batch.truncated[0]


def _texts(n: int) -> dict[str, str]:
    rng = random.Random(15)
    words = "the quick brown fox jumps over a lazy dog naïve café 中文字符 😀 ÅΩ ﬁ Ⅻ İstanbul ǅ ß Ελλάδα ру́сский".split()
    marks = [0x300, 0x301, 0x316, 0x317, 0x334, 0x35C, 0x345, 0x659]
    return {
        "space run": "a" + " " * n + " b c d" * 200,
        "mixed whitespace runs": ("x" + " \t\n\r\u3000\u00a0\u2028" * (n // 7)) * 2 + " end" * 200,
        "one giant word": "a" * n + " hello world" * 200,
        "giant cyrillic word": "ж" * n + " hello world" * 200,
        "giant accented word": "é" * n + " hello" * 200,
        "giant hangul word": "한" * n + " 한국어" * 200,
        "emoji run": "😀" * n + " hello" * 200,
        "emoji with spaces": "😀 " * n,
        "cjk without punctuation": "中文" * n,
        "cjk with punctuation": "中文字符，" * (n // 5),
        "zalgo": "".join("a" + "".join(chr(rng.choice(marks)) for _ in range(20)) for _ in range(n // 21)),
        "one giant combining sequence": "a" + "".join(chr(rng.choice(marks)) for _ in range(n)) + " tail" * 200,
        "controls and zero-width": "a" + "\u200b\u00ad\x00\x01\ufeff" * (n // 5) + "b c" * 200,
        "soft hyphens inside words": "ab\u00adcd " * (n // 6),
        "punctuation run": "!" * n + " x" * 200,
        "dash lines": ("-" * 1000 + " ") * (n // 1000),
        "special tokens split by a deleted char": "[MA\u00adSK] [MASK] <|endoftext|> " * (n // 30),
        "random words": " ".join(rng.choice(words) for _ in range(n // 5)),
        "random words without spaces": "".join(rng.choice(words) for _ in range(n // 5)),
        "newlines": "word\n\n\r\n" * (n // 8),
        "replacement characters": "\ufffd" * n + " z" * 200,
        "random code points": "".join(chr(rng.choice([rng.randrange(0x20, 0x3000), rng.randrange(0x1F300, 0x1FA00)])) for _ in range(n)),
    }


@pytest.mark.parametrize("kind", list(_texts(10)))
def test_cut_gives_the_ids_of_the_whole_text_truncated(spec_tokenizer, kind):
    text = _texts(25_000)[kind]
    assert len(text) > spec_tokenizer.cap.limit  # the cut path, not the short one
    assert _ours(spec_tokenizer, text) == _reference(spec_tokenizer, text)


def test_cut_is_exact_at_the_real_lengths(qwen_dir):
    rng = random.Random(3)
    for tok in (_minilm(256), _qwen(qwen_dir, 512)):
        assert tok.cap.limit < 300_000
        for kind in ("random words", "space run", "one giant word"):
            text = _texts(100_000)[kind]
            assert _ours(tok, text) == _reference(tok, text), kind
        # texts just around the cap, cut or not
        for size in (tok.cap.limit, tok.cap.limit + 1):
            text = "".join(rng.choice("ab  c,.é中😀\n") for _ in range(size))
            assert _ours(tok, text) == _reference(tok, text), size


def test_instruction_and_template_are_cut_with_the_text(qwen_dir):
    tok = _qwen(qwen_dir, MAX_LENGTH)
    for instruction, text in (("find " * 10_000, "short"), ("short", "word " * 10_000)):
        formatted = tok.spec.format_text(text, instruction)
        assert _ours(tok, text, instruction) == _reference(tok, formatted)


def test_short_texts_are_tokenized_as_sent(spec_tokenizer):
    text = "a  b\u200b c " * (spec_tokenizer.cap.limit // 10)
    assert len(text) <= spec_tokenizer.cap.limit
    assert spec_tokenizer.format([text]) == [text]


def test_derived_caps():
    minilm = _minilm(256)
    # WordPiece: max_input_chars_per_word = 100; a word of 101 plain characters (one [UNK]) with the
    # deleted characters kept between them, plus its space.
    assert minilm.cap.kind == "wordpiece" and minilm.cap.chars_per_token == 2 * 101 + 1
    assert minilm.cap.content_tokens == 254 and minilm.cap.limit == (254 + CHAR_CAP_MARGIN_TOKENS) * 203


def test_qwen_cap_comes_from_the_longest_token(qwen_dir):
    tok = _qwen(qwen_dir, 512)
    # the longest Qwen token is a run of 128 spaces
    assert tok.cap.kind == "bpe" and tok.cap.chars_per_token == 128
    assert tok.tokenizer.encode(" " * 128, add_special_tokens=False).ids.__len__() == 1
    assert tok.cap.content_tokens == 511  # <|endoftext|> is appended


def test_collapsing_whitespace_keeps_minilm_ids():
    """The claim the WordPiece compaction rests on: BertPreTokenizer drops whitespace, so any run of it
    splits like one space; BertNormalizer (clean_text, lowercase, strip_accents) removes controls and marks."""
    tok = _minilm(512)
    normalizer = tok.tokenizer.normalizer
    config = json.loads(tok.tokenizer.to_str())["normalizer"]
    assert config == {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                      "strip_accents": None, "lowercase": True}  # strip_accents follows lowercase: on
    assert normalizer.normalize_str("Ab\u0301\u200b\x00c") == "abc"
    rng = random.Random(1)
    spaces = " \t\n\r\u00a0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
    words = ["hello", "naïve", "中文", "don't", "[MASK]", "x" * 150, "😀"]
    for _ in range(50):
        parts = [rng.choice(words) + "".join(rng.choice(spaces) for _ in range(rng.randint(1, 40))) for _ in range(30)]
        text = "".join(parts)
        collapsed = re.sub(f"[{spaces}]+", " ", text)
        assert tok.tokenizer.encode(text).ids == tok.tokenizer.encode(collapsed).ids
    # ... but characters that clean_text deletes join words: they are never turned into spaces
    assert tok.tokenizer.encode("ab\x0bcd").ids != tok.tokenizer.encode("ab cd").ids


class _NoTokenizing:
    """Stands in for the Rust tokenizer: any call to tokenize fails the test."""

    def __init__(self, real: Tokenizer) -> None:
        self._real = real

    def num_special_tokens_to_add(self, pair: bool) -> int:
        return self._real.num_special_tokens_to_add(pair)

    def __getattr__(self, name):
        raise AssertionError(f"the tokenizer was called ({name}) for a text refused by length")


@pytest.mark.parametrize("text", ["word " * 10_000_000, "中" * 50_000_000], ids=["50MB words", "50M chars cjk"])
def test_too_long_with_truncation_off_is_refused_without_tokenizing(spec_tokenizer, text):
    real = spec_tokenizer.tokenizer
    spec_tokenizer.tokenizer = _NoTokenizing(real)
    try:
        requests = [TokenizeRequest([b"fine", text.encode()], truncate=[True, False])]
        [result] = tokenize_requests(spec_tokenizer, requests)
    finally:
        spec_tokenizer.tokenizer = real
    assert isinstance(result, InputError)
    message = str(result)
    assert message.startswith(f"input[1] has more than {MAX_LENGTH} tokens") and "input[0]" not in message
    assert f"limit is {MAX_LENGTH} tokens and truncation is disabled" in message


def test_too_long_with_truncation_off_names_only_that_input(spec_tokenizer):
    sparse = "a" + " " * 500_000 + "b"  # MiniLM: two words, accepted; Qwen: spaces are tokens, refused
    long = "word " * 200_000
    [refused, sparse_result, fine] = tokenize_requests(spec_tokenizer, [
        TokenizeRequest([b"ok", long.encode()], truncate=[False, False]),
        TokenizeRequest([sparse.encode()], truncate=[False]),
        TokenizeRequest([b"ok"], truncate=[False]),
    ])
    assert isinstance(refused, InputError) and str(refused).startswith("input[1] has more than")
    ids, truncated = _reference(spec_tokenizer, sparse)
    if truncated:
        assert spec_tokenizer.cap.kind == "bpe" and isinstance(sparse_result, InputError)
    else:
        assert spec_tokenizer.cap.kind == "wordpiece" and sparse_result.token_counts.ravel().tolist() == [len(ids)]
    assert fine.token_counts.ravel().tolist() == [len(_reference(spec_tokenizer, "ok")[0])]


def test_template_text_is_covered_by_the_cap():
    """A sparse text just under the cap, pushed over it by its template, is still counted, not refused."""
    import dataclasses

    base = _minilm(MAX_LENGTH)
    tok = SpecTokenizer.__new__(SpecTokenizer)
    tok.spec = dataclasses.replace(base.spec, document_template="passage: {text}")
    tok.tokenizer, tok.cap = base.tokenizer, base.cap
    text = "a" + " " * (tok.cap.limit - 3) + "b"
    [result] = tokenize_requests(tok, [TokenizeRequest([text.encode()], truncate=[False])])
    assert not isinstance(result, InputError), result
    assert result.token_counts.ravel().tolist() == [len(_reference(tok, "passage: " + text)[0])]


def test_longest_canonical_decomposition_is_the_declared_one():
    import sys
    import unicodedata

    from tritonembed.model_repository.tokenization import MAX_CANONICAL_DECOMPOSITION

    longest = max(len(unicodedata.normalize("NFD", chr(c))) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000)
    assert longest == MAX_CANONICAL_DECOMPOSITION
