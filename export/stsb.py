"""STS-B quality measurement: Spearman correlation of cosine similarity with gold scores.

The data are the STS-B dev sets of ``stsb-multi-mt`` (``stsb-{lang}-dev.csv``: sentence1, sentence2,
score 0-5, no header). They live in the shared data folder beside the repository root
(``../shared/data/stsb/``) or wherever ``TRITONEMBED_STSB_DIR`` points.

This module needs numpy; :func:`onnx_embedder` also needs onnxruntime and tokenizers (imported lazily).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonembed.errors import TritonEmbedError
from tritonembed.spec import ATTENTION_MASK, INPUT_IDS

logger = logging.getLogger(__name__)

STSB_DIR_ENV = "TRITONEMBED_STSB_DIR"
# export/stsb.py -> repository root -> its parent holds shared/
DEFAULT_STSB_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsb"

Embedder = Callable[[list[str]], np.ndarray]


class StsbDataError(TritonEmbedError, FileNotFoundError):
    """The STS-B file is missing or malformed."""


@dataclass(frozen=True)
class StsPair:
    """One STS-B pair: two sentences and a gold similarity score in [0, 5]."""

    sentence1: str
    sentence2: str
    score: float


def stsb_file(lang: str = "en", path: Path | None = None) -> Path:
    """Locate ``stsb-{lang}-dev.csv``.

    ``path`` may be the CSV itself or its folder. Without it, ``$TRITONEMBED_STSB_DIR`` is tried, then
    ``../shared/data/stsb/`` beside the repository root.

    Raises:
        StsbDataError: no such file.
    """
    name = f"stsb-{lang}-dev.csv"
    if path is not None:
        candidates = [Path(path) if Path(path).suffix == ".csv" else Path(path) / name]
    else:
        candidates = []
        if os.environ.get(STSB_DIR_ENV):
            candidates.append(Path(os.environ[STSB_DIR_ENV]) / name)
        candidates.append(DEFAULT_STSB_DIR / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise StsbDataError(
        f"STS-B data for lang={lang!r} not found (tried: {tried}). Put stsb-{lang}-dev.csv from "
        f"stsb-multi-mt there, pass path=..., or set {STSB_DIR_ENV} to its folder."
    )


def load_stsb(lang: str = "en", path: Path | None = None) -> list[StsPair]:
    """Read the STS-B dev pairs for ``lang`` (``en``, ``zh``) in file order.

    Raises:
        StsbDataError: the file is missing, a row does not have three fields, a score is not a number
            in [0, 5], or the file holds no pairs.
    """
    csv_path = stsb_file(lang, path)
    pairs: list[StsPair] = []
    with csv_path.open(newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row:
                continue
            if len(row) != 3:
                raise StsbDataError(f"{csv_path}:{lineno}: expected 3 fields (s1, s2, score), got {len(row)}")
            try:
                score = float(row[2])
            except ValueError:
                if lineno == 1:  # tolerate a header row
                    continue
                raise StsbDataError(f"{csv_path}:{lineno}: score {row[2]!r} is not a number") from None
            if not 0.0 <= score <= 5.0:
                raise StsbDataError(f"{csv_path}:{lineno}: score {score} outside [0, 5]")
            pairs.append(StsPair(row[0], row[1], score))
    if not pairs:
        raise StsbDataError(f"{csv_path}: no STS-B pairs")
    return pairs


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; ties get the mean of the ranks they span (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation in [-1, 1] (Pearson correlation of average ranks).

    Raises:
        ValueError: different lengths, fewer than two points, or a constant input.
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"spearman needs two equal-length inputs of >= 2 points, got {a.size} and {b.size}")
    ra = _average_ranks(a) - (a.size + 1) / 2.0
    rb = _average_ranks(b) - (b.size + 1) / 2.0
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    if denom == 0.0:
        raise ValueError("spearman is undefined for a constant input")
    return float((ra * rb).sum() / denom)


def embed_texts(embed: Embedder, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embed ``texts`` in batches of similar length (less padding) and return rows in input order."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    unique = list(dict.fromkeys(texts))
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    rows: dict[str, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        batch = [unique[i] for i in order[start : start + batch_size]]
        out = np.asarray(embed(batch), dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise ValueError(f"embed returned shape {out.shape} for a batch of {len(batch)} texts")
        rows.update(zip(batch, out))
    return np.stack([rows[t] for t in texts])


def cosine_scores(embed: Embedder, pairs: Sequence[StsPair], batch_size: int = 64) -> np.ndarray:
    """Cosine similarity of each pair's two embeddings (embeddings need not be normalized)."""
    n = len(pairs)
    emb = embed_texts(embed, [p.sentence1 for p in pairs] + [p.sentence2 for p in pairs], batch_size)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return np.einsum("ij,ij->i", emb[:n], emb[n:])


def spearman_for(embed: Embedder, pairs: Sequence[StsPair], batch_size: int = 64) -> float:
    """STS-B score: Spearman correlation x 100 of cosine(emb(s1), emb(s2)) with the gold scores.

    Raises:
        ValueError: fewer than two pairs, or ``embed`` returned a wrongly shaped array.
    """
    if len(pairs) < 2:
        raise ValueError("spearman_for needs at least two pairs")
    return 100.0 * spearman(cosine_scores(embed, pairs, batch_size), [p.score for p in pairs])


def onnx_embedder(
    model_path: Path | str,
    tokenizer_json_path: Path | str,
    max_length: int,
    padding_side: str = "right",
    *,
    pad_id: int | None = None,
    providers: Sequence[str] | None = None,
    intra_op_num_threads: int | None = None,
    session: Any | None = None,
) -> Embedder:
    """Build ``embed(texts) -> float32 [n, hidden]`` from an encoder ONNX model and a ``tokenizer.json``.

    Each call tokenizes the batch (truncation to ``max_length``, padding to the longest row on
    ``padding_side``) and runs the graph's ``input_ids``/``attention_mask`` -> first output. The pad id
    is ``pad_id``, else the tokenizer's own padding config, else 0. Pass ``session`` to reuse an
    ``onnxruntime.InferenceSession``.

    Raises:
        ImportError: onnxruntime or tokenizers missing (``pip install 'tritonembed[export]'``).
        ValueError: bad ``padding_side`` or ``max_length``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_length <= 0:
        raise ValueError("max_length must be positive")
    try:
        import onnxruntime as ort
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"onnx_embedder needs onnxruntime and tokenizers: pip install 'tritonembed[export]' ({exc})") from exc

    tokenizer = Tokenizer.from_file(str(tokenizer_json_path))
    if pad_id is None:
        pad_id = int(tokenizer.padding["pad_id"]) if tokenizer.padding else 0
    pad_token = tokenizer.id_to_token(pad_id) or "[PAD]"
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(direction=padding_side, pad_id=pad_id, pad_token=pad_token)

    if session is None:
        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        session = ort.InferenceSession(
            str(model_path), options, providers=list(providers or ["CPUExecutionProvider"])
        )
    output_name = session.get_outputs()[0].name

    def embed(texts: list[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch(list(texts))
        feeds = {
            INPUT_IDS.name: np.array([e.ids for e in encodings], dtype=np.int64),
            ATTENTION_MASK.name: np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        return np.asarray(session.run([output_name], feeds)[0], dtype=np.float32)

    return embed
