"""Deterministic random-weight Qwen3-Embedding look-alikes, built without the Hugging Face hub.

:func:`create_random_qwen3` writes a folder shaped like ``Qwen/Qwen3-Embedding-*``: a Qwen3
``config.json`` (``architectures: ["Qwen3ForCausalLM"]``), ``model.safetensors`` holding a
``Qwen3Model`` with random weights (transformers' own init, std 0.02), the offline tokenizer from
:mod:`tritonembed.export.qwen_tokenizer`, and the sentence-transformers files (prompts,
last-token pooling, normalization).

Such a model has the real compute cost and exercises the real graph, so it is good for speed and
memory measurements and for checking an export end to end. **Its embeddings mean nothing**:
``config.json`` carries ``"tritonembed_random_weights": true`` (see :func:`is_random_weights`) and
reports must say "random weights: speed and memory only, never quality".

Sizes on disk (and roughly the peak RAM while creating): ``tiny`` about 40 MB (almost all of it the
151,669 x 64 embedding); ``0.6B`` 2.4 GB in float32 / 1.2 GB in bfloat16; ``4B`` about 16 GB /
8 GB; ``8B`` about 30 GB / 15 GB. The large shapes can be created, but need that much free memory
and disk; unit tests use ``tiny`` only.

Needs torch and transformers (the ``export`` extra).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tritonembed.errors import ExportError

logger = logging.getLogger(__name__)

__all__ = [
    "QWEN3_EMBEDDING_PROMPTS",
    "QWEN3_SHAPES",
    "RANDOM_WEIGHTS_FIELD",
    "Qwen3Shape",
    "create_random_qwen3",
    "create_random_qwen3_reranker",
    "is_random_weights",
    "qwen3_config",
]

#: Field set to ``true`` in ``config.json`` of every model this module writes.
RANDOM_WEIGHTS_FIELD = "tritonembed_random_weights"

#: The prompts in Qwen3-Embedding's ``config_sentence_transformers.json``.
QWEN3_EMBEDDING_PROMPTS: dict[str, str] = {
    "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
    "document": "",
}

_VOCAB_SIZE = 151669
_BOS_EOS_ID = 151643
_SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Qwen3Shape:
    """The architecture numbers of one Qwen3(-Embedding) size."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    vocab_size: int = _VOCAB_SIZE
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6

    def parameter_count(self) -> int:
        """Parameters of the ``Qwen3Model`` (no LM head), i.e. what ``model.safetensors`` holds."""
        h, d = self.hidden_size, self.head_dim
        attention = h * self.num_attention_heads * d * 2 + h * self.num_key_value_heads * d * 2 + 2 * d
        mlp = 3 * h * self.intermediate_size
        layer = attention + mlp + 2 * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h


#: Named shapes: ``tiny`` and ``small`` for tests, the others those of Qwen3-Embedding-0.6B/4B/8B.
QWEN3_SHAPES: Mapping[str, Qwen3Shape] = {
    "tiny": Qwen3Shape(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=True,
    ),
    # Qwen3-Embedding-0.6B's width (so Matryoshka slices such as 768 and 512 are real slices) with
    # only two thin layers: serving and gateway tests.
    "small": Qwen3Shape(
        hidden_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=256,
        tie_word_embeddings=True,
    ),
    "0.6B": Qwen3Shape(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        tie_word_embeddings=True,
    ),
    "4B": Qwen3Shape(
        hidden_size=2560,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=9728,
        tie_word_embeddings=True,
    ),
    "8B": Qwen3Shape(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        tie_word_embeddings=False,
    ),
}


def _shape(shape: str) -> Qwen3Shape:
    try:
        return QWEN3_SHAPES[shape]
    except KeyError:
        raise ExportError(f"unknown Qwen3 shape {shape!r}; choose one of {sorted(QWEN3_SHAPES)}") from None


def _require_export_deps() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ExportError(
            f"creating a random Qwen3 model needs torch and transformers ({exc}); "
            "install them with: pip install 'tritonembed[export]'"
        ) from exc
    return torch, transformers


def qwen3_config(shape: str = "tiny") -> Any:
    """Return the ``transformers.Qwen3Config`` of a named shape (no weights are created).

    Raises:
        ExportError: ``shape`` is not a key of :data:`QWEN3_SHAPES`, or transformers is missing.
    """
    numbers = _shape(shape)
    _, transformers = _require_export_deps()
    fields = asdict(numbers)
    rope_theta = fields.pop("rope_theta")
    return transformers.Qwen3Config(
        **fields,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=numbers.num_hidden_layers,
        bos_token_id=_BOS_EOS_ID,
        eos_token_id=_BOS_EOS_ID,
        use_cache=True,
    )


