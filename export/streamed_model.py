"""A transformers Qwen3 backbone whose weights are in memory only while their block runs.

The export's PyTorch reference is the model authors' usage code on ``AutoModel``; loading that model in
float32 costs 2x the bf16 checkpoint (the 4B: 15 GiB) on top of everything else the export holds. Here the
same ``Qwen3Model`` is built on the ``meta`` device (no memory), and a forward pre-hook on each block (the
embedding table, every decoder layer, the final norm) reads that block's tensors from the safetensors files
in float32 just before it runs; a forward hook puts them back on ``meta`` right after. The model's own
``forward`` (its masks, rotary embeddings and layers) runs unchanged, so the numbers are the ones
``AutoModel.from_pretrained(..., dtype=torch.float32)`` gives, bit for bit
(``tests/integration/test_qwen3_graph.py``), at the memory of one layer plus the embedding table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tritonembed.errors import ExportError
from tritonembed.export.checkpoint_tensors import CheckpointTensors

log = logging.getLogger(__name__)


@contextmanager
def streamed_qwen3_backbone(path: Path, attn_implementation: str = "eager") -> Iterator[Any]:
    """Yield a float32 ``Qwen3Model`` of ``path`` whose blocks load their weights only while they run.

    Use it for inference only (``torch.no_grad``); the weights are gone again when ``forward`` returns.

    Raises:
        ExportError: the config is not a Qwen3 decoder, or a weight is missing from the checkpoint.
    """
    import torch
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises OSError, ValueError, ...
        raise ExportError(f"cannot read the config of {path}: {type(exc).__name__}: {exc}") from exc
    with torch.device("meta"):
        model = AutoModel.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    try:
        blocks = [("embed_tokens", model.embed_tokens), ("norm", model.norm)]
        blocks += [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
        # rotary_emb's inv_freq is computed at construction, not stored: build it for real (a few numbers)
        model.rotary_emb = type(model.rotary_emb)(config=model.config)
    except AttributeError as exc:
        raise ExportError(f"{path} is not a Qwen3-style decoder ({type(model).__name__}): {exc}") from exc
    tensors = CheckpointTensors(Path(path))
    handles = []
    for prefix, block in blocks:
        handles.append(block.register_forward_pre_hook(_loader(tensors, prefix)))
        handles.append(block.register_forward_hook(_unloader))
    try:
        yield model.eval()
    finally:
        for handle in handles:
            handle.remove()


def _loader(tensors: CheckpointTensors, prefix: str):
    import torch

    def load(block: Any, _args: Any) -> None:
        block.to_empty(device="cpu")
        with torch.no_grad():
            for name, param in block.named_parameters():
                tensors.copy_into(f"{prefix}.{name}", param)  # float32 in place, read a chunk of rows at a time

    return load


def _unloader(block: Any, _args: Any, _output: Any) -> None:
    block.to_empty(device="meta")
