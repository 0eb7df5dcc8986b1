"""The ONNX graph plumbing the quantizers share: finding weight MatMuls, layers and embedding tables from the
graph structure (not node names), loading a graph with or without its external data, setting inline weights
aside while a weightless copy is rewritten, and saving with external data when the tensors need it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tritonembed.artifact import PROTOBUF_LIMIT_BYTES, external_data_file, needs_external_data
from tritonembed.errors import QuantizationError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

logger = logging.getLogger(__name__)

#: ONNX Runtime's contrib operators (GroupQueryAttention, MultiHeadAttention, MatMulNBits, ...).
CONTRIB_DOMAIN = "com.microsoft"


def import_contrib_domain(model: onnx.ModelProto) -> None:
    """Declare :data:`CONTRIB_DOMAIN` in ``model``'s opset imports when it is not yet: ONNX Runtime runs contrib
    nodes without it, onnx's checker and shape inference (the quantizers) need it."""
    from onnx import helper

    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs ``node`` holds as attributes (an ``If``'s branches, a ``Loop``'s body)."""
    return [g for attr in node.attribute for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


@dataclass(frozen=True)
class WeightMatMul:
    name: str
    k: int
    n: int


def require_module(module: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise QuantizationError(f"quantization needs {module}: pip install 'tritonembed[export]' ({exc})") from exc


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names so they can be listed in include/exclude lists."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_tritonembed_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def weight_matmuls(model: onnx.ModelProto) -> list[WeightMatMul]:
    """MatMuls whose B input is a 2-D float initializer, in graph (topological) order."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        tensor = inits[node.input[1]]
        if len(tensor.dims) == 2 and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            found.append(WeightMatMul(node.name, int(tensor.dims[0]), int(tensor.dims[1])))
    return found


def activation_type(model: onnx.ModelProto) -> str:
    """``float16`` when the graph's weight MatMuls take float16 weights (an fp16 export), else ``float32``."""
    import onnx

    inits = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and inits.get(node.input[1]) == onnx.TensorProto.FLOAT16:
            return "float16"
    return "float32"


def transformer_layers(matmuls: Sequence[WeightMatMul]) -> list[list[WeightMatMul]]:
    """Group weight MatMuls into transformer layers; each FFN down projection (largest K > N) ends one.

    MatMuls after the last down projection (e.g. a projection head) belong to no layer.
    """
    if not matmuls:
        return []
    k_max = max(m.k for m in matmuls)
    layers: list[list[WeightMatMul]] = []
    current: list[WeightMatMul] = []
    for m in matmuls:
        current.append(m)
        if m.k == k_max and m.k > m.n:
            layers.append(current)
            current = []
    return layers


def embedding_gathers(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
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


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every name the nodes of ``graph`` read, those read inside their subgraphs included (an ``If`` branch reads
    the outer graph's tensors by name, not through the ``If`` node's inputs)."""
    read = set()
    for node in graph.node:
        read.update(node.input)
        for sub in subgraphs(node):
            read |= names_read(sub)
    return read


def default_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def load_graph(path: Path, *, min_opset: int | None = None, external_data: bool = True) -> onnx.ModelProto:
    """Load a model with its external data, first upgrading it to ``min_opset`` if lower.

    The upgrade runs on the graph without its tensor data (so it works above 2 GB); external-data
    references survive onnx's version converter, and the data is read afterwards -- unless
    ``external_data=False``: then external tensors stay references into ``path``'s folder, for a caller
    that reads them one at a time (:func:`external_bytes`).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if min_opset is not None and default_opset(model) < min_opset:
        logger.info("upgrading %s from opset %d to %d", path.name, default_opset(model), min_opset)
        from onnx import version_converter

        # The converter copies the whole proto several times: it gets the graph with its inline weights
        # set aside (as placeholders it never reads), and they are put back by name afterwards.
        weights = set_aside_inline_weights(model)
        model = version_converter.convert_version(model, min_opset)
        restore_inline_weights(model, weights)
        if min_opset >= 21 and model.ir_version < 10:  # opset 21 (int4 types) needs IR 10
            model.ir_version = 10
    if external_data:
        read_external_data(model, path.parent)
    return model


SET_ASIDE_PLACEHOLDER = "tritonembed-set-aside"


def set_aside_inline_weights(model: onnx.ModelProto, *, float_only: bool = False) -> dict[str, bytes]:
    """Move the raw bytes of inline initializers above 1 KiB out of ``model``; they become external
    references to a placeholder location (:func:`restore_inline_weights` undoes it)."""
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
        entry.key, entry.value = "location", SET_ASIDE_PLACEHOLDER
    return aside


def restore_inline_weights(model: onnx.ModelProto, aside: dict[str, bytes]) -> None:
    """Raises: QuantizationError when a set-aside tensor is no longer in the graph as a placeholder."""
    import onnx

    for tensor in model.graph.initializer:
        if tensor.name in aside and tensor.data_location == onnx.TensorProto.EXTERNAL \
                and any(e.key == "location" and e.value == SET_ASIDE_PLACEHOLDER for e in tensor.external_data):
            tensor.raw_data = aside.pop(tensor.name)
            tensor.ClearField("data_location")  # unset, as before: the saved bytes stay the same
            del tensor.external_data[:]
    if aside:
        raise QuantizationError(f"the opset converter dropped {len(aside)} initializer(s), e.g. {next(iter(aside))}")


def read_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read every external tensor's bytes into the model (``onnx``'s own loader, minus its hard-link check).

    ``onnx.load`` refuses a data file with more than one hard link ("potential hardlink attack"), and
    the repository builder hard-links exported files into Triton repositories, so a served export
    could not be quantized again. The locations must stay inside ``base_dir``.

    Raises:
        QuantizationError: a location outside ``base_dir``, or a file shorter than its tensors.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            set_inline(tensor, external_bytes(tensor, base_dir))
    load_external_data_for_model(model, str(base_dir))  # anything left (tensors in attributes): onnx's loader


