"""One causal attention op alone, on the CPU: ONNX Runtime's GroupQueryAttention, the opset-23 ``Attention``
(``is_causal=1``) and PyTorch's ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``.

The heads are the ``small`` shape's (8 query / 4 KV heads, head size 64), fp32, one sequence, two threads each.
Each op runs once to warm up, then once timed; outputs are checked against SDPA. Used by ``docs/long-inputs.md``
to say where the fused graph's attention time goes.

    python -m lab.attention_kernels --tokens 2048,4096,8192 [-o lab/results/attention-kernels-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
HEADS, KV_HEADS, HEAD_SIZE = 8, 4, 64


def _session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _gqa_model():
    from onnx import TensorProto, helper

    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total_len"], ["out"],
                            domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS)
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, None, HEADS * HEAD_SIZE]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, None, KV_HEADS * HEAD_SIZE]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, None, KV_HEADS * HEAD_SIZE]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_len", TensorProto.INT32, [])]
    graph = helper.make_graph([node], "gqa", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _attention23_model():
    from onnx import TensorProto, helper

    node = helper.make_node("Attention", ["q", "k", "v"], ["out"], is_causal=1, q_num_heads=HEADS, kv_num_heads=KV_HEADS)
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, heads, None, HEAD_SIZE])
              for name, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))]
    graph = helper.make_graph([node], "attention", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _timed(run) -> tuple[float, np.ndarray]:
    run()
    started = time.perf_counter()
    out = run()
    return time.perf_counter() - started, out


def _flat(x: np.ndarray) -> np.ndarray:
    """BNSH -> BS(NH), GroupQueryAttention's layout."""
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))


def _one_length(length: int, gqa, attention, rng: np.random.Generator) -> dict[str, Any]:
    import torch

    q = rng.standard_normal((1, HEADS, length, HEAD_SIZE), dtype=np.float32)
    k, v = (rng.standard_normal((1, KV_HEADS, length, HEAD_SIZE), dtype=np.float32) for _ in range(2))
    feeds = {"q": _flat(q), "k": _flat(k), "v": _flat(v), "seqlens_k": np.array([length - 1], np.int32),
             "total_len": np.array(length, np.int32)}
    qt, kt, vt = map(torch.from_numpy, (q, k, v))
    with torch.no_grad():
        sdpa_s, reference = _timed(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, enable_gqa=True).numpy())
    gqa_s, gqa_out = _timed(lambda: gqa.run(None, feeds)[0])
    attention_s, attention_out = _timed(lambda: attention.run(None, {"q": q, "k": k, "v": v})[0])
    reference = _flat(reference)
    return {"tokens": length, "gqa_s": round(gqa_s, 3), "attention23_s": round(attention_s, 3),
            "torch_sdpa_s": round(sdpa_s, 3), "gqa_max_abs_diff": float(np.abs(gqa_out - reference).max()),
            "attention23_max_abs_diff": float(np.abs(_flat(attention_out) - reference).max())}


def measure(lengths: Sequence[int], threads: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(threads)
    gqa, attention = _session(_gqa_model(), threads), _session(_attention23_model(), threads)
    rng = np.random.default_rng(0)
    rows = []
    for length in lengths:
        rows.append(_one_length(length, gqa, attention, rng))
        log.info("%s", rows[-1])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.attention_kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", default="2048,4096,8192", help="comma-separated sequence lengths")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    parser.add_argument("-o", "--output", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import onnxruntime as ort
    import torch

    rows = measure([int(t) for t in args.tokens.split(",")], args.threads)
    result = {"onnxruntime": ort.__version__, "torch": torch.__version__, "threads": args.threads,
              "heads": [HEADS, KV_HEADS, HEAD_SIZE], "rows": rows}
    text = json.dumps(result, indent=2) + "\n"
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
