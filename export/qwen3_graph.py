"""The Qwen3 embedding graph built node by node from the checkpoint, one weight in memory at a time.

Tracing (:mod:`tritonembed.export.onnx_export`) needs the whole model in float32 and then builds the whole
ONNX proto beside it: two float32 copies of the weights, 4x the bf16 checkpoint (4B: ~30 GB). This module
writes the same graph without either: the nodes are spelled out here, and each weight is read from the
safetensors files, converted to float32 (and transposed for ``MatMul``), appended to ``model.onnx_data`` and
dropped before the next one is read (a table a chunk of rows at a time). Peak memory is about one weight.

The graph is the traced fused graph of :mod:`tritonembed.export.attention`, op for op (same inputs,
outputs, rotary constants and RMS-norm formula; the traced no-op casts and ``x * 1.0`` are left out), so
its outputs are bit-identical to the traced export's on the same weights (``tests/integration/test_qwen3_graph.py``):

- each row's first and last real token from ``attention_mask``; the row gathered into right-padded order
  and run at positions 0..len-1; one ``com.microsoft.GroupQueryAttention`` per layer;
- the last real token's final hidden state, L2-normalized: output ``embedding`` [batch, hidden].

Only Qwen3 decoders with last-token pooling and the plain ``embedding`` head are built here
(:func:`supports`); the reranker's head and anything else stay on the traced path.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonembed.errors import ExportError
from tritonembed.export.attention import GQA_DOMAIN, GQA_OP
from tritonembed.export.checkpoint_tensors import CheckpointTensors
from tritonembed.export.onnx_export import ONNX_OPSET
from tritonembed.export.onnx_graph import ExternalDataWriter
from tritonembed.spec import ATTENTION_MASK, ENCODER_EMBEDDING_NAME, INPUT_IDS, ModelSpec

log = logging.getLogger(__name__)

# torch dtype names of checkpoint tensors -> ONNX element types (TensorProto.FLOAT / FLOAT16 / BFLOAT16): the
# float ones, which the validation form keeps as stored
_ONNX_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}
# What report.json says built the graph (key ``graph.builder``).
BUILDER = "tritonembed.export.qwen3_graph (node by node, one weight in memory at a time)"


@dataclass(frozen=True)
class Qwen3Dims:
    """The numbers of a Qwen3 config the graph is built from."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Qwen3Dims:
        """Raises: ExportError for a config the builder does not reproduce (sliding window, scaled RoPE,
        attention biases, an activation other than SiLU)."""
        if config.get("use_sliding_window") and config.get("sliding_window"):
            raise ExportError("the Qwen3 graph builder has no sliding-window attention")
        scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ExportError(f"the Qwen3 graph builder has no scaled RoPE ({scaling})")
        if config.get("attention_bias"):
            raise ExportError("the Qwen3 graph builder has no attention biases")
        if config.get("hidden_act", "silu") != "silu":
            raise ExportError(f"the Qwen3 graph builder computes SiLU, not {config.get('hidden_act')}")
        heads = int(config["num_attention_heads"])
        return cls(
            hidden=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config["num_key_value_heads"]),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            rms_eps=float(config["rms_norm_eps"]),
            rope_theta=float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        )


def supports(spec: ModelSpec) -> bool:
    """Whether this builder makes the graph of ``spec`` (a Qwen3 embedder with the plain embedding head)."""
    return spec.decoder and spec.pooling == "last_token" and [o.head for o in spec.outputs] == ["embedding"]


