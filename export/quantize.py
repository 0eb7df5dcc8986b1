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
import logging
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tritonembed.artifact import external_data_file, needs_external_data
from tritonembed.errors import ExportError, ValidationError
from tritonembed.export import embedding_int8, int8_pertoken
from tritonembed.precisions import QUANTIZED

if TYPE_CHECKING:  # pragma: no cover
    import onnx

logger = logging.getLogger(__name__)

INT4_ALGORITHMS = ("rtn", "hqq")
INT8_ACTIVATION_SCALES = ("token", "tensor")
GATHER_QUANT_OPSET = 21  # int4 tensors (GatherBlockQuantized's data) need opset 21 / IR 10

# fp16: op types always kept in float32, on top of ONNX Runtime's default block list.
FP16_FP32_OP_TYPES = ("Pow",)
# fp16: everything downstream of these (pooling sums, L2 norm) stays float32.
FP16_TAIL_ROOT_OPS = ("ReduceSum", "ReduceL2")
_RMSNORM_CHAIN_OPS = ("Add", "Sqrt", "Reciprocal", "Div", "Cast")


class QuantizationError(ExportError):
    """A quantized variant could not be produced."""


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
    _require("onnx")
    _require("onnxruntime")
    dst.parent.mkdir(parents=True, exist_ok=True)

    try:
        if precision == "fp16":
            model, method, settings = _to_fp16(src)
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

    files = _save(model, dst, external_data)
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


# --- graph structure --------------------------------------------------------------------------


@dataclass(frozen=True)
class _WeightMatMul:
    name: str
    k: int
    n: int


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise QuantizationError(f"quantization needs {module}: pip install 'tritonembed[export]' ({exc})") from exc


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names so they can be listed in include/exclude lists."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_tritonembed_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _weight_matmuls(model: onnx.ModelProto) -> list[_WeightMatMul]:
    """MatMuls whose B input is a 2-D float initializer, in graph (topological) order."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        tensor = inits[node.input[1]]
        if len(tensor.dims) == 2 and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            found.append(_WeightMatMul(node.name, int(tensor.dims[0]), int(tensor.dims[1])))
    return found


def _activation_type(model: onnx.ModelProto) -> str:
    """``float16`` when the graph's weight MatMuls take float16 weights (an fp16 export), else ``float32``."""
    import onnx

    inits = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and inits.get(node.input[1]) == onnx.TensorProto.FLOAT16:
            return "float16"
    return "float32"


def _layers(matmuls: Sequence[_WeightMatMul]) -> list[list[_WeightMatMul]]:
    """Group weight MatMuls into transformer layers; each FFN down projection (largest K > N) ends one.

    MatMuls after the last down projection (e.g. a projection head) belong to no layer.
    """
    if not matmuls:
        return []
    k_max = max(m.k for m in matmuls)
    layers: list[list[_WeightMatMul]] = []
    current: list[_WeightMatMul] = []
    for m in matmuls:
        current.append(m)
        if m.k == k_max and m.k > m.n:
            layers.append(current)
            current = []
    return layers


