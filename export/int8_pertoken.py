"""int8 with one activation scale per token: fast on CPU, and batch-invariant.

ONNX Runtime's dynamic quantization (``quantize_dynamic``) quantizes a MatMul's whole input tensor with
one scale, so a text's embedding depends on the other texts of its batch (measured min cosine 0.98
between a sentence alone and in a batch of 30). A server that batches requests together must not answer
differently depending on the neighbours, so this module rewrites each constant-weight MatMul
``x[..., K] @ W[K, N]`` as

    scale = max(|x|, over K) / 127                      one scale per token (row), shape [..., 1]
    q     = QuantizeLinear(x, scale, 128)               uint8, blocked over the whole K (opset 21)
    y     = MatMulIntegerToFloat(q, Wq, 1, w_scale, 128) * scale     (com.microsoft, ONNX Runtime)

with ``Wq`` int8 per output channel (symmetric). Each row's quantization depends on that row only and
the integer product is exact, so answers do not depend on the batch. Weights use a 7-bit range by
default, so the uint8 x int8 products cannot saturate the int16 pair sums of CPUs without VNNI.

The graph needs opset 21 (blocked ``QuantizeLinear``) and ONNX Runtime (the com.microsoft op).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tritonembed.export.onnx_graph import CONTRIB_DOMAIN, import_contrib_domain, names_read

if TYPE_CHECKING:  # pragma: no cover
    import onnx

MIN_OPSET = 21
_PREFIX = "tritonembed_int8_"


def weight_int8(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization of ``weight[K, N]``: ``(int8 [K, N], float32 scales [N])``."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(weight).max(axis=0), 1e-12).astype(np.float32) / qmax
    q = np.clip(np.rint(weight / scale), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def rewrite_matmuls(model: onnx.ModelProto, names: Collection[str], *, weight_bits: int = 7,
                    read_weight: Callable[[onnx.TensorProto], np.ndarray] | None = None) -> int:
    """Replace the MatMul nodes called ``names`` (constant 2-D weight as input 1) in place; returns how many.

    The model must already be at opset >= 21. Weights that no other node uses are dropped. ``read_weight``
    gives a weight's values (default: from the tensor itself); a graph whose weights are external
    references passes one that reads them from their file, one at a time.

    Raises:
        ValueError: ``weight_bits`` outside 2..8, or a named node is not a constant-weight MatMul.
    """
    from onnx import TensorProto, helper, numpy_helper

    if not 2 <= weight_bits <= 8:
        raise ValueError(f"weight_bits must be within 2..8, got {weight_bits}")
    wanted = set(names)
    inits = {t.name: t for t in model.graph.initializer}
    shared = {
        "eps": np.array(1e-10, np.float32),
        "inv127": np.array(1.0 / 127.0, np.float32),
        "zero": np.array(0.0, np.float32),
        "f128": np.array(128.0, np.float32),
        "u128": np.array(128, np.uint8),
        "one": np.array(1.0, np.float32),
        "axes": np.array([-1], np.int64),
    }
    new_inits = [numpy_helper.from_array(v, _PREFIX + k) for k, v in shared.items()]
    c = {k: _PREFIX + k for k in shared}
    nodes = []
    done = 0
    for node in model.graph.node:
        if node.name not in wanted:
            nodes.append(node)
            continue
        if node.op_type != "MatMul" or node.input[1] not in inits:
            raise ValueError(f"node {node.name!r} is not a MatMul with a constant weight")
        weight = (read_weight or numpy_helper.to_array)(inits[node.input[1]])
        if weight.ndim != 2:
            raise ValueError(f"node {node.name!r}: weight is {weight.ndim}-D, expected 2-D")
        wq, w_scale = weight_int8(weight.astype(np.float32), weight_bits)
        p = f"{_PREFIX}{done}_"
        new_inits += [numpy_helper.from_array(wq, p + "wq"), numpy_helper.from_array(w_scale, p + "wscale")]
        x = node.input[0]
        nodes += [
            helper.make_node("Abs", [x], [p + "abs"], name=p + "abs"),
            helper.make_node("ReduceMax", [p + "abs", c["axes"]], [p + "amax"], name=p + "amax", keepdims=1),
            helper.make_node("Mul", [p + "amax", c["inv127"]], [p + "s0"], name=p + "s0"),
            helper.make_node("Max", [p + "s0", c["eps"]], [p + "scale"], name=p + "scale"),
            # QuantizeLinear's zero point must have the scale's (dynamic) shape: 128 broadcast over it
            helper.make_node("Mul", [p + "scale", c["zero"]], [p + "z0"], name=p + "z0"),
            helper.make_node("Add", [p + "z0", c["f128"]], [p + "z1"], name=p + "z1"),
            helper.make_node("Cast", [p + "z1"], [p + "zp"], name=p + "zp", to=TensorProto.UINT8),
            helper.make_node("QuantizeLinear", [x, p + "scale", p + "zp"], [p + "q"], name=p + "q",
                             axis=-1, block_size=weight.shape[0]),
            helper.make_node("MatMulIntegerToFloat", [p + "q", p + "wq", c["one"], p + "wscale", c["u128"]],
                             [p + "mm"], name=p + "mm", domain=CONTRIB_DOMAIN),
            helper.make_node("Mul", [p + "mm", p + "scale"], list(node.output), name=p + "out"),
        ]
        done += 1
    if done != len(wanted):
        missing = sorted(wanted - {n.name for n in model.graph.node})
        raise ValueError(f"MatMul nodes not found: {missing}")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = names_read(model.graph)
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    import_contrib_domain(model)
    return done


def describe(excluded: Sequence[str], weight_bits: int) -> str:
    return (f"int8, per-token dynamic activation scales (batch-invariant): MatMul weights int8 per output channel, "
            f"{weight_bits}-bit range; activations uint8 with one scale per token; "
            f"{len(excluded)} FFN down projection(s) of the first layer(s) kept float32")