def refusal(checkpoint: Path) -> str | None:
    """Why this builder cannot reproduce the checkpoint's config (the exporter then traces it), or None."""
    try:
        Qwen3Dims.from_config(json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8")))
    except ExportError as exc:
        return str(exc)
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable config: {type(exc).__name__}: {exc}"
    return None


#: ``weights=`` of :func:`build_qwen3_embedding_graph`: float32 initializers (the artifact), or each weight in
#: the checkpoint's own dtype followed by a ``Cast`` to float32 (the validation graph: the same numbers,
#: bfloat16 and float16 are exact in float32, at half the memory).
WEIGHT_FORMS = ("float32", "stored")


class _Graph:
    """Node, constant and initializer lists with names unique by construction."""

    def __init__(self, writer: ExternalDataWriter, tensors: CheckpointTensors, weights: str = "float32") -> None:
        if weights not in WEIGHT_FORMS:
            raise ExportError(f"unknown weight form {weights!r}; choose one of {', '.join(WEIGHT_FORMS)}")
        self.writer = writer
        self.tensors = tensors
        self.stored = weights == "stored"
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._constants: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._count = 0

    def op(self, op_type: str, inputs: list[str], scope: str, outputs: int = 1, domain: str = "",
           named: str | None = None, **attrs: Any) -> Any:
        """Append one node; returns its output name (a list when ``outputs`` > 1). ``named``: the output's name."""
        from onnx import helper

        self._count += 1
        name = f"{scope}/{op_type}_{self._count}"
        names = [named] if named else [f"{name}_output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain or None, **attrs))
        return names[0] if outputs == 1 else names

    def constant(self, value: Any, dtype: Any) -> str:
        """An inline initializer (shared between equal values)."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._constants:
            name = f"const_{len(self._constants)}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def weight(self, name: str, *, transpose: bool = False, cast: bool = True) -> str:
        """A checkpoint tensor written to the external-data file now (and dropped); its float32 value's name.

        ``cast=False`` (a Gather table): the initializer's own name, whatever its dtype; the caller casts
        what it gathers with :meth:`as_float`.
        """
        import torch
        from onnx import TensorProto

        onnx_name = f"{name}.T" if transpose else name
        stored_type = _ONNX_TYPES.get(self.tensors.dtype(name))
        if not self.stored or stored_type is None or stored_type == TensorProto.FLOAT:
            if transpose:
                self.initializers.append(self.writer.add(onnx_name, self.tensors.float32(name, transpose=True)))
            else:  # a table a chunk of rows at a time
                chunks = (rows.to(torch.float32).numpy() for _, rows in self.tensors.row_chunks(name))
                self.initializers.append(self.writer.add_chunks(onnx_name, self.tensors.shape(name), TensorProto.FLOAT,
                                                                chunks))
            return onnx_name
        self.initializers.append(self.writer.add(onnx_name, self.tensors.as_stored(name, transpose=transpose),
                                                 data_type=stored_type))
        return self.op("Cast", [onnx_name], "/weights", to=TensorProto.FLOAT) if cast else onnx_name

    def as_float(self, x: str, table: str) -> str:
        """``x`` gathered from ``table``, as float32 (a Cast when the table kept the checkpoint's dtype)."""
        from onnx import TensorProto

        if self.stored and _ONNX_TYPES.get(self.tensors.dtype(table)) not in (None, TensorProto.FLOAT):
            return self.op("Cast", [x], "/embed_tokens", to=TensorProto.FLOAT)
        return x


def build_qwen3_embedding_graph(checkpoint: Path, output: Path, spec: ModelSpec, *, weights: str = "float32") -> Any:
    """Write the fused Qwen3 embedding graph of ``checkpoint`` to ``output`` (+ ``<name>_data``).

    ``weights="stored"`` writes the validation form (:data:`WEIGHT_FORMS`); run it with ONNX Runtime's
    constant folding off, or it folds the casts back into float32 weights.

    Returns the ModelProto as written (its weights external references, not data). Every weight goes to
    ``<name>_data`` as it is read, whatever the model's size (:func:`tritonembed.export.onnx_export.inline_small_model`
    makes one file of a small final artifact).

    Raises:
        ExportError: the spec is not one this builder makes, the config asks for something it does not
            reproduce, or a weight is missing.
    """
    import onnx
    from onnx import TensorProto, helper

    if not supports(spec):
        raise ExportError(f"the Qwen3 graph builder makes last-token embedding graphs, not {spec.pooling} / "
                          f"{[o.head for o in spec.outputs]}")
    config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    dims = Qwen3Dims.from_config(config)
    output = Path(output)
    writer = ExternalDataWriter(output)
    try:
        graph = _Graph(writer, CheckpointTensors(Path(checkpoint)), weights)
        embedding = _encoder(graph, dims, normalize=spec.normalize)
    finally:
        writer.close()
    inputs = [helper.make_tensor_value_info(t.name, TensorProto.INT64, ["batch", "sequence"])
              for t in (INPUT_IDS, ATTENTION_MASK)]
    out = helper.make_tensor_value_info(embedding, TensorProto.FLOAT, ["batch", dims.hidden])
    model = helper.make_model(
        helper.make_graph(graph.nodes, "qwen3_embedding", inputs, [out], graph.initializers),
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(GQA_DOMAIN, 1)],
        producer_name="tritonembed",
    )
    model.ir_version = 8
    onnx.save(model, str(output))
    log.info("built the Qwen3 graph: %d nodes, %d layers, %.2f GB of float32 weights", len(graph.nodes),
             dims.layers, writer.bytes_written / 1e9)
    return model


def _encoder(g: _Graph, d: Qwen3Dims, *, normalize: bool) -> str:
    from onnx import TensorProto

    i64, f32 = np.int64, np.float32
    mask = g.op("Cast", [ATTENTION_MASK.name], "/prologue", to=TensorProto.INT64)
    length = g.op("Gather", [g.op("Shape", [mask], "/prologue"), g.constant(1, i64)], "/prologue", axis=0)
    steps = g.op("Unsqueeze", [g.op("Range", [g.constant(0, i64), length, g.constant(1, i64)], "/prologue"),
                               g.constant([0], i64)], "/prologue")
    # first and last real token by ArgMax, not a ReduceSum: the fp16 converter keeps everything downstream
    # of a ReduceSum in float32 (export/quantize_fp16.py), which would be every layer here
    first = g.op("ArgMax", [mask], "/prologue", axis=1, keepdims=0, select_last_index=0)
    last = g.op("ArgMax", [g.op("Mul", [steps, mask], "/prologue")], "/prologue", axis=1, keepdims=0,
                select_last_index=0)
    lengths = g.op("Add", [g.op("Sub", [last, first], "/prologue"), g.constant(1, i64)], "/prologue")
    index = g.op("Clip", [g.op("Add", [g.op("Unsqueeze", [first, g.constant([1], i64)], "/prologue"), steps], "/prologue"),
                          "", g.op("Sub", [length, g.constant(1, i64)], "/prologue")], "/prologue")
    ids = g.op("GatherElements", [INPUT_IDS.name, index], "/prologue", axis=1)  # every row right-padded
    last_index = g.op("Sub", [lengths, g.constant(1, i64)], "/prologue")
    seqlens_k = g.op("Cast", [last_index], "/prologue", to=TensorProto.INT32)
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", [INPUT_IDS.name], "/prologue"), g.constant(1, i64)],
                               "/prologue", axis=0)], "/prologue", to=TensorProto.INT32)
    table = "embed_tokens.weight"
    hidden = g.as_float(g.op("Gather", [g.weight(table, cast=False), ids], "/embed_tokens"), table)
    cos, sin = _rotary(g, d, steps)
    started = time.perf_counter()
    for layer in range(d.layers):
        hidden = _decoder_layer(g, d, layer, hidden, cos, sin, seqlens_k, total)
        if (layer + 1) % max(1, d.layers // 4) == 0:  # progress for the long builds (a 8B: 36 layers)
            log.info("Qwen3 graph: %d/%d layers written (%.1f s, %.2f GB)", layer + 1, d.layers,
                     time.perf_counter() - started, g.writer.bytes_written / 1e9)
    hidden = _rms_norm(g, d, hidden, "norm.weight", "/norm")
    # the hidden state at len - 1 of each row: Gather on the flattened (batch * sequence, hidden) rows
    batch = g.op("Gather", [g.op("Shape", [hidden], "/pool"), g.constant(0, i64)], "/pool", axis=0)
    width = g.op("Gather", [g.op("Shape", [hidden], "/pool"), g.constant(1, i64)], "/pool", axis=0)
    rows = g.op("Add", [last_index, g.op("Mul", [g.op("Range", [g.constant(0, i64), batch, g.constant(1, i64)], "/pool"),
                                                  width], "/pool")], "/pool")
    pooled = g.op("Gather", [g.op("Flatten", [hidden], "/pool", axis=2), rows], "/pool", axis=0)
    if not normalize:
        return g.op("Identity", [pooled], "/pool", named=ENCODER_EMBEDDING_NAME)
    norm = g.op("Clip", [g.op("ReduceL2", [pooled], "/normalize", axes=[1], keepdims=1),
                         g.constant(1e-12, f32), ""], "/normalize")
    return g.op("Div", [pooled, norm], "/normalize", named=ENCODER_EMBEDDING_NAME)


def _rotary(g: _Graph, d: Qwen3Dims, steps: str) -> tuple[str, str]:
    """cos / sin [1, 1, sequence, head_dim] at positions 0..sequence-1 (transformers' default RoPE)."""
    import torch
    from onnx import TensorProto

    # computed as transformers computes it (int64 arange -> float, base ** (i / dim) in float32), so the
    # constant has the same bits as the one the tracer records
    inv_freq = 1.0 / (d.rope_theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.int64).to(torch.float) / d.head_dim))
    positions = g.op("Cast", [g.op("Unsqueeze", [steps, g.constant([2], np.int64)], "/rotary")], "/rotary",
                     to=TensorProto.FLOAT)
    freqs = g.op("Mul", [positions, g.constant(inv_freq.numpy(), np.float32)], "/rotary")
    angles = g.op("Concat", [freqs, freqs], "/rotary", axis=-1)
    axis1 = g.constant([1], np.int64)
    cos = g.op("Unsqueeze", [g.op("Cos", [angles], "/rotary"), axis1], "/rotary")
    sin = g.op("Unsqueeze", [g.op("Sin", [angles], "/rotary"), axis1], "/rotary")
    return cos, sin


