"""The tensor contract and the model spec: the single source of truth.

`tritonembed export` writes a :class:`ModelSpec` as ``tritonembed.json`` next to ``model.onnx``.
The Triton tokenizer model, the generated ``config.pbtxt`` files, the client and the gateway all
read it; none of them keeps its own copy of tensor names, dtypes, sizes or templates.

This module imports only the standard library so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonembed.errors import SpecError
from tritonembed.precisions import precision

SPEC_FILENAME = "tritonembed.json"
SPEC_SCHEMA_VERSION = 2
#: Schema 1 (one implicit embedding output, no task) still loads, as task ``embed``.
READABLE_SCHEMA_VERSIONS = (1, 2)

# Triton datatype name -> numpy dtype name. BYTES is numpy object (bytes).
TRITON_TO_NUMPY = {
    "BOOL": "bool",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "BYTES": "object",
}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor. ``dims`` excludes the batch dimension; -1 marks a dynamic axis."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_TO_NUMPY:
            raise SpecError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}")

    @property
    def config_dtype(self) -> str:
        """The ``data_type`` spelling of ``config.pbtxt`` (``TYPE_INT64``, ``TYPE_STRING`` for BYTES)."""
        return "TYPE_STRING" if self.dtype == "BYTES" else f"TYPE_{self.dtype}"

    @property
    def numpy_dtype(self) -> str:
        return TRITON_TO_NUMPY[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims), "optional": self.optional}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(int(d) for d in data["dims"]), bool(data.get("optional", False)))


# --- The served interface (ensemble), identical for every model -------------------------------
# One request carries a batch of texts: TEXT has shape [n, 1]. INSTRUCTION (optional, [n, 1]) turns a
# row into a query formatted with the model's query template; TRUNCATE (optional, [n, 1]) set to False
# makes an over-long row fail its request instead of being cut.
TEXT = TensorSpec("TEXT", "BYTES", (1,))
INSTRUCTION = TensorSpec("INSTRUCTION", "BYTES", (1,), optional=True)
TRUNCATE = TensorSpec("TRUNCATE", "BOOL", (1,), optional=True)
TOKEN_COUNT = TensorSpec("TOKEN_COUNT", "INT32", (1,))
EMBEDDING_OUTPUT_NAME = "EMBEDDING"
# A reranker's ensemble: one (query, document) pair per row, an optional INSTRUCTION -> SCORE (a logit).
QUERY = TensorSpec("QUERY", "BYTES", (1,))
DOCUMENT = TensorSpec("DOCUMENT", "BYTES", (1,))
SCORE_OUTPUT_NAME = "SCORE"

# --- The encoder (ONNX graph) interface --------------------------------------------------------
INPUT_IDS = TensorSpec("input_ids", "INT64", (-1,))
ATTENTION_MASK = TensorSpec("attention_mask", "INT64", (-1,))
ENCODER_EMBEDDING_NAME = "embedding"
ENCODER_SCORE_NAME = "score"

# Names of the three models that serve one embedding model NAME.
TOKENIZER_SUFFIX = "_tokenizer"
ENCODER_SUFFIX = "_encoder"

# Key under which the ensemble's config.pbtxt publishes the spec (as JSON) in its `parameters`.
SPEC_PARAMETER_KEY = "tritonembed_spec"

#: What an int4 model computes in between its 4-bit weights: float32 (CPU) or float16 (GPU).
INT4_ACTIVATIONS = ("float32", "float16")
#: How one row's vector is taken from the backbone's hidden states (torch code: tritonembed.export.heads).
POOLINGS = ("last_token", "mean", "cls")
#: What a served model does: ``embed`` (texts -> vectors) or ``rerank`` (query, document -> relevance score).
TASKS = ("embed", "rerank")


@dataclass(frozen=True)
class HeadSpec:
    """A declared head: what the encoder computes from a pooled row, under which names, for which task.

    ``width`` is ``"hidden"`` (one value per hidden unit) or ``"scalar"`` (one value per row).
    """

    name: str
    task: str
    output_name: str
    encoder_name: str
    width: str


# The heads the stack serves; the torch side of each is in tritonembed.export.heads under the same name.
HEADS: dict[str, HeadSpec] = {h.name: h for h in (
    HeadSpec("embedding", "embed", EMBEDDING_OUTPUT_NAME, ENCODER_EMBEDDING_NAME, "hidden"),
    # Qwen3-Reranker: the pooled row times (lm_head[yes] - lm_head[no]); sigmoid(score) = P(yes)
    HeadSpec("yes_no_logit", "rerank", SCORE_OUTPUT_NAME, ENCODER_SCORE_NAME, "scalar"),
)}


@dataclass(frozen=True)
class OutputSpec:
    """One declared output of a served model: the head computing it and its per-row dims."""

    head: str
    dims: tuple[int, ...]
    dtype: str = "FP32"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise SpecError(f"output head {self.head!r} is not one of {tuple(HEADS)}")

    @property
    def name(self) -> str:
        """The ensemble's (served) tensor name."""
        return HEADS[self.head].output_name

    @property
    def encoder_name(self) -> str:
        """The ONNX graph's tensor name."""
        return HEADS[self.head].encoder_name

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "dims": list(self.dims), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputSpec:
        return cls(data["head"], tuple(int(d) for d in data["dims"]), data.get("dtype", "FP32"))


