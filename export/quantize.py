"""Reduced-precision variants of an exported FP32 encoder graph: fp16, int8, int4.

Every variant keeps the encoder contract: ``input_ids``/``attention_mask`` INT64 in, ``embedding``
FP32 out. Measured quality and the reasons for each default are in ``docs/quantization.md``.

* ``fp16`` (GPU precision) -- weights and activations in float16, graph I/O in float32. Numerically
  sensitive subgraphs stay float32: the RMSNorm statistics (``Pow -> ReduceMean -> Add -> Sqrt ->
  Div`` and the ``x * rsqrt`` product), every ``Pow`` (GELU-tanh's ``x**3``), and the pooling /
  L2-normalization tail (everything downstream of ``ReduceSum``/``ReduceL2``). This module does not
  run the model: the exporter's validator must run the probe set and call :func:`check_finite`.
* ``int8`` (CPU precision) -- MatMul weights int8 per output channel (7-bit range so it is also safe on
  CPUs without VNNI), activations uint8 with one scale **per token** (:mod:`.int8_pertoken`), so an
  embedding does not depend on the rest of its batch; the FFN down projection of the first
  ``int8_fp32_down_layers`` layers stays float32 (its input carries the largest activation outliers).
  The embedding table(s) become 8-bit blocks (:mod:`.embedding_int8`, ``GatherBlockQuantized``): for
  Qwen3 that table is most of the file. ``int8_activation_scales="tensor"`` is ONNX Runtime's
  ``quantize_dynamic`` instead (one scale per MatMul input over the whole batch: ~10 % faster, not
  batch-invariant; tables stay float32).
* ``int4`` (memory) -- weight-only ``MatMulNBits``: 4-bit blockwise (``block_size``, asymmetric, RTN
  or HQQ) for every MatMul weight except the last ``int4_8bit_last_layers`` transformer layers, which
  get 8-bit ``MatMulNBits``; the embedding table(s) become 4-bit ``GatherBlockQuantized`` (opset 21).

Layers are found from the graph structure, not from node names: the FFN down projections are the
constant-weight MatMuls with the largest input dimension K (K = intermediate size > N = hidden size),
and each one closes a transformer layer.

Models over 2 GB are read with their external data and written with ``<output name>_data`` beside
the output when the result is itself too large for one protobuf.

Needs ``onnx`` and ``onnxruntime`` (``pip install 'tritonembed[export]'``); HQQ also needs torch.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tritonembed.errors import QuantizationError, ValidationError
from tritonembed.export import embedding_int8, int8_pertoken
from tritonembed.export.onnx_graph import (
    activation_type,
    default_opset,
    embedding_gathers,
    external_array,
    external_bytes,
    external_rows,
    load_graph,
    name_nodes,
    read_external_data,
    require_module,
    save_graph,
    set_inline,
    transformer_layers,
    weight_matmuls,
)
from tritonembed.export.quantize_fp16 import to_fp16
from tritonembed.precisions import QUANTIZED

if TYPE_CHECKING:  # pragma: no cover
    import onnx

logger = logging.getLogger(__name__)

INT4_ALGORITHMS = ("rtn", "hqq")
INT8_ACTIVATION_SCALES = ("token", "tensor")
GATHER_QUANT_OPSET = 21  # int4 tensors (GatherBlockQuantized's data) need opset 21 / IR 10



@dataclass(frozen=True)
class QuantizationResult:
    """What :func:`quantize_onnx` wrote.

    ``method`` is one human-readable line and ``settings`` the exact knobs, both meant for
    ``report.json``. ``files`` lists the graph first, then its external data file if any.
    """

    precision: str
    method: str
    settings: dict[str, Any]
    model_path: Path
    files: tuple[Path, ...]
    size_bytes: int
    node_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "method": self.method,
            "settings": dict(self.settings),
            "model_path": str(self.model_path),
            "files": [str(f) for f in self.files],
            "size_bytes": self.size_bytes,
            "node_counts": dict(self.node_counts),
        }


def check_finite(
    outputs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    what: str = "model",
    *,
    unit_norm: bool = False,
    norm_tolerance: float = 1e-2,
) -> None:
    """Raise if any output holds NaN or Inf; with ``unit_norm``, also if a row's L2 norm is not ~1.

    fp16 overflow shows up as NaN/Inf, or -- when a normalization divides by an overflowed ``inf`` --
    as an all-zero embedding, which ``unit_norm`` catches for graphs that L2-normalize. The exporter's
    validator calls this on the outputs of the probe set for every precision (quantize_onnx does not
    run the model).

    Raises:
        ValidationError: one failure line per bad output.
    """
    items = outputs.items() if isinstance(outputs, Mapping) else enumerate(outputs)
    failures = []
    for name, value in items:
        arr = np.asarray(value)
        if arr.dtype.kind not in "fc":
            continue
        bad = ~np.isfinite(arr)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0]).tolist() if arr.ndim else []
            failures.append(f"output {name!r}: {int(bad.sum())} non-finite values (rows {rows[:10]})")
        elif unit_norm and arr.ndim >= 1:
            norms = np.linalg.norm(arr.reshape(-1, arr.shape[-1]).astype(np.float64), axis=-1)
            off = np.flatnonzero(np.abs(norms - 1.0) > norm_tolerance)
            if off.size:
                failures.append(
                    f"output {name!r}: {off.size} rows with L2 norm off 1 (rows {off[:10].tolist()}, "
                    f"norms {np.round(norms[off[:3]], 4).tolist()})"
                )
    if failures:
        raise ValidationError(f"{what} produced NaN/Inf or unnormalized embeddings", failures)


def quantize_onnx(
    fp32_model: Path | str,
    output: Path | str,
    precision: str,
    *,
    block_size: int = 32,
    int4_algorithm: str = "rtn",
    int4_8bit_last_layers: int = 1,
    int4_embeddings: bool = True,
    int4_accuracy_level: int | None = None,
    int8_fp32_down_layers: int = 1,
    int8_per_channel: bool = True,
    int8_reduce_range: bool = True,
    int8_activation_scales: str = "token",
    int8_embeddings: bool = True,
    external_data: bool | None = None,
) -> QuantizationResult:
    """Write a ``precision`` variant of the FP32 encoder ``fp32_model`` to ``output``.

    Args:
        fp32_model: the FP32 ONNX graph (its external data, if any, beside it). For ``int4`` the
            ``fp16`` variant works too: weights are quantized the same way and activations stay
            float16 (the GPU form; see ``docs/benchmarks-gpu.md``).
        output: the ``.onnx`` file to write; its folder is created. An existing file and its
            ``<name>_data`` are replaced.
        precision: ``fp16``, ``int8`` or ``int4`` (``fp32`` is a copy and is the caller's job).
        block_size: int4 block length along K (power of two >= 16); also the 8-bit layers' block.
        int4_algorithm: ``rtn`` (round to nearest, ONNX Runtime's default quantizer) or ``hqq``.
        int4_8bit_last_layers: how many final transformer layers get 8-bit instead of 4-bit weights.
        int4_embeddings: also quantize the embedding Gather tables to 4 bits.
        int4_accuracy_level: MatMulNBits ``accuracy_level`` (None: runtime default, float compute).
        int8_fp32_down_layers: how many first layers keep their FFN down projection in float32.
        int8_per_channel: per-output-channel weight scales.
        int8_reduce_range: 7-bit weights (avoids int16 saturation on CPUs without VNNI).
        int8_activation_scales: ``token`` (one scale per token; batch-invariant) or ``tensor``
            (``quantize_dynamic``: one per MatMul input; per-channel weights then follow ``int8_per_channel``).
        int8_embeddings: with ``token`` scales, also store the embedding tables as 8-bit blocks of
            ``block_size`` (``GatherBlockQuantized``; see ``embedding_int8``).
        external_data: force (True) or forbid (False) external data; None decides by size.

    Raises:
        ValueError: unknown precision or algorithm, bad block size.
        QuantizationError: the input is missing, has no quantizable MatMul, or a quantizer failed.
    """
    if precision not in QUANTIZED:
        raise ValueError(f"precision must be one of {QUANTIZED} (fp32 needs no quantization), got {precision!r}")
    if int8_activation_scales not in INT8_ACTIVATION_SCALES:
        raise ValueError(f"int8_activation_scales must be one of {INT8_ACTIVATION_SCALES}, got {int8_activation_scales!r}")
    if int4_algorithm not in INT4_ALGORITHMS:
        raise ValueError(f"int4_algorithm must be one of {INT4_ALGORITHMS}, got {int4_algorithm!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    src = Path(fp32_model)
    dst = Path(output)
    if not src.is_file():
        raise QuantizationError(f"FP32 model {src} does not exist")
    if src.resolve() == dst.resolve():
        raise QuantizationError(f"output {dst} would overwrite the FP32 model")
    require_module("onnx")
    require_module("onnxruntime")
    dst.parent.mkdir(parents=True, exist_ok=True)

    try:
        if precision == "fp16":
            model, method, settings = to_fp16(src)
        elif precision == "int8":
            model, method, settings = _to_int8(
                src, fp32_down_layers=int8_fp32_down_layers, per_channel=int8_per_channel,
                reduce_range=int8_reduce_range, activation_scales=int8_activation_scales,
                embeddings=int8_embeddings, block_size=block_size,
            )
        else:
            model, method, settings = _to_int4(
                src, block_size=block_size, algorithm=int4_algorithm, last_8bit_layers=int4_8bit_last_layers,
                embeddings=int4_embeddings, accuracy_level=int4_accuracy_level,
            )
    except QuantizationError:
        raise
    except Exception as exc:  # the ONNX / ORT tooling raises assorted types
        raise QuantizationError(f"{precision} quantization of {src} failed: {type(exc).__name__}: {exc}") from exc

    files = save_graph(model, dst, external_data)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    result = QuantizationResult(
        precision=precision,
        method=method,
        settings=settings,
        model_path=dst,
        files=files,
        size_bytes=sum(f.stat().st_size for f in files),
        node_counts=dict(sorted(counts.items())),
    )
    logger.info("%s: %s -> %s (%.1f MB)", precision, method, dst, result.size_bytes / 1e6)
    return result


# --- int8 -------------------------------------------------------------------------------------


def _to_int8(
    src: Path, *, fp32_down_layers: int, per_channel: bool, reduce_range: bool, activation_scales: str = "token",
    embeddings: bool = True, block_size: int = 32,
) -> tuple[onnx.ModelProto, str, dict[str, Any]]:
    # per-token scales: the float weights stay on disk and are read one at a time as they are rewritten
    model = load_graph(src, min_opset=int8_pertoken.MIN_OPSET if activation_scales == "token" else None,
                       external_data=activation_scales != "token")
    name_nodes(model)
    matmuls = weight_matmuls(model)
    if not matmuls:
        raise QuantizationError(f"{src} has no MatMul with a constant 2-D weight: nothing to quantize")
    layers = transformer_layers(matmuls)
    excluded = [layer[-1].name for layer in layers[: max(fp32_down_layers, 0)]]
    if activation_scales == "token":
        bits = 7 if reduce_range else 8
        targets = [m.name for m in matmuls if m.name not in excluded]
        int8_pertoken.rewrite_matmuls(model, targets, weight_bits=bits,
                                      read_weight=functools.partial(external_array, base_dir=src.parent))
        tables = embedding_int8.rewrite_gathers(
            model, embedding_gathers(model)[0], block_size=block_size,
            read_rows=lambda table, first, count: external_rows(table, src.parent, first, count)) if embeddings else []
        read_external_data(model, src.parent)  # what was not rewritten (norm weights, float32 layers)
        settings = {
            "quantizer": "tritonembed.export.int8_pertoken",
            "activation_scales": "token",
            "weight_bits": bits,
            "weight_scales": "per output channel, symmetric",
            "fp32_down_layers": len(excluded),
            "nodes_to_exclude": excluded,
            "quantized_matmuls": len(targets),
            "layers_found": len(layers),
            "embedding_tables_8bit": tables,
            "embedding_block_size": block_size,
        }
        method = int8_pertoken.describe(excluded, bits)
        if tables:
            method += f"; embedding tables 8-bit GatherBlockQuantized (block {block_size})"
        return model, method, settings
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="tritonembed-int8-") as tmp:
        tmp_out = Path(tmp) / "model.onnx"
        _quiet_ort_logging()
        quantize_dynamic(
            model, tmp_out, op_types_to_quantize=["MatMul"], per_channel=per_channel,
            reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            use_external_data_format=True, extra_options={"MatMulConstBOnly": True},
        )
        quantized = load_graph(tmp_out)
    method = (
        "dynamic int8 (onnxruntime.quantization.quantize_dynamic): MatMul weights int8 "
        f"{'per-channel' if per_channel else 'per-tensor'}{', 7-bit range' if reduce_range else ''}, "
        f"activations uint8 per call; FFN down projection of the first {len(excluded)} layer(s) kept float32"
    )
    settings = {
        "quantizer": "onnxruntime.quantization.quantize_dynamic",
        "activation_scales": "tensor",
        "op_types_to_quantize": ["MatMul"],
        "weight_type": "QInt8",
        "activation_type": "QUInt8",
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "fp32_down_layers": len(excluded),
        "nodes_to_exclude": excluded,
        "quantized_matmuls": len(matmuls) - len(excluded),
        "layers_found": len(layers),
    }
    return quantized, method, settings


# --- int4 -------------------------------------------------------------------------------------


def _quiet_ort_logging() -> None:
    # onnxruntime's weight-only quantizer logs one INFO line per node.
    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization.neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _import_nbits_quantizer() -> Any:
    """Import onnxruntime's matmul_nbits_quantizer without its import-time ``logging.basicConfig``.

    That call would install an INFO handler on the root logger of whoever calls us.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    _quiet_ort_logging()
    return matmul_nbits_quantizer


def _nbits(
    model: onnx.ModelProto,
    *,
    bits: int,
    block_size: int,
    algorithm: str,
    op_types: tuple[str, ...],
    exclude: Iterable[str],
    accuracy_level: int | None,
    weights_dir: Path,
) -> onnx.ModelProto:
    nbits = _import_nbits_quantizer()
    quant_axes = (("MatMul", 0), ("Gather", 1))
    if algorithm == "hqq":
        require_module("torch")
        config = nbits.HQQWeightOnlyQuantConfig(
            block_size=block_size, bits=bits, op_types_to_quantize=op_types, quant_axes=quant_axes
        )
    else:
        config = nbits.DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level,
            op_types_to_quantize=op_types, quant_axes=quant_axes, bits=bits,
        )
    quantizer = nbits.MatMulNBitsQuantizer(
        model, bits=bits, block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level,
        nodes_to_exclude=list(exclude), op_types_to_quantize=op_types, quant_axes=quant_axes,
        algo_config=config,
    )
    node_quantizer = quantizer.node_quantizer
    node_quantizer.quantize = _one_weight_at_a_time(node_quantizer, weights_dir)
    if hasattr(node_quantizer, "quantize_ndarray"):  # the Gather tables' quantizer (RTN)
        node_quantizer.quantize_ndarray = _by_row_chunks(node_quantizer.quantize_ndarray)
    quantizer.process()
    return quantizer.model.model


# Rows of an embedding table quantized at once: ONNX Runtime's table quantizer makes several float32
# temporaries of its input's size (0.6 GB each for Qwen3's 151,669 x 1,024 table).
TABLE_CHUNK_ROWS = 8192


def _quantize_rows(quantize_ndarray: Any, read_rows: Any, shape: tuple[int, int], block_size: int,
                   is_symmetric: bool) -> tuple[Any, Any, Any]:
    """ONNX Runtime's ``quantize_ndarray`` of a 2-D table along its rows' axis, :data:`TABLE_CHUNK_ROWS` rows
    at a time (``read_rows(first, count)`` gives them). Blocks never cross rows, and both packed outputs
    (4-bit data, 4-bit zero points) are packed in row order from an even count per chunk, so the
    concatenation is the whole-table result, byte for byte; a width or block count that is odd (a chunk
    would end mid-byte) is quantized in one call."""
    rows, cols = shape
    blocks = -(-cols // block_size)
    if rows <= TABLE_CHUNK_ROWS or cols % 2 or blocks % 2:
        return quantize_ndarray(read_rows(0, rows), 1, block_size, is_symmetric)
    parts = [quantize_ndarray(read_rows(first, min(TABLE_CHUNK_ROWS, rows - first)), 1, block_size, is_symmetric)
             for first in range(0, rows, TABLE_CHUNK_ROWS)]
    points = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), points


def _by_row_chunks(quantize_ndarray: Any) -> Any:
    """``quantize_ndarray`` for an in-memory table, by :func:`_quantize_rows` (other shapes: unchanged)."""

    def run(data: np.ndarray, quantize_axis: int, block_size: int, is_symmetric: bool) -> tuple[Any, Any, Any]:
        if data.ndim != 2 or quantize_axis != 1:
            return quantize_ndarray(data, quantize_axis, block_size, is_symmetric)
        return _quantize_rows(quantize_ndarray, lambda first, count: data[first:first + count], data.shape,
                              block_size, is_symmetric)

    return run


def _one_weight_at_a_time(node_quantizer: Any, weights_dir: Path) -> Any:
    """Wrap ONNX Runtime's per-node quantizer so that a graph whose float weights are external references
    (``load_graph(..., external_data=False)``) has one of them in memory at a time.

    A MatMul's weight is read into a scratch graph of its own and quantized there; only the quantized
    tensors are copied into the model (protobuf never frees bytes put into a model before the model goes:
    reading every float weight into it would keep all of them). An embedding table is read from its file
    a chunk of rows at a time (:func:`_gather_from_disk`). The unused float reference is removed when the
    quantizer cleans the initializers.
    """
    import onnx

    quantize = node_quantizer.quantize

    def run(node: Any, graph_stack: list[Any]) -> list[Any]:
        graph = graph_stack[0]
        names = set(node.input)
        on_disk = [t for t in graph.initializer if t.name in names and t.data_location == onnx.TensorProto.EXTERNAL]
        if not on_disk:
            return quantize(node, graph_stack)
        if node.op_type == "Gather" and len(on_disk) == 1 and on_disk[0].name == node.input[0]:
            built = _gather_from_disk(node_quantizer, node, on_disk[0], graph, weights_dir)
            if built is not None:
                return built
        scratch = onnx.GraphProto()
        for tensor in on_disk:
            copy = scratch.initializer.add()
            copy.CopyFrom(tensor)
            set_inline(copy, external_bytes(tensor, weights_dir))
        kept = len(scratch.initializer)
        nodes = quantize(node, [scratch])
        graph.initializer.extend(scratch.initializer[kept:])
        return nodes

    return run


def _gather_from_disk(node_quantizer: Any, node: Any, table: Any, graph: Any, weights_dir: Path) -> list[Any] | None:
    """ONNX Runtime's ``quantize_gather`` (4-bit ``GatherBlockQuantized``, blocks along each row) for a table
    read from its external-data file a chunk of rows at a time: the same tensors and node, byte for byte
    (``tests/integration/test_qwen3_graph.py`` compares the two). None for a case it does not cover (the
    caller then runs ONNX Runtime's own)."""
    from onnx import TensorProto, helper, numpy_helper

    config = node_quantizer.config
    if getattr(config, "bits", 4) != 4 or len(table.dims) != 2 or config.quant_axes.get("Gather", 1) not in (1, -1) \
            or table.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        return None
    rows, cols = (int(d) for d in table.dims)
    symmetric = config.is_symmetric
    quantized, scales, zero_points = _quantize_rows(
        node_quantizer.quantize_ndarray, lambda first, count: external_rows(table, weights_dir, first, count),
        (rows, cols), config.block_size, symmetric)
    qtype = TensorProto.INT4 if symmetric else TensorProto.UINT4
    tensors = [helper.make_tensor(table.name + "_Q4", qtype, [rows, cols], quantized.tobytes(), True),
               numpy_helper.from_array(scales, table.name + "_scales")]
    if not symmetric:
        tensors.append(helper.make_tensor(table.name + "_zero_points", qtype, scales.shape, zero_points.tobytes(), True))
    for graph_input in graph.input:
        if graph_input.name == table.name:
            graph.input.remove(graph_input)
            break
    graph.initializer.extend(tensors)
    try:
        gather_axis = helper.get_node_attr_value(node, "axis")
    except ValueError:
        gather_axis = 0
    inputs = [tensors[0].name, node.input[1], tensors[1].name] + ([tensors[2].name] if not symmetric else [])
    return [helper.make_node("GatherBlockQuantized", inputs=inputs, outputs=[node.output[0]],
                             name=node.name + "_Q4" if node.name else "", domain="com.microsoft",
                             gather_axis=gather_axis, quantize_axis=1, block_size=config.block_size)]


def _to_int4(
    src: Path,
    *,
    block_size: int,
    algorithm: str,
    last_8bit_layers: int,
    embeddings: bool,
    accuracy_level: int | None,
) -> tuple[onnx.ModelProto, str, dict[str, Any]]:
    # the float weights stay on disk and are read one at a time as their node is quantized
    model = load_graph(src, min_opset=GATHER_QUANT_OPSET if embeddings else None, external_data=False)
    name_nodes(model)
    matmuls = weight_matmuls(model)
    if not matmuls:
        raise QuantizationError(f"{src} has no MatMul with a constant 2-D weight: nothing to quantize")
    layers = transformer_layers(matmuls)
    activations = activation_type(model)
    n8 = min(max(last_8bit_layers, 0), len(layers))
    eight_bit = [m.name for layer in (layers[len(layers) - n8 :] if n8 else []) for m in layer]
    tables, other_gathers = embedding_gathers(model) if embeddings else ([], [])

    if tables:
        model = _nbits(
            model, bits=4, block_size=block_size, algorithm="rtn", op_types=("Gather",),
            exclude=other_gathers, accuracy_level=None, weights_dir=src.parent,
        )
    model = _nbits(
        model, bits=4, block_size=block_size, algorithm=algorithm, op_types=("MatMul",),
        exclude=eight_bit, accuracy_level=accuracy_level, weights_dir=src.parent,
    )
    if eight_bit:  # the MatMuls left as float32 by the 4-bit pass are exactly the 8-bit ones
        model = _nbits(
            model, bits=8, block_size=block_size, algorithm="rtn", op_types=("MatMul",),
            exclude=(), accuracy_level=accuracy_level, weights_dir=src.parent,
        )
    read_external_data(model, src.parent)  # what no pass quantized (norm weights, small constants)
    method = (
        f"weight-only MatMulNBits: 4-bit {algorithm.upper()} asymmetric, block {block_size}"
        + (f"; last {n8} layer(s) 8-bit" if n8 else "")
        + ("; embedding tables 4-bit GatherBlockQuantized" if tables else "")
        + f"; activations {activations}"
    )
    settings = {
        "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "bits": 4,
        "algorithm": algorithm,
        "block_size": block_size,
        "symmetric": False,
        "accuracy_level": accuracy_level,
        "layers_found": len(layers),
        "last_layers_8bit": n8,
        "matmuls_4bit": len(matmuls) - len(eight_bit),
        "matmuls_8bit": len(eight_bit),
        "embedding_tables_4bit": tables,
        "activations": activations,
        "opset": default_opset(model),
    }
    return model, method, settings


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - CLI shell
    """``python -m tritonembed.export.quantize FP32_MODEL OUTPUT --precision P``: quantize one FP32 ONNX graph."""
    import json

    parser = argparse.ArgumentParser(prog="python -m tritonembed.export.quantize", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("fp32_model", type=Path, help="the FP32 encoder graph (model.onnx)")
    parser.add_argument("output", type=Path, help="where to write the quantized model.onnx")
    parser.add_argument("--precision", choices=QUANTIZED, required=True, help="the variant to write")
    parser.add_argument("--block-size", type=int, default=32, help="int4 block size")
    parser.add_argument("--int4-algorithm", choices=INT4_ALGORITHMS, default="rtn", help="int4 weight rounding")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = quantize_onnx(args.fp32_model, args.output, args.precision, block_size=args.block_size,
                           int4_algorithm=args.int4_algorithm)
    sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