def _rms_norm(g: _Graph, d: Qwen3Dims, x: str, weight: str, scope: str) -> str:
    """transformers' Qwen3RMSNorm: weight * (x / sqrt(mean(x^2) + eps)), spelled as the tracer writes it."""
    f32 = np.float32
    mean = g.op("ReduceMean", [g.op("Pow", [x, g.constant(2.0, f32)], scope)], scope, axes=[-1], keepdims=1)
    inverse = g.op("Div", [g.constant(1.0, f32), g.op("Sqrt", [g.op("Add", [mean, g.constant(d.rms_eps, f32)], scope)],
                                                        scope)], scope)
    return g.op("Mul", [g.weight(weight), g.op("Mul", [x, inverse], scope)], scope)


def _rotate(g: _Graph, d: Qwen3Dims, x: str, cos: str, sin: str, scope: str) -> str:
    """x * cos + rotate_half(x) * sin on [batch, heads, sequence, head_dim]."""
    i64 = np.int64
    half, axis, one = g.constant([d.head_dim // 2], i64), g.constant([3], i64), g.constant([1], i64)
    x1 = g.op("Slice", [x, g.constant([0], i64), half, axis, one], scope)
    x2 = g.op("Slice", [x, half, g.constant([np.iinfo(np.int64).max], i64), axis, one], scope)
    rotated = g.op("Concat", [g.op("Neg", [x2], scope), x1], scope, axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], scope), g.op("Mul", [rotated, sin], scope)], scope)