def _embedding_gathers(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(Gathers whose data is a 2-D float32/float16 initializer, every other Gather)."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    tables, others = [], []
    for node in model.graph.node:
        if node.op_type != "Gather":
            continue
        tensor = inits.get(node.input[0])
        is_table = tensor is not None and len(tensor.dims) == 2 and tensor.data_type in (
            onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        (tables if is_table else others).append(node.name)
    return tables, others


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _load(path: Path, *, min_opset: int | None = None) -> onnx.ModelProto:
    """Load a model with its external data, first upgrading it to ``min_opset`` if lower.

    The upgrade runs on the graph without its tensor data (so it works above 2 GB); external-data
    references survive onnx's version converter, and the data is read afterwards.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if min_opset is not None and _opset(model) < min_opset:
        logger.info("upgrading %s from opset %d to %d", path.name, _opset(model), min_opset)
        from onnx import version_converter

        # The converter copies the whole proto several times: it gets the graph with its inline weights
        # set aside (as placeholders it never reads), and they are put back by name afterwards.
        weights = _set_aside_inline_weights(model)
        model = version_converter.convert_version(model, min_opset)
        _restore_inline_weights(model, weights)
        if min_opset >= 21 and model.ir_version < 10:  # opset 21 (int4 types) needs IR 10
            model.ir_version = 10
    _read_external_data(model, path.parent)
    return model


_PLACEHOLDER = "tritonembed-set-aside"
# convert_float_to_float16's defaults, passed explicitly: the weights converted after it must round the same way.
FP16_MIN_POSITIVE = 5.96e-08
FP16_MAX_FINITE = 65504.0


def _set_aside_inline_weights(model: onnx.ModelProto, *, float_only: bool = False) -> dict[str, bytes]:
    """Move the raw bytes of inline initializers above 1 KiB out of ``model``; they become external
    references to a placeholder location (:func:`_restore_inline_weights` undoes it)."""
    import onnx

    aside = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data") \
                or len(tensor.raw_data) <= 1024 or (float_only and tensor.data_type != onnx.TensorProto.FLOAT):
            continue
        aside[tensor.name] = tensor.raw_data
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", _PLACEHOLDER
    return aside


def _restore_inline_weights(model: onnx.ModelProto, aside: dict[str, bytes]) -> None:
    """Raises: QuantizationError when a set-aside tensor is no longer in the graph as a placeholder."""
    import onnx

    for tensor in model.graph.initializer:
        if tensor.name in aside and tensor.data_location == onnx.TensorProto.EXTERNAL \
                and any(e.key == "location" and e.value == _PLACEHOLDER for e in tensor.external_data):
            tensor.raw_data = aside.pop(tensor.name)
            tensor.ClearField("data_location")  # unset, as before: the saved bytes stay the same
            del tensor.external_data[:]
    if aside:
        raise QuantizationError(f"the opset converter dropped {len(aside)} initializer(s), e.g. {next(iter(aside))}")


def _read_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read every external tensor's bytes into the model (``onnx``'s own loader, minus its hard-link check).

    ``onnx.load`` refuses a data file with more than one hard link ("potential hardlink attack"), and
    the repository builder hard-links exported files into Triton repositories, so a served export
    could not be quantized again. The locations must stay inside ``base_dir``.

    Raises:
        QuantizationError: a location outside ``base_dir``, or a file shorter than its tensors.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    root = base_dir.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = (root / info["location"]).resolve()
        if root not in location.parents:
            raise QuantizationError(f"tensor {tensor.name}: external data {info['location']!r} is outside {root}")
        offset, length = int(info.get("offset", 0)), info.get("length")
        with open(location, "rb") as f:
            f.seek(offset)
            data = f.read() if length is None else f.read(int(length))
        if length is not None and len(data) != int(length):
            raise QuantizationError(f"tensor {tensor.name}: {location} holds {len(data)} of {length} bytes")
        tensor.raw_data = data
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    load_external_data_for_model(model, str(base_dir))  # anything left (tensors in attributes): onnx's loader


def _tensor_bytes(model: onnx.ModelProto) -> int:
    from onnx.numpy_helper import to_array

    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else to_array(t).nbytes
    return total


def _save(model: onnx.ModelProto, output: Path, external_data: bool | None) -> tuple[Path, ...]:
    """Write ``model``; external data goes to ``<output name>_data`` when asked or when too large."""
    import onnx

    data_path = external_data_file(output)
    for stale in (output, data_path):  # onnx appends to an existing data file
        if stale.exists():
            stale.unlink()
    use_external = needs_external_data(_tensor_bytes(model)) if external_data is None else external_data
    if use_external:
        onnx.save_model(
            model, str(output), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_path.name, size_threshold=1024,
        )
        return (output, data_path) if data_path.exists() else (output,)
    onnx.save_model(model, str(output))
    return (output,)


# --- fp16 -------------------------------------------------------------------------------------


def fp16_fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept float32 in the fp16 variant: RMSNorm statistics and the pooling tail."""
    consumers: dict[str, list[Any]] = {}
    producer: dict[str, Any] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node

    keep: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type != "ReduceMean":
            continue
        source = producer.get(node.input[0])
        if source is None or source.op_type not in ("Pow", "Mul"):
            continue  # a plain mean, not a variance
        keep[source.name] = None
        keep[node.name] = None
        # ReduceMean -> Add(eps) -> Sqrt -> Div(1, .)/Reciprocal -> Mul(x, .)
        frontier = [node]
        while frontier:
            current = frontier.pop()
            for nxt in (c for out in current.output for c in consumers.get(out, [])):
                if nxt.name in keep:
                    continue
                if nxt.op_type == "Mul":
                    keep[nxt.name] = None  # x * rsqrt(var): the end of the statistics chain
                elif nxt.op_type in _RMSNORM_CHAIN_OPS:
                    keep[nxt.name] = None
                    frontier.append(nxt)

    # the pooling / normalization tail: everything reachable from a ReduceSum or ReduceL2
    frontier = [n for n in model.graph.node if n.op_type in FP16_TAIL_ROOT_OPS]
    for node in frontier:
        keep[node.name] = None
    while frontier:
        current = frontier.pop()
        for nxt in (c for out in current.output for c in consumers.get(out, [])):
            if nxt.name not in keep:
                keep[nxt.name] = None
                frontier.append(nxt)
    return list(keep)


def _drop_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Remove ``float32 -> Cast(fp16) -> Cast(fp32)`` round trips; return how many were cut.

    The converter casts every float32-kept node's output to fp16 and back before the next float32
    node, so a chain of kept nodes (RMSNorm statistics, the normalization tail, the graph output)
    would still pass through fp16 -- and overflow there. The second Cast then reads the float32
    tensor directly; first Casts left without consumers are deleted.
    """
    import onnx

    graph = model.graph
    dtype: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dtype[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        dtype[init.name] = init.data_type
    producer = {out: node for node in graph.node for out in node.output}

    def cast_to(node: Any) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    def source_type(name: str) -> int | None:
        return cast_to(producer.get(name)) or dtype.get(name)

    cut = 0
    for node in graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if cast_to(first) == onnx.TensorProto.FLOAT16 and source_type(first.input[0]) == onnx.TensorProto.FLOAT:
            node.input[0] = first.input[0]
            cut += 1

    graph_outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | graph_outputs
        dead = [n for n in graph.node if cast_to(n) is not None and not any(o in used for o in n.output)]
        if not dead:
            break
        dead_outputs = {o for n in dead for o in n.output}
        kept = [n for n in graph.node if n not in dead]
        graph.ClearField("node")
        graph.node.extend(kept)
        kept_vi = [vi for vi in graph.value_info if vi.name not in dead_outputs]
        graph.ClearField("value_info")
        graph.value_info.extend(kept_vi)
    return cut


def _topological_sort(model: onnx.ModelProto) -> None:
    """Restore the topological node order the ONNX spec requires (the converter appends its Casts)."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    ONNXModel(model).topological_sort()


def _drop_duplicate_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes identical to an earlier one (same op, inputs, outputs, attributes); return how many.

    ``convert_float_to_float16`` before onnxruntime 1.32 inserts one ``<x>_cast_to_fp32`` Cast per
    consumer of ``x`` -- the same node several times, which ONNX Runtime refuses to load ("two nodes
    with same node name"). 1.32 inserts one shared Cast, which is what this leaves.

    Raises:
        QuantizationError: two different nodes write the same output.
    """
    seen: dict[str, bytes] = {}
    keep = []
    for node in model.graph.node:
        signature = node.SerializeToString(deterministic=True)
        clashes = [seen[o] for o in node.output if o in seen]
        if clashes and all(c == signature for c in clashes) and len(clashes) == len(node.output):
            continue
        if clashes:
            raise QuantizationError(f"fp16 conversion left two different nodes writing {list(node.output)}")
        seen.update({o: signature for o in node.output})
        keep.append(node)
    removed = len(model.graph.node) - len(keep)
    if removed:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return removed


def _to_fp16(src: Path) -> tuple[onnx.ModelProto, str, dict[str, Any]]:
    from onnxruntime.transformers import float16

    model = _load(src)
    op_block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP16_FP32_OP_TYPES))
    node_block = fp16_fp32_nodes(model)
    if any(not n for n in node_block):
        raise QuantizationError(f"{src} has unnamed nodes in the float32 islands; re-export with named nodes")
    # The converter copies the whole proto (shape inference, its own loads): it gets the graph without its
    # float weights, and each weight is converted afterwards, one at a time, by the converter's own function.
    weights = _set_aside_inline_weights(model, float_only=True)
    model = _fp16_graph(float16, model, op_block, node_block)
    _restore_fp16_weights(float16, model, weights)
    duplicates = _drop_duplicate_nodes(model)
    round_trips = _drop_fp16_round_trips(model)
    _topological_sort(model)
    method = (
        "float16 weights and activations, float32 graph I/O (onnxruntime.transformers.float16); "
        "RMSNorm statistics, Pow and the pooling/L2-normalization tail kept float32"
    )
    settings = {
        "converter": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": True,
        "fp32_op_types": list(FP16_FP32_OP_TYPES),
        "fp32_nodes": len(node_block),
        "fp32_tail_roots": list(FP16_TAIL_ROOT_OPS),
        "fp16_round_trips_removed": round_trips,
        "duplicate_casts_removed": duplicates,
    }
    return model, method, settings


def _fp16_graph(float16: Any, model: onnx.ModelProto, op_block: list[str], node_block: list[str]) -> onnx.ModelProto:
    """``convert_float_to_float16`` on a graph whose float weights are placeholders: its value infos of
    converted initializers are built from their dims (its own helper would read the missing data)."""
    from onnx import helper

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        return float16.convert_float_to_float16(
            model, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX_FINITE, keep_io_types=True,
            op_block_list=op_block, node_block_list=node_block,
        )
    finally:
        float16.make_value_info_from_tensor = original


def _restore_fp16_weights(float16: Any, model: onnx.ModelProto, aside: dict[str, bytes]) -> None:
    """Put the set-aside weights back: as float16 (the converter's rounding and clipping) where the
    converter turned the placeholder into a float16 tensor, unchanged where it kept it float32.

    Raises:
        QuantizationError: a set-aside tensor is missing from the converted graph.
    """
    import numpy as np
    import onnx

    for tensor in model.graph.initializer:
        if tensor.name not in aside:
            continue
        data = aside.pop(tensor.name)
        if tensor.data_type == onnx.TensorProto.FLOAT16:
            data = float16.convert_np_to_float16(np.frombuffer(data, dtype=np.float32), FP16_MIN_POSITIVE,
                                                 FP16_MAX_FINITE).tobytes()
        tensor.raw_data = data
        tensor.ClearField("data_location")
        del tensor.external_data[:]
    if aside:
        raise QuantizationError(f"the fp16 converter dropped {len(aside)} initializer(s), e.g. {next(iter(aside))}")


# --- int8 -------------------------------------------------------------------------------------


def _to_int8(
    src: Path, *, fp32_down_layers: int, per_channel: bool, reduce_range: bool, activation_scales: str = "token",
    embeddings: bool = True, block_size: int = 32,
) -> tuple[onnx.ModelProto, str, dict[str, Any]]:
    model = _load(src, min_opset=int8_pertoken.MIN_OPSET if activation_scales == "token" else None)
    _name_nodes(model)
    matmuls = _weight_matmuls(model)
    if not matmuls:
        raise QuantizationError(f"{src} has no MatMul with a constant 2-D weight: nothing to quantize")
    layers = _layers(matmuls)
    excluded = [layer[-1].name for layer in layers[: max(fp32_down_layers, 0)]]
    if activation_scales == "token":
        bits = 7 if reduce_range else 8
        targets = [m.name for m in matmuls if m.name not in excluded]
        int8_pertoken.rewrite_matmuls(model, targets, weight_bits=bits)
        tables = embedding_int8.rewrite_gathers(model, _embedding_gathers(model)[0], block_size=block_size) \
            if embeddings else []
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
        quantized = _load(tmp_out)
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
) -> onnx.ModelProto:
    nbits = _import_nbits_quantizer()
    quant_axes = (("MatMul", 0), ("Gather", 1))
    if algorithm == "hqq":
        _require("torch")
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
    quantizer.process()
    return quantizer.model.model


def _to_int4(
    src: Path,
    *,
    block_size: int,
    algorithm: str,
    last_8bit_layers: int,
    embeddings: bool,
    accuracy_level: int | None,
) -> tuple[onnx.ModelProto, str, dict[str, Any]]:
    model = _load(src, min_opset=GATHER_QUANT_OPSET if embeddings else None)
    _name_nodes(model)
    matmuls = _weight_matmuls(model)
    if not matmuls:
        raise QuantizationError(f"{src} has no MatMul with a constant 2-D weight: nothing to quantize")
    layers = _layers(matmuls)
    activations = _activation_type(model)
    n8 = min(max(last_8bit_layers, 0), len(layers))
    eight_bit = [m.name for layer in (layers[len(layers) - n8 :] if n8 else []) for m in layer]
    tables, other_gathers = _embedding_gathers(model) if embeddings else ([], [])

    if tables:
        model = _nbits(
            model, bits=4, block_size=block_size, algorithm="rtn", op_types=("Gather",),
            exclude=other_gathers, accuracy_level=None,
        )
    model = _nbits(
        model, bits=4, block_size=block_size, algorithm=algorithm, op_types=("MatMul",),
        exclude=eight_bit, accuracy_level=accuracy_level,
    )
    if eight_bit:  # the MatMuls left as float32 by the 4-bit pass are exactly the 8-bit ones
        model = _nbits(
            model, bits=8, block_size=block_size, algorithm="rtn", op_types=("MatMul",),
            exclude=(), accuracy_level=accuracy_level,
        )
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
        "opset": _opset(model),
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
