"""Model families as declarations.

Each family says which checkpoints it handles, how it pools, what it defaults to, the tolerance its
export is validated with, and how its *reference* embeddings are computed (the upstream usage code,
independent of our ONNX wrapper). Adding a family = one class here + one test.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tritonembed.errors import ExportError, UnsupportedModelError
from tritonembed.spec import ModelSpec

log = logging.getLogger(__name__)


def served_name(options_name: str | None, model_id: str) -> str:
    """The Triton model name: the user's ``--name`` or the id's last part, limited to [A-Za-z0-9._-]."""
    raw = options_name or model_id.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "-", raw)


def read_json(path: Path) -> dict[str, Any]:
    """Raises: ExportError for a missing or corrupt JSON file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ExportError(f"missing file {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"corrupt JSON in {path}: {exc}") from exc


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked for; ``None`` means the family's default."""

    precision: str = "fp32"
    max_length: int | None = None
    name: str | None = None


class ModelFamily(ABC):
    """Declaration of one model family."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    pooling: ClassVar[str]
    padding_side: ClassVar[str]
    # FP32 export tolerance against the PyTorch reference.
    fp32_atol: ClassVar[float] = 1e-4
    fp32_min_cosine: ClassVar[float] = 0.99999
    # Padding layouts under which the graph must give the reference answer. Absolute position
    # embeddings (BERT) make left padding wrong; rotary ones (Qwen3) are shift-invariant.
    padding_layouts: ClassVar[tuple[str, ...]] = ("right",)
    # How the exported graph computes attention (:data:`tritonembed.export.onnx_export.ATTENTION_FORMS`):
    # "unfused" is the traced MatMul -> Softmax -> MatMul (memory grows with length squared); "gqa" one
    # GroupQueryAttention node per layer (:mod:`tritonembed.export.attention`, memory linear in length); "mha"
    # the traced graph rewritten into one MultiHeadAttention per layer (:mod:`tritonembed.export.bert_attention`).
    attention: ClassVar[str] = "unfused"
    # A causal decoder backbone (declared, never inferred from the pooling).
    decoder: ClassVar[bool] = False
    task: ClassVar[str] = "embed"

    @classmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") in cls.model_types

    @abstractmethod
    def make_spec(self, path: Path, model_id: str, config: dict[str, Any], options: ExportOptions) -> ModelSpec:
        """The served spec of this checkpoint."""

    @abstractmethod
    def reference_embed(self, path: Path, texts: Sequence[str], spec: ModelSpec) -> np.ndarray:
        """Embeddings from the upstream usage code (normalized), for validation."""

    def load_backbone(self, path: Path):
        import torch
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
        except Exception as exc:  # transformers/safetensors raise OSError, ValueError, SafetensorError, ...
            raise ExportError(f"cannot load weights from {path}: {type(exc).__name__}: {exc}") from exc
        return model.eval()

    def tokenizer_json(self, path: Path) -> Path:
        """Raises: ExportError when the checkpoint has no fast-tokenizer file."""
        candidate = Path(path) / "tokenizer.json"
        if not candidate.is_file():
            raise ExportError(f"{path} has no tokenizer.json (a fast tokenizer is required)")
        return candidate

    def is_random_weights(self, config: dict[str, Any]) -> bool:
        return bool(config.get("tritonembed_random_weights", False))


class Qwen3Family(ModelFamily):
    """Qwen3-Embedding: last-token pooling, left padding, EOS appended, instruction template, MRL."""

    name = "qwen3"
    model_types = ("qwen3",)
    pooling = "last_token"
    padding_side = "left"
    padding_layouts = ("left", "right", "mixed")
    fp32_atol = 1e-4
    attention = "gqa"
    decoder = True
    EOS_ID = 151643
    DEFAULT_MAX_LENGTH = 8192
    MAX_SUPPORTED_LENGTH = 32768
    MIN_DIMENSIONS = 32
    QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:{text}"
    DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

    def make_spec(self, path: Path, model_id: str, config: dict[str, Any], options: ExportOptions) -> ModelSpec:
        max_length = options.max_length or self.DEFAULT_MAX_LENGTH
        limit = min(self.MAX_SUPPORTED_LENGTH, int(config.get("max_position_embeddings", self.MAX_SUPPORTED_LENGTH)))
        if max_length > limit:
            raise ExportError(f"--max-length {max_length} exceeds this model's limit of {limit}")
        return ModelSpec(
            name=served_name(options.name, model_id),
            model_id=model_id,
            family=self.name,
            pooling=self.pooling,
            normalize=True,
            hidden_size=int(config["hidden_size"]),
            max_length=max_length,
            padding_side=self.padding_side,
            pad_token_id=self.EOS_ID,
            precision=options.precision,
            matryoshka=True,
            min_dimensions=min(self.MIN_DIMENSIONS, int(config["hidden_size"])),
            query_template=self.QUERY_TEMPLATE,
            document_template="{text}",
            default_query_instruction=self.DEFAULT_INSTRUCTION,
            append_eos=True,
            extra={"random_weights": self.is_random_weights(config)},
            task=Qwen3Family.task,  # the reranker builds on this embedding spec
            decoder=self.decoder,
        )

    def reference_embed(self, path: Path, texts: Sequence[str], spec: ModelSpec) -> np.ndarray:
        """The usage code from the Qwen3-Embedding model card (transformers), verbatim in spirit."""
        import torch
        import torch.nn.functional as F
        from transformers import AutoTokenizer

        def last_token_pool(last_hidden_states, attention_mask):
            left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
            if left_padding:
                return last_hidden_states[:, -1]
            sequence_lengths = attention_mask.sum(dim=1) - 1
            batch_size = last_hidden_states.shape[0]
            return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]

        from tritonembed.export.checkpoint_tensors import has_safetensors
        from tritonembed.export.streamed_model import streamed_qwen3_backbone

        tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side="left")
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")
        with torch.no_grad():
            if has_safetensors(path):
                # the same Qwen3Model as load_backbone gives, bit for bit, holding one block's weights at a
                # time instead of a float32 copy of the whole model
                with streamed_qwen3_backbone(path) as model:
                    outputs = model(**batch)
            else:
                outputs = self.load_backbone(path)(**batch)
        emb = last_token_pool(outputs.last_hidden_state, batch["attention_mask"])
        return F.normalize(emb, p=2, dim=1).numpy()


class Qwen3RerankerFamily(Qwen3Family):
    """Qwen3-Reranker: a Qwen3ForCausalLM whose score is the last position's ``yes`` minus ``no`` logit.

    The prompt is the model card's (prefix, body, suffix; the body truncated first); the plain Qwen3
    tokenizer appends nothing. The reference is the model card's usage code (:mod:`tritonembed.export.rerank`).
    """

    name = "qwen3-reranker"
    task = "rerank"
    # validated on P(yes) = sigmoid(score), the number the official code returns
    fp32_atol = 1e-4
    PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
              "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
    BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    YES, NO = "yes", "no"

    def make_spec(self, path: Path, model_id: str, config: dict[str, Any], options: ExportOptions) -> ModelSpec:
        from tritonembed.spec import OutputSpec

        base = super().make_spec(path, model_id, config, options)
        return dataclasses.replace(
            base, task="rerank", outputs=(OutputSpec("yes_no_logit", (1,)),), normalize=False, matryoshka=False,
            min_dimensions=None, query_template="{text}", append_eos=False, pair_prefix=self.PREFIX,
            pair_template=self.BODY, pair_suffix=self.SUFFIX, default_query_instruction=self.DEFAULT_INSTRUCTION)

    def load_backbone(self, path: Path):
        """The ``Qwen3Model`` of the causal LM, carrying ``lm_head[yes] - lm_head[no]`` as a buffer.

        Raises:
            ExportError: the weights cannot be loaded, or ``yes`` / ``no`` are not single tokens.
        """
        import torch
        from transformers import AutoModelForCausalLM

        from tritonembed.export.heads import YES_NO_DIRECTION

        ids = self.yes_no_ids(path)
        try:
            lm = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
        except Exception as exc:  # transformers/safetensors raise OSError, ValueError, SafetensorError, ...
            raise ExportError(f"cannot load weights from {path}: {type(exc).__name__}: {exc}") from exc
        weight = lm.get_output_embeddings().weight.detach()
        backbone = lm.model.eval()
        backbone.register_buffer(YES_NO_DIRECTION, (weight[ids[0]] - weight[ids[1]]).clone(), persistent=False)
        return backbone

    def yes_no_ids(self, path: Path) -> tuple[int, int]:
        """Raises: ExportError when ``yes`` or ``no`` is not one token of this tokenizer."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.tokenizer_json(path)))
        ids = (tok.token_to_id(self.YES), tok.token_to_id(self.NO))
        if None in ids:
            raise ExportError(f"the tokenizer of {path} has no single token for 'yes' / 'no'")
        return ids  # type: ignore[return-value]

    def reference_embed(self, path: Path, texts: Sequence[str], spec: ModelSpec) -> np.ndarray:
        raise ExportError("a reranker has no embeddings; its reference is tritonembed.export.rerank.official_scores")


class BertLikeFamily(ModelFamily):
    """sentence-transformers models on BERT-like encoders (MiniLM, BGE, E5): mean or CLS pooling."""

    name = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra")
    pooling = "mean"
    padding_side = "right"
    fp32_atol = 1e-5
    attention = "mha"

    @staticmethod
    def read_pooling(path: Path) -> str:
        """Pooling mode from ``modules.json`` / ``1_Pooling/config.json`` (mean when absent).

        Raises:
            ExportError: an unsupported pooling mode (max, weighted, ...).
        """
        modules_file = Path(path) / "modules.json"
        pooling_dir = "1_Pooling"
        if modules_file.is_file():
            for module in read_json(modules_file):
                if module.get("type", "").endswith("Pooling"):
                    pooling_dir = module.get("path", pooling_dir)
        cfg_file = Path(path) / pooling_dir / "config.json"
        if not cfg_file.is_file():
            log.warning("%s has no pooling config; assuming mean pooling", path)
            return "mean"
        cfg = read_json(cfg_file)
        modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
        mapping = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
        if len(modes) != 1 or modes[0] not in mapping:
            raise ExportError(f"unsupported pooling {modes} in {cfg_file}; supported: mean, cls")
        return mapping[modes[0]]

    def make_spec(self, path: Path, model_id: str, config: dict[str, Any], options: ExportOptions) -> ModelSpec:
        limit = int(config.get("max_position_embeddings", 512))
        if config.get("model_type") in ("roberta", "xlm-roberta"):
            limit -= 2  # position ids start after the padding index
        st_cfg_file = Path(path) / "sentence_bert_config.json"
        default = int(read_json(st_cfg_file).get("max_seq_length", limit)) if st_cfg_file.is_file() else limit
        max_length = options.max_length or min(default, limit)
        if max_length > limit:
            raise ExportError(f"--max-length {max_length} exceeds this model's limit of {limit}")
        prompts: dict[str, str] = {}
        st_prompts = Path(path) / "config_sentence_transformers.json"
        if st_prompts.is_file():
            prompts = read_json(st_prompts).get("prompts") or {}
        query_prefix = prompts.get("query", "")
        return ModelSpec(
            name=served_name(options.name, model_id),
            model_id=model_id,
            family=self.name,
            pooling=self.read_pooling(path),
            normalize=True,
            hidden_size=int(config["hidden_size"]),
            max_length=max_length,
            padding_side=self.padding_side,
            pad_token_id=int(config.get("pad_token_id") or 0),
            precision=options.precision,
            matryoshka=False,
            min_dimensions=None,
            # sentence-transformers prompts are plain prefixes; {instruction} is not used by them.
            query_template=(query_prefix + "{text}") if query_prefix else "{text}",
            document_template=prompts.get("document", prompts.get("passage", "")) + "{text}",
            default_query_instruction="query" if query_prefix else "",
            append_eos=False,
            extra={"random_weights": self.is_random_weights(config)},
            task=self.task,
            decoder=self.decoder,
        )

    def reference_embed(self, path: Path, texts: Sequence[str], spec: ModelSpec) -> np.ndarray:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device="cpu")
        model.max_seq_length = spec.max_length
        return np.asarray(model.encode(list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True))


FAMILIES: tuple[ModelFamily, ...] = (Qwen3Family(), Qwen3RerankerFamily(), BertLikeFamily())


def family_for(config: dict[str, Any], task: str = "embed") -> ModelFamily:
    """The declared family handling this ``config.json`` for ``task``.

    Raises:
        UnsupportedModelError: no family matches; the message lists the supported ones.
    """
    for family in FAMILIES:
        if family.task == task and family.matches(config):
            return family
    supported = "; ".join(f"{f.name} ({f.task}; model_type in {', '.join(f.model_types)})" for f in FAMILIES)
    raise UnsupportedModelError(
        f"unsupported architecture {config.get('architectures')} (model_type {config.get('model_type')!r}); "
        f"supported families: {supported}"
    )


def family_by_name(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModelError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
