"""Fused attention for BERT-family exports: one ``com.microsoft.MultiHeadAttention`` node per layer.

Traced as is, a BERT-like encoder's attention is MatMul -> Div -> Add(mask) -> Softmax -> MatMul on a
(batch, heads, L, L) score tensor, three copies of which are alive at once. ONNX Runtime's transformers
optimizer (``onnxruntime.transformers.optimizer``, shipped with onnxruntime) recognizes that pattern and
rewrites it into its fused operators; this module asks it for:

- ``MultiHeadAttention`` (not ``Attention``): the Q / K / V projections stay plain ``MatMul`` nodes, so the
  int8 and int4 quantizers see and quantize them as before; only the biases are packed into the node;
- the raw ``attention_mask`` as the key padding mask (not per-row lengths): any 0/1 mask gives the traced
  graph's answer, including masks a client builds itself;
- ``SkipLayerNormalization`` and ``BiasGelu`` for the residual + LayerNorm and the bias + GELU pairs;
- no ``EmbedLayerNormalization``: it recomputes position ids as 0..L-1, which is not what RoBERTa / XLM-R
  (positions after the padding index, from the mask) compute; the traced embeddings stay.

ONNX Runtime's own session-level optimizer fuses none of this for these graphs (measured: six Softmax nodes
remain in all-MiniLM-L6-v2 at ``ORT_ENABLE_ALL``). The optimizer runs with ``opt_level=0``: its Python fusions
only, nothing tied to this machine's CPU. Architectures whose attention does not match (MPNet's relative
position bias) keep the traced attention; report.json's ``graph.attention`` says which graph came out.

Each masked MultiHeadAttention is then wrapped in an ``If`` on "no row of the batch is padded": ONNX Runtime's
CPU kernel runs its flash path (memory linear in L) only without a key padding mask, and holds the
(batch, heads, L, L) scores once with one (not three copies, as the traced graph). Measured on a random
XLM-R with 4 heads, one 8,192-token text: +0.03 GiB (without the mask) vs +1.06 GiB (with it) vs +2.92 GiB
(traced). :mod:`tritonembed.model_repository.memory_model` prices a padded batch's scores once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonembed.errors import ExportError
from tritonembed.export.onnx_graph import CONTRIB_DOMAIN, import_contrib_domain

log = logging.getLogger(__name__)

#: report.json's ``graph.fused_operators`` key for the attention nodes that skip the mask when no row is padded.
UNMASKED_BRANCH = "If (MultiHeadAttention without the mask when no row is padded)"


@dataclass(frozen=True)
class BertHeads:
    """The two numbers the fusion needs to check each attention block it rewrites."""

    num_heads: int
    hidden_size: int

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> BertHeads:
        """From the checkpoint's config (DistilBERT's ``n_heads`` / ``dim`` too, through transformers' aliases).

        Raises:
            ExportError: the config has no head count or hidden size.
        """
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(checkpoint))
        try:
            return cls(int(config.num_attention_heads), int(config.hidden_size))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ExportError(f"{checkpoint}: no attention head count / hidden size in config.json ({exc})") from exc


def fuse_bert_attention(model: Any, heads: BertHeads) -> tuple[Any, dict[str, int]]:
    """``model`` (a ModelProto with its weights loaded) with its attention, residual LayerNorms and GELUs fused.

    Returns the new ModelProto and the count of each fused operator made (only those > 0).

    Raises:
        ExportError: the optimizer failed on this graph.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_multi_head_attention = True
    options.use_raw_attention_mask(True)
    options.enable_embed_layer_norm = False
    optimizer_log = logging.getLogger("onnxruntime.transformers")
    level = optimizer_log.level
    optimizer_log.setLevel(logging.WARNING)  # it logs every fusion it tries at INFO
    try:
        fused = optimize_model(model, model_type="bert", num_heads=heads.num_heads, hidden_size=heads.hidden_size,
                               optimization_options=options, opt_level=0)
    except Exception as exc:  # the optimizer raises asserts, KeyErrors, ... on graphs it does not expect
        raise ExportError(f"ONNX Runtime's transformers optimizer failed on the BERT graph: "
                          f"{type(exc).__name__}: {exc}") from exc
    finally:
        optimizer_log.setLevel(level)
    model = fused.model
    made = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
    unmasked = _skip_the_mask_when_no_row_is_padded(model)
    if made:
        import_contrib_domain(model)
    if unmasked:
        made[UNMASKED_BRANCH] = unmasked
    log.info("fused the BERT graph: %s", ", ".join(f"{n} {op}" for op, n in made.items()) or "nothing matched")
    return model, made


def _skip_the_mask_when_no_row_is_padded(model: Any) -> int:
    """Wrap each masked MultiHeadAttention in ``If(min(mask) == 1, without the mask, with it)``; returns how many.

    ONNX Runtime's CPU kernel runs its flash path (memory linear in L, about twice as fast at 8k tokens) only
    without a key padding mask; with one it holds the (batch, heads, L, L) scores once. A batch with no padded
    row (one long text alone, as the planner runs it, or rows of one length) needs no mask, so it takes the
    branch without it; a padded batch takes the branch with it. Both branches compute the same attention.
    """
    from onnx import TensorProto, helper

    masked = [n for n in model.graph.node if n.op_type == "MultiHeadAttention" and n.domain == CONTRIB_DOMAIN
              and len(n.input) > 4 and n.input[4] and not any(n.input[5:])]
    if not masked:
        return 0
    masks = {n.input[4] for n in masked}
    if len(masks) != 1:
        log.warning("BERT graph: %d different attention masks; the masked attention is kept as is", len(masks))
        return 0
    mask = masks.pop()
    lowest, no_padding = "/attention_mask/min", "/attention_mask/no_row_padded"
    prologue = [
        helper.make_node("ReduceMin", [mask], [lowest], name=lowest, keepdims=0),
        helper.make_node("Equal", [lowest, "/attention_mask/one"], [no_padding], name=no_padding),
    ]
    model.graph.initializer.append(helper.make_tensor("/attention_mask/one", TensorProto.INT32, [], [1]))
    nodes = list(model.graph.node)
    first = nodes.index(masked[0])
    replaced = {}
    for node in masked:
        out = node.output[0]
        branches = {}
        for branch, inputs in (("unmasked", list(node.input[:4])), ("masked", list(node.input[:5]))):
            inner = helper.make_node("MultiHeadAttention", inputs, [f"{out}/{branch}"], name=f"{node.name}/{branch}",
                                     domain=CONTRIB_DOMAIN)
            inner.attribute.extend(node.attribute)
            branches[branch] = helper.make_graph(
                [inner], f"{node.name}_{branch}", [],
                [helper.make_tensor_value_info(f"{out}/{branch}", TensorProto.FLOAT, None)])
        replaced[node.name] = helper.make_node("If", [no_padding], [out], name=f"{node.name}/if_no_row_padded",
                                               then_branch=branches["unmasked"], else_branch=branches["masked"])
    rewritten = [replaced.get(n.name, n) for n in nodes]
    del model.graph.node[:]
    model.graph.node.extend(rewritten[:first] + prologue + rewritten[first:])
    return len(masked)
