"""8-bit embedding tables: ``Gather(table, ids)`` -> ``GatherBlockQuantized`` (com.microsoft, ONNX Runtime).

The int8 precision quantizes the MatMuls (``int8_pertoken``) but a ``Gather`` over a float32 table stays
float32, and for the Qwen3 family that table is most of the file: 151,669 x 1,024 floats = 621 MB of
Qwen3-Embedding-0.6B's 2.3 GB. Here each row is cut into blocks of ``block_size`` values, and each block
is stored as uint8 with its own scale and zero point (asymmetric, round to nearest):

    scale = (max - min) / 255        zero_point = round(-min / scale)        q = round(x / scale) + zero_point

so a looked-up value is off by at most ``scale / 2`` (about 0.2 % of its block's range), and the table
shrinks to ~28 % of its float32 size (1 byte per value + 5 bytes per block). ONNX Runtime's own weight-only
quantizer does Gather at 4 bits only; its ``GatherBlockQuantized`` kernel takes 8-bit data too
(``bits=8``, uint8 data and zero points, float32 scales; CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from tritonembed.export.onnx_graph import CONTRIB_DOMAIN, import_contrib_domain

if TYPE_CHECKING:  # pragma: no cover
    import onnx

log = logging.getLogger("tritonembed.export.embedding_int8")

_SUFFIXES = ("_q8", "_q8_scales", "_q8_zero_points")


def quantize_blocks(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``table[V, D]`` -> (uint8 data ``[V, D]``, float32 scales ``[V, D / block_size]``, uint8 zero points).

    Raises:
        ValueError: ``table`` is not 2-D or ``D`` is not a multiple of ``block_size``.
    """
    if table.ndim != 2 or table.shape[1] % block_size:
        raise ValueError(f"need a 2-D table whose rows are a multiple of {block_size} long, got {table.shape}")
    rows, width = table.shape
    blocks = table.astype(np.float32).reshape(rows, width // block_size, block_size)
    low = np.minimum(blocks.min(axis=-1), 0.0)  # the range always holds 0, so 0 is exact
    high = np.maximum(blocks.max(axis=-1), 0.0)
    scale = ((high - low) / 255.0).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero block
    zero_point = np.clip(np.rint(-low / scale), 0, 255).astype(np.uint8)
    data = np.clip(np.rint(blocks / scale[..., None]) + zero_point[..., None], 0, 255).astype(np.uint8)
    return data.reshape(rows, width), scale, zero_point


def dequantize_blocks(data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """The float32 table that :func:`quantize_blocks`'s output stands for (what the kernel computes)."""
    rows, width = data.shape
    block = width // scale.shape[1]
    q = data.reshape(rows, -1, block).astype(np.float32) - zero_point[..., None].astype(np.float32)
    return (q * scale[..., None]).reshape(rows, width)


# Rows quantized at once: the arithmetic makes several float32 temporaries of its input's size.
CHUNK_ROWS = 8192


def quantize_rows(read_rows: Callable[[int, int], np.ndarray], rows: int, block_size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`quantize_blocks` of a ``rows``-row table read :data:`CHUNK_ROWS` rows at a time by
    ``read_rows(first, count)``: the same arrays (each block lies within one row)."""
    parts = [quantize_blocks(read_rows(first, min(CHUNK_ROWS, rows - first)), block_size)
             for first in range(0, rows, CHUNK_ROWS)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def rewrite_gathers(model: onnx.ModelProto, names: list[str], *, block_size: int = 32,
                    read_rows: Callable[[onnx.TensorProto, int, int], np.ndarray] | None = None) -> list[str]:
    """Replace each named ``Gather`` over a 2-D float32 initializer (axis 0) with an 8-bit ``GatherBlockQuantized``.

    A table is left alone (and logged) when another node also reads it, its rows are not a multiple of
    ``block_size`` long, or the Gather is not along axis 0. The model must import opset >= 21 and
    ``com.microsoft`` is added. Returns the names of the Gathers rewritten. ``read_rows(table, first, count)``
    gives a table's rows (default: from the tensor itself); a graph whose tables are external references
    passes one that reads them from their file.
    """
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    wanted = set(names)
    done: list[str] = []
    for index, node in enumerate(list(model.graph.node)):
        if node.op_type != "Gather" or node.name not in wanted:
            continue
        table = inits.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        why = None
        if table is None or len(table.dims) != 2 or table.data_type != onnx.TensorProto.FLOAT:
            why = "not a 2-D float32 initializer"
        elif readers.get(table.name, 0) != 1:
            why = "the table has other readers"
        elif axis != 0:
            why = f"gathers along axis {axis}"
        elif table.dims[1] % block_size:
            why = f"rows of {table.dims[1]} are not a multiple of {block_size}"
        if why:
            log.info("embedding table of %s kept float32: %s", node.name, why)
            continue
        if read_rows is None:
            data, scale, zero_point = quantize_blocks(numpy_helper.to_array(table), block_size)
        else:
            data, scale, zero_point = quantize_rows(lambda first, count, t=table: read_rows(t, first, count),
                                                    int(table.dims[0]), block_size)
        q_name, s_name, z_name = (table.name + suffix for suffix in _SUFFIXES)
        model.graph.initializer.remove(table)
        model.graph.initializer.extend([numpy_helper.from_array(data, q_name), numpy_helper.from_array(scale, s_name),
                                        numpy_helper.from_array(zero_point, z_name)])
        replacement = helper.make_node(
            "GatherBlockQuantized", [q_name, node.input[1], s_name, z_name], list(node.output),
            name=node.name + "_q8", domain=CONTRIB_DOMAIN, gather_axis=0, quantize_axis=1,
            block_size=block_size, bits=8)
        model.graph.node.remove(node)
        model.graph.node.insert(index, replacement)
        done.append(node.name)
    if done:
        import_contrib_domain(model)
    return done