def is_random_weights(directory: Path) -> bool:
    """Whether ``directory/config.json`` marks the model as random-weight (made by this module).

    A missing or unreadable ``config.json`` counts as not random.
    """
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get(RANDOM_WEIGHTS_FIELD) is True


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_sentence_transformers_files(directory: Path, hidden_size: int) -> None:
    _write_json(
        directory / "config_sentence_transformers.json",
        {"prompts": dict(QWEN3_EMBEDDING_PROMPTS), "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )
    _write_json(
        directory / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    (directory / "1_Pooling").mkdir(exist_ok=True)
    _write_json(
        directory / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        },
    )
    (directory / "2_Normalize").mkdir(exist_ok=True)


def create_random_qwen3(
    directory: Path,
    shape: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight Qwen3-Embedding look-alike into ``directory``.

    The folder gets ``config.json`` (``Qwen3ForCausalLM``, ``model_type`` ``qwen3``, marked with
    ``"tritonembed_random_weights": true``), ``model.safetensors`` (a ``Qwen3Model`` state dict:
    keys without the ``model.`` prefix, no LM head, like Qwen3-Embedding), the tokenizer files,
    and ``config_sentence_transformers.json`` / ``modules.json`` / ``1_Pooling`` / ``2_Normalize``
    as in Qwen3-Embedding. ``transformers.AutoModel.from_pretrained(directory)`` loads it as a
    ``Qwen3Model`` and ``sentence_transformers.SentenceTransformer(directory)`` as an embedder.

    The same ``shape``, ``seed`` and ``dtype`` give byte-identical weights (transformers' own init,
    normal with std 0.02, under ``torch.manual_seed(seed)``; the global RNG state is restored after).

    Memory: the model is materialized in RAM in ``dtype``: see the module docstring for sizes
    (``4B``/``8B`` in float32 need 16-32 GB). Existing files of the same names are overwritten.

    Args:
        directory: Output folder, created if missing.
        shape: A key of :data:`QWEN3_SHAPES`.
        seed: Seed of the weight initialization.
        dtype: ``float32``, ``float16`` or ``bfloat16``.

    Returns:
        ``directory``.

    Raises:
        ExportError: Unknown shape or dtype, torch/transformers missing, the tokenizer cannot be
            built (see :func:`tritonembed.export.qwen_tokenizer.save_qwen3_tokenizer`), or the
            files cannot be written.
    """
    from tritonembed.export.qwen_tokenizer import save_qwen3_tokenizer

    numbers = _shape(shape)
    if dtype not in _SUPPORTED_DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose one of {list(_SUPPORTED_DTYPES)}")
    torch, transformers = _require_export_deps()
    directory = Path(directory)
    config = qwen3_config(shape)
    torch_dtype = getattr(torch, dtype)
    size_gb = numbers.parameter_count() * torch.tensor([], dtype=torch_dtype).element_size() / 1e9
    logger.info(
        "creating a random-weight Qwen3 %s model (%.2f GB of %s weights) in %s", shape, size_gb, dtype, directory
    )

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {directory}: {exc}") from exc

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3Model._from_config(config, dtype=torch_dtype)
    model.eval()
    try:
        model.save_pretrained(directory, safe_serialization=True)
    except OSError as exc:
        raise ExportError(f"cannot write the model weights to {directory}: {exc}") from exc
    finally:
        del model

    config_path = directory / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    saved["architectures"] = ["Qwen3ForCausalLM"]
    # Qwen3-Embedding's config.json spells these the transformers-4.x way; keep both for older readers.
    saved["rope_theta"] = numbers.rope_theta
    saved.setdefault("rope_scaling", None)
    saved["torch_dtype"] = dtype
    saved[RANDOM_WEIGHTS_FIELD] = True
    saved["tritonembed_random_shape"] = shape
    saved["tritonembed_random_seed"] = seed
    try:
        _write_json(config_path, dict(sorted(saved.items())))
        _write_sentence_transformers_files(directory, numbers.hidden_size)
    except OSError as exc:
        raise ExportError(f"cannot write the model files to {directory}: {exc}") from exc
    save_qwen3_tokenizer(directory, model_max_length=numbers.max_position_embeddings)
    return directory


def create_random_qwen3_reranker(directory: Path, shape: str = "tiny", seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Write a random-weight Qwen3-Reranker look-alike into ``directory``.

    As the released Qwen3-Reranker checkpoints: a ``Qwen3ForCausalLM`` (``model.``-prefixed weights and the
    LM head, tied to the input embedding where the shape ties them, as in the 0.6B), the plain Qwen3
    tokenizer (no EOS post-processor) and no sentence-transformers files. ``config.json`` is marked with
    ``"tritonembed_random_weights": true`` and ``"tritonembed_random_task": "rerank"``.

    Raises:
        ExportError: unknown shape or dtype, torch/transformers missing, or the files cannot be written.
    """
    from tritonembed.export.qwen_tokenizer import save_qwen3_tokenizer

    numbers = _shape(shape)
    if dtype not in _SUPPORTED_DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose one of {list(_SUPPORTED_DTYPES)}")
    torch, transformers = _require_export_deps()
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {directory}: {exc}") from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3ForCausalLM._from_config(qwen3_config(shape), dtype=getattr(torch, dtype))
    model.eval()
    try:
        model.save_pretrained(directory, safe_serialization=True)
    except OSError as exc:
        raise ExportError(f"cannot write the model weights to {directory}: {exc}") from exc
    finally:
        del model
    config_path = directory / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    saved.update({"architectures": ["Qwen3ForCausalLM"], "rope_theta": numbers.rope_theta, "torch_dtype": dtype,
                  RANDOM_WEIGHTS_FIELD: True, "tritonembed_random_shape": shape, "tritonembed_random_seed": seed,
                  "tritonembed_random_task": "rerank"})
    saved.setdefault("rope_scaling", None)
    save_qwen3_tokenizer(directory, model_max_length=numbers.max_position_embeddings)
    try:
        _write_json(config_path, dict(sorted(saved.items())))
        # the reranker's tokenizer appends nothing: its prompt ends with the assistant turn's opening
        tokenizer_path = directory / "tokenizer.json"
        tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
        tokenizer["post_processor"] = None
        tokenizer_path.write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False), encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"cannot write the model files to {directory}: {exc}") from exc
    return directory
