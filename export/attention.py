"""Fused attention for the exported Qwen3 graph: one ``com.microsoft.GroupQueryAttention`` node per layer.

Traced as is, transformers' Qwen3 attention becomes MatMul -> Softmax -> MatMul on a (batch, heads, L, L)
score tensor: memory grows with the square of the input (4 GiB for one 8k text on the tiny test model).
ONNX Runtime's GroupQueryAttention (GQA) runs causal grouped-query attention with flash / memory-efficient
kernels instead (CPU: fp32 flash path, O(L) memory; CUDA: fp16/bf16), but only on RIGHT-padded rows:
``seqlens_k`` = length - 1 per row, ``total_sequence_length`` = the padded width.

:class:`FusedQwen3Encoder` therefore runs the decoder itself around the HF modules' weights:

1. each row's first and last real token (``ArgMax`` of the mask and of position x mask) come from
   ``attention_mask``, so left, right and mixed padding all work (the mask must be one run of ones per
   row, as the tokenizer writes it; an all-zero row counts as one token);
2. every row is gathered into right-padded order and runs with positions 0..len-1 (what a single unpadded
   text gets, so batching changes nothing; RoPE only sees relative positions, so the left-padded
   reference's shifted positions give the same answer);
3. q/k RMS norms and rotary embeddings stay ordinary traced ops before the fused node;
4. the embedding is the hidden state at len - 1, L2-normalized.

The fused node comes from :class:`GroupQueryAttentionFunction`, an ``autograd.Function`` whose ``forward``
computes the same attention with PyTorch's SDPA (so tracing and eager checks work) and whose ``symbolic``
emits the contrib op for the TorchScript exporter. Positions past a row's length are garbage by design:
causal attention keeps them out of every real position.
"""

from __future__ import annotations

import logging
from typing import Any

from tritonembed.errors import ExportError
from tritonembed.export.onnx_graph import CONTRIB_DOMAIN, subgraphs

log = logging.getLogger(__name__)

GQA_OP = "GroupQueryAttention"
GQA_DOMAIN = CONTRIB_DOMAIN
# What report.json says for each graph form (key ``graph.attention.kind``).
FUSED_GQA = "com.microsoft.GroupQueryAttention"
FUSED_MHA = "com.microsoft.MultiHeadAttention"  # BERT-family graphs (tritonembed.export.bert_attention)
UNFUSED = "unfused (MatMul -> Softmax -> MatMul on the full score matrix)"


def _require_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ExportError(f"fused attention needs torch ({exc}); install it with: pip install 'tritonembed[export]'") from exc
    return torch


def gqa_function() -> Any:
    """The ``torch.autograd.Function`` emitting GroupQueryAttention (built lazily: torch is an extra)."""
    torch = _require_torch()

    def absent(g):
        """An omitted optional input (an empty name in the ONNX node)."""
        node = g.op("prim::Constant")
        node.setType(torch._C.OptionalType.ofTensor())
        return node

    class GroupQueryAttentionFunction(torch.autograd.Function):
        """Causal GQA on right-padded rows: (B, S, H*D) query, (B, S, KV*D) key/value -> (B, S, H*D)."""

        @staticmethod
        def forward(ctx, query, key, value, seqlens_k, total_sequence_length, num_heads: int,
                    kv_num_heads: int, scale: float):
            batch, length, _ = query.shape
            head_dim = query.shape[-1] // num_heads
            q = query.view(batch, length, num_heads, head_dim).transpose(1, 2)
            k = key.view(batch, length, kv_num_heads, head_dim).transpose(1, 2)
            v = value.view(batch, length, kv_num_heads, head_dim).transpose(1, 2)
            # causal alone is exact for every real position of a right-padded row
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                   enable_gqa=num_heads != kv_num_heads)
            return out.transpose(1, 2).reshape(batch, length, num_heads * head_dim)

        @staticmethod
        def symbolic(g, query, key, value, seqlens_k, total_sequence_length, num_heads, kv_num_heads, scale):
            # inputs: query, key, value, past_key, past_value, seqlens_k, total_sequence_length; without the
            # present_key / present_value outputs ORT 1.32's CPU kernel materializes the scores (8k: +1 GiB)
            outputs = g.op(f"{GQA_DOMAIN}::{GQA_OP}", query, key, value, absent(g), absent(g), seqlens_k,
                           total_sequence_length,
                           num_heads_i=num_heads, kv_num_heads_i=kv_num_heads, scale_f=scale, outputs=3)
            outputs[0].setType(query.type())
            return outputs[0]

    return GroupQueryAttentionFunction


