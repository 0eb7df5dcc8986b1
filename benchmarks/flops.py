"""Floating-point work of a Qwen3 encoder pass, for model-FLOPs utilization (MFU).

A pass over ``rows`` sequences padded to ``length`` tokens costs, per transformer layer,

* the weight matrices: ``2 * tokens * (q + k + v + o + gate + up + down parameters)``, and
* attention: ``2 * 2 * rows * length**2 * heads * head_dim`` (scores ``Q K^T`` and ``P V``), counted
  in full: the exported graph multiplies the whole square and masks it, it does not skip the
  causal half.

Norms, rotary embeddings, softmax and pooling are left out (a fraction of a percent). ``useful``
FLOPs count only real tokens (each row at its own length): MFU reports those, so padding is a loss,
not work. Peak rates are the vendor's dense tensor-core figures; see :data:`PEAK_DENSE_FP16`.
"""

from __future__ import annotations

from collections.abc import Sequence

from tritonembed.export.testmodels import Qwen3Shape

#: Dense FP16/BF16 tensor-core peak (FLOP/s) by GPU name fragment, from the vendors' datasheets
#: (SXM parts). Matched case-insensitively against the name the driver reports.
PEAK_DENSE_FP16: dict[str, float] = {
    "H200": 989.4e12,
    "H100 80GB HBM3": 989.4e12,  # SXM
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.5e12,
    "A100": 312.0e12,
    "L40S": 362.05e12,
    "L4": 121.0e12,
    "A10G": 70.0e12,
}


def layer_weight_parameters(shape: Qwen3Shape) -> int:
    """Parameters of one layer's weight matrices (attention projections and the gated MLP)."""
    h, d = shape.hidden_size, shape.head_dim
    attention = h * shape.num_attention_heads * d * 2 + h * shape.num_key_value_heads * d * 2
    return attention + 3 * h * shape.intermediate_size


def pass_flops(shape: Qwen3Shape, rows: int, length: int) -> float:
    """FLOPs of one encoder pass over ``rows`` sequences padded to ``length`` tokens."""
    tokens = rows * length
    linear = 2.0 * tokens * layer_weight_parameters(shape)
    attention = 4.0 * rows * length * length * shape.num_attention_heads * shape.head_dim
    return shape.num_hidden_layers * (linear + attention)


def useful_flops(shape: Qwen3Shape, lengths: Sequence[int]) -> float:
    """FLOPs of encoding each sequence alone at its own length (no padding)."""
    return sum(pass_flops(shape, 1, n) for n in lengths)


def peak_flops(gpu_name: str) -> float | None:
    """The dense FP16 peak of ``gpu_name`` (as the driver names it), or None when unknown."""
    name = gpu_name.lower()
    for fragment, peak in sorted(PEAK_DENSE_FP16.items(), key=lambda kv: -len(kv[0])):
        if fragment.lower() in name:
            return peak
    return None
