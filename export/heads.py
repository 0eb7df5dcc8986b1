"""The torch side of the spec's declared poolings and heads (:data:`tritonembed.spec.POOLINGS`, ``HEADS``).

A pooling picks one vector per row from the backbone's hidden states; a head turns that vector into a
declared output. Both are looked up by the name the spec declares; a test checks that every declared
name has an implementation here. Adding a pooling or a head = its name in the spec + a function here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tritonembed.errors import ExportError

POOLINGS: dict[str, Callable[[Any, Any], Any]] = {}
HEADS: dict[str, Callable[..., Any]] = {}


def pooling(name: str):
    """Register ``fn(hidden [B, L, H], attention_mask [B, L]) -> [B, H]`` as the pooling ``name``."""
    def register(fn):
        POOLINGS[name] = fn
        return fn
    return register


def head(name: str):
    """Register ``fn(pooled [B, H], spec, backbone) -> [B, ...]`` as the head ``name``."""
    def register(fn):
        HEADS[name] = fn
        return fn
    return register


@pooling("last_token")
def last_token(hidden, attention_mask):
    """Per row the last position whose mask is 1: right for left, right and mixed padding alike."""
    import torch

    positions = torch.arange(attention_mask.shape[1], device=hidden.device).unsqueeze(0) * attention_mask
    last = positions.argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@pooling("cls")
def cls(hidden, attention_mask):
    return hidden[:, 0]


@pooling("mean")
def mean(hidden, attention_mask):
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


@head("embedding")
def embedding(pooled, spec, backbone=None):
    """The pooled vector, L2-normalized when the spec says so."""
    import torch

    if spec.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
    return pooled


#: Name of the buffer a reranker's backbone carries (see tritonembed.export.families.Qwen3RerankerFamily).
YES_NO_DIRECTION = "tritonembed_yes_no_direction"


@head("yes_no_logit")
def yes_no_logit(pooled, spec, backbone):
    """``logit(yes) - logit(no)`` of the last position as one [B, 1] score: the pooled (final-normed) row
    times ``lm_head[yes] - lm_head[no]``, never the vocabulary-sized logits."""
    direction = getattr(backbone, YES_NO_DIRECTION)
    return (pooled * direction.to(pooled.dtype)).sum(dim=1, keepdim=True)


def pooling_fn(name: str):
    """Raises: ExportError for a pooling without an implementation here."""
    try:
        return POOLINGS[name]
    except KeyError:
        raise ExportError(f"no torch implementation of pooling {name!r}; have {sorted(POOLINGS)}") from None


def head_fn(name: str):
    """Raises: ExportError for a head without an implementation here."""
    try:
        return HEADS[name]
    except KeyError:
        raise ExportError(f"no torch implementation of head {name!r}; have {sorted(HEADS)}") from None


def fused_with_heads(fused, backbone, spec):
    """The spec's heads on top of a fused decoder that returns the unnormalized last-token row."""
    import torch

    heads = [head_fn(out.head) for out in spec.outputs]

    class FusedWithHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fused = fused

        def forward(self, input_ids, attention_mask):
            pooled = self.fused(input_ids, attention_mask)
            outs = tuple(h(pooled, spec, backbone) for h in heads)
            return outs[0] if len(outs) == 1 else outs

    return FusedWithHeads().eval()
