"""Tokenization shared by the Triton tokenizer model and the exporter's validator.

Pure functions over the Rust ``tokenizers`` library and numpy, so the served tokenization is the
one validated at export time. No Triton import here.

Its second half is the character cap (:func:`derive_char_cap` and the cut rules): a proof-carrying cut that
is only correct together with the pre-tokenizer facts it reads from ``tokenizer.json``, kept beside them.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tritonembed.errors import InputError
from tritonembed.spec import ModelSpec
from tritonembed.text_rules import is_blank

log = logging.getLogger(__name__)

def load_tokenizer(tokenizer_json: Path, spec: ModelSpec):
    """Load ``tokenizer.json`` configured for serving: truncation at ``spec.max_length``, no padding.

    Raises:
        InputError: never; OSError/Exception from ``tokenizers`` propagate for a missing/corrupt file.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.enable_truncation(max_length=spec.max_length)
    return tok


@dataclass(frozen=True)
class EncodedBatch:
    """Token ids of a batch of texts, unpadded, and whether each was cut at the limit."""

    ids: list[list[int]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


class SpecTokenizer:
    """The model's tokenizer plus the spec's templates and limits.

    Texts and instructions longer than the character cap (:class:`CharCap`) are shrunk by
    :meth:`format` and cut by :meth:`encode`, so no call tokenizes more than about ``cap.limit``
    characters per text, whatever was sent; the ids are those of tokenizing the whole text and
    truncating.
    """

    def __init__(self, tokenizer_json: Path, spec: ModelSpec) -> None:
        self.spec = spec
        self.tokenizer = load_tokenizer(tokenizer_json, spec)
        self.cap = derive_char_cap(self.tokenizer, spec.max_length)
        if self.cap is None:
            log.warning("no character cap for this tokenizer type: long texts are tokenized whole")

    def format(self, texts: Sequence[str], instructions: Sequence[str | None] | None = None) -> list[str]:
        """Apply the spec's templates; texts and instructions are shrunk before (so no multi-megabyte
        copy is made) and the result after (so the template is covered by the cap too)."""
        if self.cap is None:
            shrink = str
        else:
            shrink = self.cap.shrink
        if instructions is None:
            instructions = [None] * len(texts)
        return [shrink(self.spec.format_text(shrink(t), shrink(i) if i else i))
                for t, i in zip(texts, instructions, strict=True)]

    def surely_too_long(self, text: str) -> bool:
        """Whether a formatted text has more tokens than the model takes, known without tokenizing."""
        return self.cap is not None and self.cap.surely_too_long(text)

    def is_long(self, text: str) -> bool:
        """Whether a formatted text is longer than the character cap (it is then never counted whole)."""
        return self.cap is not None and len(text) > self.cap.limit

    def encode(self, texts: Sequence[str]) -> EncodedBatch:
        """Tokenize already formatted texts, truncating to ``spec.max_length``: texts within the cap in
        one call, each longer one by a few calls on prefixes cut at exact boundaries."""
        texts = list(texts)
        short = [i for i, t in enumerate(texts) if not self.is_long(t)]
        ids: list[list[int]] = [[] for _ in texts]
        truncated = [False] * len(texts)
        if short:
            for i, e in zip(short, self.tokenizer.encode_batch([texts[i] for i in short])):
                ids[i], truncated[i] = e.ids, bool(e.overflowing)
        for i, text in enumerate(texts):
            if self.is_long(text):
                ids[i], truncated[i] = self._encode_long(text)
        return EncodedBatch(ids, truncated)

    def _encode_long(self, text: str) -> tuple[list[int], bool]:
        specials = self.tokenizer.num_special_tokens_to_add(False)
        for point, exact in self.cap.cut_points(text):
            encoding = self.tokenizer.encode(text[:point])
            if not encoding.overflowing:
                continue
            # Cut at a boundary: the prefix's ids are the whole text's. Cut inside one pre-token: accept
            # only with `margin` tokens between the kept ones and the cut.
            rest = sum(len(o.ids) - specials for o in encoding.overflowing)
            if exact or rest >= self.cap.margin:
                return encoding.ids, True
        # Only unmeasured characters make a prefix of `limit` characters this sparse: tokenize it whole.
        log.warning("a text of %d characters is too sparse for the character cap; tokenizing it whole", len(text))
        encoding = self.tokenizer.encode(text)
        return encoding.ids, bool(encoding.overflowing)

    def count_untruncated(self, texts: Sequence[str]) -> list[int]:
        """Token counts (special tokens included) the texts would have without truncation."""
        self.tokenizer.no_truncation()
        try:
            return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts))]
        finally:
            self.tokenizer.enable_truncation(max_length=self.spec.max_length)

    def pad(self, ids: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return pad_batch(ids, self.spec.pad_token_id, self.spec.padding_side, length)


def pad_batch(
    ids: Sequence[Sequence[int]], pad_id: int, side: str, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pad token lists to one length (the longest when ``length`` is None) on ``side``.

    Returns ``(input_ids, attention_mask)``, both int64 ``[len(ids), length]``.

    Raises:
        ValueError: a row is longer than ``length``.
    """
    longest = max((len(x) for x in ids), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"row of {longest} tokens does not fit padded length {length}")
    input_ids = np.full((len(ids), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for row, seq in enumerate(ids):
        n = len(seq)
        if n == 0:
            continue
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        input_ids[row, sl] = seq
        mask[row, sl] = 1
    return input_ids, mask


def decode_text(raw: object, index: int) -> str:
    """Turn one BYTES element into text.

    Raises:
        InputError: the element is not valid UTF-8, or the text is blank
            (:func:`tritonembed.text_rules.is_blank`: nothing but whitespace, controls, format characters).
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"input[{index}] is not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from exc
    elif isinstance(raw, str):
        text = raw
    else:
        raise InputError(f"input[{index}] has unsupported type {type(raw).__name__}")
    if is_blank(text):
        raise InputError(f"input[{index}] is empty")
    return text


# --- the character cap: bounded work for any text length ------------------------------------------

#: Tokens past the content limit that a cut text must still provide: the slack between "this prefix
#: holds enough tokens" and the last pre-token, which the cut may change.
CHAR_CAP_MARGIN_TOKENS = 64

#: First prefix tried for a long text, in characters per kept token: real text averages 4-6 characters
#: per token in both families, so most long texts are settled by one tokenizer call of this size.
FIRST_TRY_CHARS_PER_TOKEN = 8

# Characters `char::is_whitespace` (Rust) and BertNormalizer's clean_text agree on: Unicode White_Space
# without its Cc members U+000B, U+000C, U+0085, which clean_text deletes instead of turning into a space.
_WHITESPACE = "\t\n\r \u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


@dataclass(frozen=True)
class CharClasses:
    """Characters whose effect on a WordPiece tokenizer was measured on that tokenizer itself.

    Each candidate ``c`` is run through the tokenizer's own normalizer and pre-tokenizer as ``"x" + c + "x"``:
    ``deleted`` (normalized to ``"xx"``), ``space`` (splits into ``x``, ``x``), ``isolated`` (its own
    pre-token: punctuation, CJK), ``plain`` (stays inside the word as at least one character).
    """

    deleted: str
    space: str
    isolated: str
    plain: str


def _code_point_class(chars: str) -> str:
    """A regex character class body for ``chars`` (sorted ranges)."""
    points = sorted(set(map(ord, chars)))
    parts: list[str] = []
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        lo, hi = points[i], points[j]
        parts.append(re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
        i = j + 1
    return "".join(parts)


def _candidate_chars() -> Iterator[str]:
    """The BMP and the emoji planes' assigned, non-surrogate code points (astral scripts are left out:
    a character outside every measured class only loses the fast path, never exactness)."""
    for cp in (*range(0x10000), *range(0x1F000, 0x1FB00)):
        ch = chr(cp)
        if unicodedata.category(ch) not in ("Cn", "Cs"):
            yield ch


def measure_wordpiece_classes(tokenizer) -> CharClasses:
    """Classify characters by what this tokenizer's normalizer and pre-tokenizer do to them."""
    normalizer, pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
    deleted, space, isolated, plain = [], [], [], []
    for ch in _candidate_chars():
        if unicodedata.combining(ch) and not unicodedata.category(ch) == "Mn":
            continue  # a reordered mark that survives normalization: keep out of every class
        probe = "x" + ch + "x"
        norm = normalizer.normalize_str(probe) if normalizer is not None else probe
        if norm == "xx":
            deleted.append(ch)
            continue
        if unicodedata.combining(ch) or unicodedata.combining(unicodedata.normalize("NFD", ch)[0]):
            continue  # a mark, or a character decomposing into one: canonical reordering crosses it
        pieces = [p for p, _ in pre_tokenizer.pre_tokenize_str(norm)]
        if pieces == ["x", "x"] and ch in _WHITESPACE:
            space.append(ch)
        elif len(pieces) == 3 and pieces[0] == pieces[2] == "x" and len(pieces[1]) == 1:
            isolated.append(ch)
        elif len(pieces) == 1 and len(norm) >= 3:  # one or more characters (Hangul: its jamo), never a split
            plain.append(ch)
    return CharClasses("".join(deleted), "".join(space), "".join(isolated), "".join(plain))


class WordPieceCompactor:
    """Shortens a text without changing its WordPiece ids (BertNormalizer + BertPreTokenizer).

    Three rewrites, each exact by construction:

    - a run of whitespace (with deleted characters inside it) becomes one space: the pre-tokenizer
      splits on whitespace and drops it, so one space splits the same;
    - a run of deleted characters (``clean_text`` removes controls and format characters,
      ``strip_accents`` non-spacing marks) becomes one of them: the normalizer removes it either way,
      and one is enough to keep an added token such as ``[MASK]`` from matching across it;
    - plain characters (at least one normalized character each, never a split) past the first
      ``max_input_chars_per_word + 1`` of a word are dropped, with the deleted characters among them:
      the word is longer than the limit either way, so WordPiece maps it to one ``[UNK]`` either way.

    Rewrites that could create or break an added token are off when the tokenizer has added tokens
    with whitespace or deleted characters inside, or starting with a plain character.
    After it, in a text of measured characters, every pre-token yields at least one token and spans at
    most ``2 x (max_input_chars_per_word + 1)`` characters plus one space.
    """

    def __init__(self, classes: CharClasses, max_word_chars: int, added_tokens: Sequence[str] = ()) -> None:
        self.word_chars = max_word_chars + 1
        plain_set, dele_set, space_set = set(classes.plain), set(classes.deleted), set(classes.space)
        collapse = not any(set(t) & (space_set | dele_set) for t in added_tokens)
        shorten = collapse and not any(t[:1] in plain_set for t in added_tokens)
        dele, space, plain = (_code_point_class(c) for c in (classes.deleted, classes.space, classes.plain))
        known = _code_point_class(classes.deleted + classes.space + classes.plain + classes.isolated)
        alternatives = []
        if collapse and space:
            alternatives.append(f"(?P<space>[{dele}]*+[{space}][{space}{dele}]*+)" if dele else f"(?P<space>[{space}]++)")
        if collapse and dele:
            alternatives.append(f"(?P<deleted>[{dele}]++)")
        if shorten and plain:
            alternatives.append(f"(?P<plain>[{plain}]++)")
        self._runs = re.compile("|".join(alternatives)) if alternatives else None
        self._word_rest = re.compile(f"[{plain}{dele}]*+")
        self._unknown = re.compile(f"[^{known}]") if known else re.compile(".", re.S)

    def compact(self, text: str, limit: int | None) -> str:
        """``text`` rewritten as above, stopping once the output exceeds ``limit`` characters (``None``:
        the whole text). Work is linear in the characters consumed, and every regex match emits at
        least one character (the rest of a word at its limit is skipped in one match), so the
        Python-level steps are bounded by the output length."""
        if self._runs is None:
            return text if limit is None else text[: limit + 1]
        out: list[str] = []
        size = 0
        pos = 0
        word = 0  # plain characters of the current word emitted so far
        room = len(text) if limit is None else limit + 1
        while size < room:
            # Never look further than the output can still grow: a long stretch without runs costs
            # only what is copied.
            match = self._runs.search(text, pos, pos + room - size + 1)
            start, end = match.span() if match is not None else (len(text), len(text))
            if start > pos:
                take = min(start - pos, room - size)
                out.append(text[pos:pos + take])
                size += take
                word = 0  # an isolated or unmeasured character ends the count
                if size >= room:
                    break
            if match is None:
                break
            kind = match.lastgroup
            if kind == "space":
                out.append(" ")
                size += 1
                word = 0
            elif kind == "deleted":
                out.append(text[start])
                size += 1
            else:  # plain
                take = min(end - start, self.word_chars - word)
                out.append(text[start:start + take])
                size += take
                word += take
                if word >= self.word_chars:  # the rest of this word changes nothing: skip it
                    end = self._word_rest.match(text, end).end()
            pos = end
        return "".join(out)

    def all_known(self, text: str) -> bool:
        """Whether every character of ``text`` is in a measured class (the density bound then holds)."""
        return self._unknown.search(text) is None


@dataclass(frozen=True)
class CharCap:
    """How many characters of a text can matter, and how to cut a longer one without changing its ids.

    A text of at most :attr:`limit` characters is tokenized as sent. A longer one is first shrunk
    (:meth:`shrink`) and then cut at a boundary (:meth:`cut_points`) where the tokens before the cut are
    provably those of the whole text; truncation keeps ``content_tokens`` tokens, so the ids equal those
    of tokenizing the whole text and truncating.

    Why ``limit = (content_tokens + margin) x chars_per_token`` is enough, per tokenizer type:

    - **Byte-level BPE** (Qwen3): nothing is dropped; a token covers at most its decoded bytes, and
      under NFC a normalized character comes from at most ``len(NFD(c))`` original characters, so
      ``chars_per_token`` is the largest such sum over the vocabulary and the added tokens (Qwen: 128,
      a run of 128 spaces; spaces are tokens too). Any ``limit`` characters hold at least
      ``content_tokens + margin`` tokens.
    - **WordPiece** (BERT, MiniLM, BGE, E5): whitespace is dropped by the pre-tokenizer, controls by
      ``clean_text``, non-spacing marks by ``strip_accents`` (on when ``lowercase`` is), and a word longer
      than ``max_input_chars_per_word`` is one ``[UNK]``; so no per-character bound exists on the raw text.
      :class:`WordPieceCompactor` first removes what is dropped and shortens over-long words; after it
      each pre-token (at least one token) spans at most ``2 x (max_input_chars_per_word + 1) + 1``
      characters with its space, which is ``chars_per_token``. Characters are classified by running them through
      the tokenizer's own normalizer and pre-tokenizer (:func:`measure_wordpiece_classes`), not by
      this Python's Unicode tables.
    - Other tokenizers (Unigram/SentencePiece with a precompiled normalizer): no family here uses one
      yet; :func:`derive_char_cap` returns ``None`` and texts are tokenized whole.

    Where the cut falls: just before a whitespace character that follows a non-whitespace one
    (BPE: every branch of the GPT-2-style split regex of Qwen2 either is whitespace or stops at
    whitespace, so a match ends there and every pre-token before it is unchanged; also an NFC barrier),
    or just before a space or an isolated character (WordPiece: both end a pre-token and the BERT
    normalizer is per character). Only when one pre-token spans the whole look-back window (a single
    word of more than ``margin x chars_per_token`` characters) does a BPE cut fall inside it; the
    kept tokens then end at least ``margin`` tokens before the cut, relying on BPE merges not reaching
    that far back (checked on giant words, space runs, emoji and combining-mark runs in the tests).
    """

    kind: str
    content_tokens: int
    chars_per_token: int
    margin: int = CHAR_CAP_MARGIN_TOKENS
    compactor: WordPieceCompactor | None = None
    boundary: re.Pattern[str] | None = None

    @property
    def limit(self) -> int:
        return (self.content_tokens + self.margin) * self.chars_per_token

    def shrink(self, text: str) -> str:
        """At most ``limit + 1`` characters of ``text`` that tokenize like its start (WordPiece: after
        compaction; the whole compacted text when it holds unmeasured characters). Short texts are
        returned unchanged."""
        if len(text) <= self.limit:
            return text
        if self.compactor is None:
            return text[: self.limit + 1]
        compacted = self.compactor.compact(text, self.limit)
        if len(compacted) > self.limit and not self.compactor.all_known(compacted):
            return self.compactor.compact(text, None)  # no density bound: keep every token-bearing char
        return compacted

    def surely_too_long(self, text: str) -> bool:
        """Whether the (shrunk, formatted) ``text`` has more than ``content_tokens`` tokens, decided
        from its length alone (never tokenizes)."""
        if len(text) <= self.limit:
            return False
        return self.compactor is None or self.compactor.all_known(text[: self.limit + 1])

    def cut_points(self, text: str) -> Iterator[tuple[int, bool]]:
        """Prefix lengths to try for a text longer than ``limit``, shortest first, with whether each is
        at an exact boundary; the last one is at most ``limit`` and, when the text's characters are all
        measured (BPE: always), holds at least ``content_tokens + margin - 2`` tokens."""
        lookback = max(self.chars_per_token, (self.margin - 2) * self.chars_per_token)
        target = min(self.limit, FIRST_TRY_CHARS_PER_TOKEN * (self.content_tokens + self.margin))
        while True:
            point = self._boundary_before(text, target, lookback)
            yield (point, True) if point is not None else (self._fallback_point(text, target, lookback), False)
            if target >= self.limit:
                return
            target = min(self.limit, target * 4)

    def _boundary_before(self, text: str, end: int, lookback: int) -> int | None:
        found = None
        for match in self.boundary.finditer(text, max(1, end - lookback), end + 1):
            found = match.start() + (1 if self.kind == "bpe" else 0)
        return found

    def _fallback_point(self, text: str, end: int, lookback: int) -> int:
        # One pre-token spans the window: cut before a character that starts a combining sequence.
        for point in range(end, max(1, end - lookback), -1):
            if not unicodedata.combining(text[point]):
                return point
        return end


def _byte_level_decoder() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    # GPT-2's byte <-> printable mapping: the 188 printable bytes map to themselves, the others upwards.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    mapping = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + n)] = b
            n += 1
    if set(mapping) != set(alphabet):
        raise ValueError("unexpected ByteLevel alphabet")
    return mapping


#: The longest canonical decomposition of one code point (U+1FAF and others: 4), so the most original
#: characters NFC can compose into one.
MAX_CANONICAL_DECOMPOSITION = 4


def _nfc_weight(token: str) -> int:
    """Original characters that can normalize (NFC) into ``token``'s characters; a partial UTF-8
    character (decoded as U+FFFD) counts as the longest decomposition."""
    if token.isascii():
        return len(token)
    return sum(MAX_CANONICAL_DECOMPOSITION if ch == "\ufffd" else len(unicodedata.normalize("NFD", ch)) for ch in token)


def _components(node: dict | None, key: str) -> list[dict]:
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [c for child in node.get(key, []) for c in _components(child, key)]
    return [node]


def derive_char_cap(tokenizer, max_length: int) -> CharCap | None:
    """The :class:`CharCap` of a loaded ``tokenizers.Tokenizer`` truncating at ``max_length``, or
    ``None`` for a tokenizer type whose per-token character bound is not derived here (also a BPE
    split regex that is not GPT-2-style, where the whitespace boundary is not proven).

    Raises:
        ValueError: a ByteLevel alphabet other than GPT-2's (a ``tokenizers`` release that changed it).
    """
    data = json.loads(tokenizer.to_str())
    model = data["model"]
    normalizers = [n.get("type") for n in _components(data.get("normalizer"), "normalizers")]
    pre = _components(data.get("pre_tokenizer"), "pretokenizers")
    pre_types = [p.get("type") for p in pre]
    content = max(1, max_length - tokenizer.num_special_tokens_to_add(False))
    added = max((len(t["content"]) for t in data.get("added_tokens", [])), default=1)
    if model["type"] == "BPE" and "ByteLevel" in pre_types and set(normalizers) <= {"NFC"}:
        # GPT-2-style regexes (GPT-2, Qwen2, Llama 3) end in `\s+(?!\S)|\s+`; their other branches stop at whitespace.
        split_ok = all(t == "ByteLevel" or (t == "Split" and p.get("behavior") == "Isolated"
                                            and str(p.get("pattern", {}).get("Regex", "")).endswith(r"\s+(?!\S)|\s+"))
                       for t, p in zip(pre_types, pre))
        if not split_ok:
            return None
        decoder = _byte_level_decoder()
        weigh = _nfc_weight if normalizers else len
        longest = 1
        for token in model["vocab"]:
            raw = bytes(decoder[c] for c in token)
            longest = max(longest, weigh(raw.decode("utf-8", errors="replace")) if not raw.isascii() else len(raw))
        # A whitespace character right after a non-whitespace one: the Qwen2 regex ends a match there.
        boundary = re.compile(r"\S[ \t]")
        return CharCap("bpe", content, max(longest, added), boundary=boundary)
    if model["type"] == "WordPiece" and pre_types == ["BertPreTokenizer"] and set(normalizers) <= {"BertNormalizer"}:
        classes = measure_wordpiece_classes(tokenizer)
        max_word = int(model.get("max_input_chars_per_word", 100))
        compactor = WordPieceCompactor(classes, max_word, [t["content"] for t in data.get("added_tokens", [])])
        boundary = re.compile(f"[{_code_point_class(' ' + classes.isolated)}]")
        per_token = 2 * (max_word + 1) + 1
        return CharCap("wordpiece", content, max(per_token, added + 1), compactor=compactor, boundary=boundary)
    return None