def build_fused_qwen3_encoder(backbone: Any, normalize: bool = True) -> Any:
    """Wrap a transformers ``Qwen3Model`` as ``forward(input_ids, attention_mask) -> embedding`` with GQA.

    The backbone's modules (and weights) are shared, not copied or modified.

    Raises:
        ExportError: the backbone is not shaped like a Qwen3 decoder (no ``layers[i].self_attn.q_norm``),
            or uses sliding-window attention (GQA's local window is not wired).
    """
    torch = _require_torch()
    config = backbone.config
    try:
        layers = list(backbone.layers)
        attn = layers[0].self_attn
        _ = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, attn.q_norm, attn.k_norm)
    except (AttributeError, IndexError) as exc:
        raise ExportError(f"fused attention expects a Qwen3 decoder ({type(backbone).__name__}): {exc}") from exc
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise ExportError("fused attention does not support sliding-window layers; export with unfused attention")
    num_heads = int(config.num_attention_heads)
    kv_heads = int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    scale = float(attn.scaling)
    gqa = gqa_function()
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    class FusedQwen3Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def attention(self, module, hidden, cos, sin, seqlens_k, total):
            batch, length, _ = hidden.shape
            q = module.q_norm(module.q_proj(hidden).view(batch, length, num_heads, head_dim)).transpose(1, 2)
            k = module.k_norm(module.k_proj(hidden).view(batch, length, kv_heads, head_dim)).transpose(1, 2)
            v = module.v_proj(hidden)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q = q.transpose(1, 2).reshape(batch, length, num_heads * head_dim)
            k = k.transpose(1, 2).reshape(batch, length, kv_heads * head_dim)
            out = gqa.apply(q, k, v, seqlens_k, total, num_heads, kv_heads, scale)
            return module.o_proj(out)

        def forward(self, input_ids, attention_mask):
            model = self.backbone
            mask = attention_mask.to(torch.int64)
            length = mask.shape[1]
            steps = torch.arange(length, device=input_ids.device).unsqueeze(0)
            # first and last real token by ArgMax, not a ReduceSum: the fp16 converter keeps everything
            # downstream of a ReduceSum in float32 (export/quantize.py), which would be every layer here
            first = mask.argmax(dim=1)
            last = (steps * mask).argmax(dim=1)
            lengths = last - first + 1
            index = (first.unsqueeze(1) + steps).clamp(max=length - 1)
            ids = torch.gather(input_ids, 1, index)  # every row right-padded
            seqlens_k = (lengths - 1).to(torch.int32)
            total = torch.onnx.operators.shape_as_tensor(input_ids)[1].to(torch.int32)
            hidden = model.embed_tokens(ids)
            cos, sin = model.rotary_emb(hidden, steps)
            for layer in model.layers[: config.num_hidden_layers]:  # Qwen3DecoderLayer.forward, spelled out
                residual = hidden
                hidden = residual + self.attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin,
                                                   seqlens_k, total)
                residual = hidden
                hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = model.norm(hidden)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            return pooled

    return FusedQwen3Encoder().eval()


def computes(node: Any, domain: str, op: str) -> bool:
    """Whether ``node`` is ``domain.op`` or an ``If`` whose branches hold it (the BERT graphs' attention)."""
    if node.op_type == op and node.domain == domain:
        return True
    return node.op_type == "If" and any(computes(inner, domain, op) for sub in subgraphs(node) for inner in sub.node)


def graph_attention(model: Any) -> dict[str, Any]:
    """What attention an ONNX ModelProto computes: ``{"kind": ..., "nodes": n}`` for report.json."""
    for kind in (FUSED_GQA, FUSED_MHA):
        domain, op = kind.rsplit(".", 1)
        fused = sum(1 for n in model.graph.node if computes(n, domain, op))
        if fused:
            return {"kind": kind, "nodes": fused}
    softmax = sum(1 for n in model.graph.node if n.op_type == "Softmax")
    return {"kind": UNFUSED, "softmax_nodes": softmax}