def _heads(g: _Graph, d: Qwen3Dims, x: str, heads: int, norm: str, scope: str) -> str:
    """A projection [batch, sequence, heads * head_dim] -> RMS-normed per head, as [batch, heads, sequence, head_dim]."""
    shaped = g.op("Reshape", [x, g.constant([0, 0, heads, d.head_dim], np.int64)], scope, allowzero=0)
    return g.op("Transpose", [_rms_norm(g, d, shaped, norm, scope)], scope, perm=[0, 2, 1, 3])


def _merge_heads(g: _Graph, x: str, width: int, scope: str) -> str:
    transposed = g.op("Transpose", [x], scope, perm=[0, 2, 1, 3])
    return g.op("Reshape", [transposed, g.constant([0, 0, width], np.int64)], scope, allowzero=0)


def _decoder_layer(g: _Graph, d: Qwen3Dims, i: int, hidden: str, cos: str, sin: str, seqlens_k: str, total: str) -> str:
    p = f"layers.{i}."
    s = f"/layers.{i}"
    x = _rms_norm(g, d, hidden, p + "input_layernorm.weight", s + "/input_layernorm")
    attn = s + "/self_attn"
    q = g.op("MatMul", [x, g.weight(p + "self_attn.q_proj.weight", transpose=True)], attn + "/q_proj")
    q = _rotate(g, d, _heads(g, d, q, d.heads, p + "self_attn.q_norm.weight", attn + "/q_norm"), cos, sin, attn)
    k = g.op("MatMul", [x, g.weight(p + "self_attn.k_proj.weight", transpose=True)], attn + "/k_proj")
    k = _rotate(g, d, _heads(g, d, k, d.kv_heads, p + "self_attn.k_norm.weight", attn + "/k_norm"), cos, sin, attn)
    v = g.op("MatMul", [x, g.weight(p + "self_attn.v_proj.weight", transpose=True)], attn + "/v_proj")
    # without the present_key / present_value outputs ORT 1.32's CPU kernel materializes the scores
    fused = g.op(GQA_OP, [_merge_heads(g, q, d.heads * d.head_dim, attn),
                                         _merge_heads(g, k, d.kv_heads * d.head_dim, attn), v, "", "", seqlens_k, total],
                 attn, outputs=3, domain=GQA_DOMAIN, num_heads=d.heads, kv_num_heads=d.kv_heads,
                 scale=float(d.head_dim ** -0.5))[0]
    hidden = g.op("Add", [hidden, g.op("MatMul", [fused, g.weight(p + "self_attn.o_proj.weight", transpose=True)],
                                       attn + "/o_proj")], s)
    x = _rms_norm(g, d, hidden, p + "post_attention_layernorm.weight", s + "/post_attention_layernorm")
    mlp = s + "/mlp"
    gate = g.op("MatMul", [x, g.weight(p + "mlp.gate_proj.weight", transpose=True)], mlp + "/gate_proj")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], mlp + "/act_fn")], mlp + "/act_fn")
    up = g.op("MatMul", [x, g.weight(p + "mlp.up_proj.weight", transpose=True)], mlp + "/up_proj")
    down = g.op("MatMul", [g.op("Mul", [act, up], mlp), g.weight(p + "mlp.down_proj.weight", transpose=True)],
                mlp + "/down_proj")
    return g.op("Add", [hidden, down], s)