def default_outputs(task: str, hidden_size: int) -> tuple[OutputSpec, ...]:
    """The outputs a task serves unless a family declares others."""
    heads = [h for h in HEADS.values() if h.task == task]
    return tuple(OutputSpec(h.name, (hidden_size,) if h.width == "hidden" else (1,)) for h in heads[:1])


def ensemble_inputs() -> tuple[TensorSpec, ...]:
    return (TEXT, INSTRUCTION, TRUNCATE)


def rerank_inputs() -> tuple[TensorSpec, ...]:
    return (QUERY, DOCUMENT, INSTRUCTION, TRUNCATE)


def encoder_inputs() -> tuple[TensorSpec, ...]:
    return (INPUT_IDS, ATTENTION_MASK)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the serving stack must know about one exported model.

    ``task`` and ``outputs`` say what it serves (``outputs`` empty means the task's default outputs);
    ``decoder`` declares a causal decoder backbone (Qwen3) as opposed to a bidirectional encoder (BERT).
    ``min_dimensions``..``hidden_size`` is the Matryoshka range a client may slice to; for a model
    without Matryoshka training ``matryoshka`` is False and only ``hidden_size`` is allowed unless the
    user forces slicing.
    """

    name: str
    model_id: str
    family: str
    pooling: str
    normalize: bool
    hidden_size: int
    max_length: int
    padding_side: str
    pad_token_id: int
    precision: str
    matryoshka: bool = False
    min_dimensions: int | None = None
    query_template: str = "{text}"
    document_template: str = "{text}"
    default_query_instruction: str = ""
    append_eos: bool = False
    onnx_file: str = "model.onnx"
    tokenizer_file: str = "tokenizer.json"
    schema_version: int = SPEC_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    task: str = "embed"
    outputs: tuple[OutputSpec, ...] = ()
    decoder: bool = False
    # rerank: token ids of pair_prefix + body + pair_suffix, the body (pair_template with {instruction},
    # {query}, {document}) truncated first so that the whole fits max_length
    pair_prefix: str = ""
    pair_template: str = ""
    pair_suffix: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SpecError(f"task {self.task!r} is not one of {TASKS}")
        if not self.outputs:
            object.__setattr__(self, "outputs", default_outputs(self.task, self.hidden_size))
        wrong = [o.head for o in self.outputs if HEADS[o.head].task != self.task]
        if wrong:
            raise SpecError(f"outputs {wrong} do not belong to task {self.task!r}")
        if self.task == "rerank" and not ("{query}" in self.pair_template and "{document}" in self.pair_template):
            raise SpecError("a reranker's pair_template must contain '{query}' and '{document}'")
        if self.pooling not in POOLINGS:
            raise SpecError(f"pooling {self.pooling!r} is not one of {POOLINGS}")
        precision(self.precision)  # SpecError when it is not one
        if self.padding_side not in ("left", "right"):
            raise SpecError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.hidden_size <= 0 or self.max_length <= 0:
            raise SpecError("hidden_size and max_length must be positive")
        if self.min_dimensions is not None and not 1 <= self.min_dimensions <= self.hidden_size:
            raise SpecError(f"min_dimensions {self.min_dimensions} outside 1..{self.hidden_size}")
        if "{text}" not in self.query_template or "{text}" not in self.document_template:
            raise SpecError("query_template and document_template must contain '{text}'")

    # --- derived contract -------------------------------------------------------------------
    @property
    def encoder_outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(o.encoder_name, o.dtype, o.dims) for o in self.outputs)

    @property
    def ensemble_outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(o.name, o.dtype, o.dims) for o in self.outputs) + (TOKEN_COUNT,)

    def output(self, head: str) -> OutputSpec:
        """The declared output computed by ``head``.

        Raises:
            SpecError: this model declares no such output.
        """
        for out in self.outputs:
            if out.head == head:
                return out
        raise SpecError(f"model {self.name!r} ({self.task}) has no {head!r} output; it serves {[o.head for o in self.outputs]}")

    @property
    def tokenizer_model_name(self) -> str:
        return self.name + TOKENIZER_SUFFIX

    @property
    def encoder_model_name(self) -> str:
        return self.name + ENCODER_SUFFIX

    @property
    def dimension_range(self) -> tuple[int, int]:
        """Smallest and largest output dimension a client may ask for without forcing."""
        if self.matryoshka and self.min_dimensions is not None:
            return (self.min_dimensions, self.hidden_size)
        return (self.hidden_size, self.hidden_size)

    @property
    def serving_inputs(self) -> tuple[TensorSpec, ...]:
        """The ensemble's inputs for this model's task."""
        return rerank_inputs() if self.task == "rerank" else ensemble_inputs()

    def format_pair(self, query: str, document: str, instruction: str | None) -> str:
        """A reranker's body (without prefix and suffix); an empty instruction means the default one."""
        values = {"instruction": instruction or self.default_query_instruction, "query": query, "document": document}
        # one pass over the template, as str.format does: braces inside the texts are never fields
        return re.sub(r"\{(instruction|query|document)\}", lambda m: values[m.group(1)], self.pair_template)

    def format_text(self, text: str, instruction: str | None) -> str:
        """Apply the query template when ``instruction`` is non-empty, else the document template."""
        if instruction:
            return self.query_template.replace("{instruction}", instruction).replace("{text}", text)
        return self.document_template.replace("{text}", text)

    # --- (de)serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["outputs"] = [o.to_dict() for o in self.outputs]
        data["encoder_inputs"] = [t.to_dict() for t in encoder_inputs()]
        data["encoder_outputs"] = [t.to_dict() for t in self.encoder_outputs]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Build a spec from its dict form.

        Raises:
            SpecError: unknown schema version, missing or invalid fields, or tensor names that
                disagree with this version's contract.
        """
        if data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
            raise SpecError(f"unsupported spec schema_version {data.get('schema_version')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if data["schema_version"] == 1:
            # schema 1 had one embedding output and inferred a decoder from last-token pooling
            kwargs.update(schema_version=SPEC_SCHEMA_VERSION, task="embed", outputs=(),
                          decoder=data.get("pooling") == "last_token")
        try:
            kwargs["outputs"] = tuple(OutputSpec.from_dict(o) for o in kwargs.get("outputs", ()))
            spec = cls(**kwargs)
        except (TypeError, KeyError, ValueError) as exc:
            raise SpecError(f"invalid model spec: {exc}") from exc
        declared = [TensorSpec.from_dict(t) for t in data.get("encoder_inputs", [])]
        if declared and tuple(declared) != encoder_inputs():
            raise SpecError(f"spec declares encoder inputs {declared}, this version serves {encoder_inputs()}")
        return spec

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"model spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / SPEC_FILENAME
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: Path) -> ModelSpec:
        """Read ``tritonembed.json`` from an exported model directory.

        Raises:
            SpecError: the file is missing or invalid.
        """
        path = Path(directory) / SPEC_FILENAME
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(f"no model spec at {path}: {exc.strerror}") from exc
        return cls.from_json(text)