def external_bytes(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    """The bytes of one external tensor, read from its file (the tensor is left as it is).

    Protobuf keeps a message's data in an arena that only grows: bytes put into a tensor of a model stay
    allocated until the whole model is freed, even after the field is cleared. Streaming stages read the
    bytes here and put into the model only what it keeps.

    Raises:
        QuantizationError: a location outside ``base_dir``, or a file shorter than the tensor.
    """
    location, offset, length = _external_span(tensor, base_dir)
    with open(location, "rb") as f:
        f.seek(offset)
        data = f.read() if length is None else f.read(length)
    if length is not None and len(data) != length:
        raise QuantizationError(f"tensor {tensor.name}: {location} holds {len(data)} of {length} bytes")
    return data


def external_array(tensor: onnx.TensorProto, base_dir: Path) -> Any:
    """An initializer's values as a numpy array, not put into the model (:func:`external_bytes`): read from
    its file when it is an external reference, from the tensor itself otherwise."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(external_bytes(tensor, base_dir), dtype=dtype).reshape(tuple(tensor.dims))


def external_rows(tensor: onnx.TensorProto, base_dir: Path, first: int, count: int) -> Any:
    """Rows ``first .. first + count`` of a 2-D initializer (:func:`external_array`), only those read.

    Raises:
        QuantizationError: a location outside ``base_dir``, or a file shorter than the rows.
    """
    import numpy as np
    import onnx
    from onnx import helper

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return external_array(tensor, base_dir)[first:first + count]
    location, offset, _ = _external_span(tensor, base_dir)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    width = int(tensor.dims[1])
    data = np.fromfile(location, dtype=dtype, count=count * width, offset=offset + first * width * dtype.itemsize)
    if data.size != count * width:
        raise QuantizationError(f"tensor {tensor.name}: {location} is shorter than the tensor")
    return data.reshape(count, width)


def _external_span(tensor: onnx.TensorProto, base_dir: Path) -> tuple[Path, int, int | None]:
    """(file, offset, length or None) of an external tensor. Raises: QuantizationError when the file is
    outside ``base_dir``."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    root = Path(base_dir).resolve()
    location = (root / info["location"]).resolve()
    if root not in location.parents:
        raise QuantizationError(f"tensor {tensor.name}: external data {info['location']!r} is outside {root}")
    length = info.get("length")
    return location, int(info.get("offset", 0)), None if length is None else int(length)


def set_inline(tensor: onnx.TensorProto, data: bytes) -> None:
    """Make ``tensor`` an inline tensor holding ``data``."""
    import onnx

    tensor.raw_data = data
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def tensor_bytes(model: onnx.ModelProto) -> int:
    from onnx.numpy_helper import to_array

    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else to_array(t).nbytes
    return total


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# protobuf field tags (number << 3 | wire type 2, length-delimited): ModelProto.graph, GraphProto.initializer
_MODEL_GRAPH_TAG = _varint(7 << 3 | 2)
_GRAPH_INITIALIZER_TAG = _varint(5 << 3 | 2)


def write_inline(model: onnx.ModelProto, output: Path) -> None:
    """Write ``model`` as one file with its weights inline, serializing one initializer at a time.

    ``onnx.save`` serializes the whole proto into one bytes object first: a second copy of every weight (a
    1.2 GB fp16 graph costs 2.4 GB to save). Here the model without its graph, the graph without its
    initializers and then each initializer are serialized and written in turn; protobuf reads fields in any
    order and appends repeated ones, so the file loads as the same model.

    Raises:
        QuantizationError: the weights do not fit one protobuf (2 GiB); such a model needs external data.
    """
    graph = model.graph
    sizes = [t.ByteSize() for t in graph.initializer]
    graph_rest = _without(graph, "initializer")
    graph_length = len(graph_rest) + sum(len(_GRAPH_INITIALIZER_TAG) + len(_varint(n)) + n for n in sizes)
    if graph_length >= PROTOBUF_LIMIT_BYTES:
        raise QuantizationError(f"{output}: {graph_length / 1e9:.2f} GB of graph exceeds protobuf's 2 GiB limit")
    with open(output, "wb") as f:
        f.write(_without(model, "graph"))
        f.write(_MODEL_GRAPH_TAG + _varint(graph_length))
        f.write(graph_rest)
        for tensor, size in zip(graph.initializer, sizes):
            f.write(_GRAPH_INITIALIZER_TAG + _varint(size))
            f.write(tensor.SerializeToString())


def _without(message: Any, skipped: str) -> bytes:
    """``message`` serialized without one of its fields (the others copied into a fresh message)."""
    rest = type(message)()
    for field, value in message.ListFields():
        if field.name == skipped:
            continue
        if field.is_repeated:
            getattr(rest, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(rest, field.name).CopyFrom(value)
        else:
            setattr(rest, field.name, value)
    return rest.SerializeToString()


# External tensors start on 4 KiB boundaries, so ONNX Runtime can map them from the file.
EXTERNAL_ALIGNMENT = 4096


class ExternalDataWriter:
    """Appends tensors to one external-data file (``<model name>_data``, 4 KiB aligned) and points initializers
    into it: what the graph builder writes weights with and the traced export copies torch's files with."""

    def __init__(self, model_path: Path) -> None:
        self.path = external_data_file(model_path)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close(), the callers' finally
        self.bytes_written = 0

    def append(self, chunks: Iterable[Any]) -> tuple[int, int]:
        """Write one tensor's bytes from consecutive pieces (arrays or bytes, each dropped once written);
        returns its (offset, length)."""
        import numpy as np

        position = self._file.seek(0, 2)
        pad = -position % EXTERNAL_ALIGNMENT
        self._file.write(b"\0" * pad)
        length = 0
        for chunk in chunks:
            data = memoryview(np.ascontiguousarray(chunk)).cast("B") if not isinstance(chunk, bytes) else chunk
            self._file.write(data)  # an array's own buffer: no bytes copy
            length += len(data)
        self.bytes_written += length
        return position + pad, length

    def point(self, tensor: onnx.TensorProto, offset: int, length: int) -> None:
        """Make ``tensor`` an external reference to ``length`` bytes at ``offset`` of this file."""
        import onnx

        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def add(self, name: str, array: Any, data_type: int | None = None) -> onnx.TensorProto:
        """A new initializer holding ``array`` (``data_type``: the ONNX element type when the array's own is not
        it, e.g. bfloat16 as int16 words)."""
        import numpy as np
        from onnx import helper

        data = np.ascontiguousarray(array)
        element = data_type if data_type is not None else helper.np_dtype_to_tensor_dtype(data.dtype)
        return self.add_chunks(name, data.shape, element, [data])

    def add_chunks(self, name: str, shape: tuple[int, ...], data_type: int, chunks: Iterable[Any]) -> onnx.TensorProto:
        """A new initializer written from consecutive pieces (rows of a table)."""
        import onnx

        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = data_type
        tensor.dims.extend(shape)
        self.point(tensor, *self.append(chunks))
        return tensor

    def close(self) -> None:
        self._file.close()
        self.path.chmod(0o644)  # Triton in a container may run as another user


def save_graph(model: onnx.ModelProto, output: Path, external_data: bool | None) -> tuple[Path, ...]:
    """Write ``model``; external data goes to ``<output name>_data`` when asked or when too large."""
    import onnx

    data_path = external_data_file(output)
    for stale in (output, data_path):  # onnx appends to an existing data file
        if stale.exists():
            stale.unlink()
    use_external = needs_external_data(tensor_bytes(model)) if external_data is None else external_data
    if use_external:
        onnx.save_model(
            model, str(output), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_path.name, size_threshold=1024,
        )
        return (output, data_path) if data_path.exists() else (output,)
    write_inline(model, output)
    return (output,)
