"""How much memory one encoder micro-batch needs, and how much the encoder may use: the token budget.

One owner for the estimate the planner (:func:`~tritonembed.model_repository.batching.plan_microbatches`) obeys on
CPU and GPU alike:

- **weights**: the bytes of the ONNX files (``model.onnx`` + ``model.onnx_data``), once per session;
- **activations per token**: the buffers ONNX Runtime keeps alive at once inside one layer (hidden-sized and
  intermediate-sized tensors, in the precision's compute dtype); its allocation planner reuses them across layers;
- **attention workspace**: a materialized graph (MatMul -> Softmax -> MatMul) holds about
  :data:`MATERIALIZED_SCORE_COPIES` ``heads x L x L`` score tensors per row; a fused graph
  (``com.microsoft.GroupQueryAttention``, report.json's ``graph.attention``) is linear in ``L``; the BERT
  graphs' ``com.microsoft.MultiHeadAttention`` is linear for a batch without padding and holds one copy of the
  scores for a padded one (ONNX Runtime's CPU kernel; :mod:`tritonembed.export.bert_attention`), priced as one
  copy whenever a micro-batch has more than one row.

The memory granted (``--gpu-memory`` in GiB or a fraction of the device; default what is free at start minus a
margin; on CPU the cgroup limit or MemAvailable) minus the weights is the activation budget. The estimate is
deliberately conservative; the memory guard (:mod:`~tritonembed.model_repository.memory_guard`) catches the rest.

Imports only the standard library and tritonembed's torch-free modules (``onnx`` lazily, optional) so the Triton
stub can load it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from tritonembed.artifact import onnx_files
from tritonembed.precisions import BY_NAME

log = logging.getLogger(__name__)

GIB = 1024**3
FUSED = "fused"
MATERIALIZED = "materialized"
FUSED_MASKED = "fused, scores once when padded"
#: The fused attention nodes (ONNX Runtime contrib ops), by op type, and how the estimate prices each.
FUSED_OPS = {"GroupQueryAttention": FUSED, "MultiHeadAttention": FUSED_MASKED}
#: report.json's ``graph.attention.kind`` -> how the estimate prices it (anything else: MATERIALIZED).
ATTENTION_KINDS = {f"com.microsoft.{op}": priced for op, priced in FUSED_OPS.items()}
#: Live hidden-sized / intermediate-sized tensors per token inside one layer (residual, norm, q/k/v/o, rotary
#: and casts; gate, up, activation x up), rounded up from the operators of the exported Qwen3/BERT graphs.
HIDDEN_COPIES = 12
INTERMEDIATE_COPIES = 4
#: Score tensors alive at once in a materialized graph (scores, mask added, softmax): 4.09 GiB peak RSS measured
#: for one 8,192-token text of a 6-head fp32 model is ~2.5 copies of its 1.5 GiB of scores (docs/serving.md).
MATERIALIZED_SCORE_COPIES = 3
#: Held back from what is free on a GPU at start: the CUDA context, cuBLAS / cuDNN workspaces, fragmentation.
GPU_MARGIN_BYTES = GIB
#: Held back on CPU from the cgroup limit / MemAvailable: the tokenizer, Triton and the stub themselves.
CPU_MARGIN_FRACTION = 0.2


class MemoryBudgetError(ValueError):
    """The memory granted cannot hold the model (or cannot be read / parsed)."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about one exported graph."""

    weights_bytes: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    attention: str  # FUSED, FUSED_MASKED or MATERIALIZED
    compute_bytes: int

    def activation_bytes(self, rows: int, length: int) -> int:
        """Peak bytes of activations for a padded micro-batch of ``rows`` x ``length`` tokens."""
        tokens = rows * length
        per_token = self.compute_bytes * (HIDDEN_COPIES * self.hidden_size + INTERMEDIATE_COPIES * self.intermediate_size)
        if self.attention == FUSED or (self.attention == FUSED_MASKED and rows == 1):
            return tokens * per_token
        # the graph materializes every head's L x L scores of a row (softmax in the compute dtype); the masked
        # fused kernel holds them once, in float32 whatever the precision
        if self.attention == FUSED_MASKED:
            return tokens * per_token + rows * self.heads * length * length * 4
        scores = rows * self.heads * length * length * self.compute_bytes * MATERIALIZED_SCORE_COPIES
        return tokens * per_token + scores

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TokenBudget:
    """The activation bytes one micro-batch may take, and the shape that prices it."""

    shape: ModelShape
    activation_bytes: int
    granted_bytes: int

    def fits(self, rows: int, length: int) -> bool:
        """Whether a padded micro-batch of ``rows`` x ``length`` stays within the budget."""
        return self.shape.activation_bytes(rows, length) <= self.activation_bytes

    def longest_text(self, limit: int = 1 << 20) -> int:
        """The most tokens one text alone may have (0: not even one token), searched up to ``limit``."""
        lo, hi = 0, limit
        while lo < hi:  # largest length that fits, by bisection (activation_bytes grows with length)
            mid = (lo + hi + 1) // 2
            if self.fits(1, mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def describe(self) -> str:
        return (f"{self.activation_bytes / GIB:.2f} GiB for activations of {self.granted_bytes / GIB:.2f} GiB granted "
                f"({self.shape.attention} attention, weights {self.shape.weights_bytes / GIB:.2f} GiB)")


def parse_grant(value: str | float | None) -> tuple[str, float] | None:
    """``--gpu-memory``'s value: ``("fraction", f)`` for a bare 0 < f <= 1, ``("bytes", n)`` for a bare number above
    1 (GiB) or a size with a unit (``512M``, ``20GiB``, ``123456B``); None when empty.

    Raises:
        MemoryBudgetError: not a positive number or size.
    """
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    if text[-1:].isalpha():
        from tritonembed.model_repository.memory_guard import parse_size

        try:
            size = parse_size(text[:-1] if text[-1] in "bB" and not text[-2:-1].isalpha() else text)
        except ValueError as exc:
            raise MemoryBudgetError(f"memory grant must be GiB (e.g. 20), a size (e.g. 512M) or a fraction of "
                                    f"the device (e.g. 0.8), got {value!r}") from exc
        if not size:
            raise MemoryBudgetError(f"memory grant must be > 0, got {value!r}")
        return ("bytes", float(size))
    try:
        number = float(text)
    except ValueError as exc:
        raise MemoryBudgetError(f"memory grant must be GiB (e.g. 20), a size (e.g. 512M) or a fraction of the "
                                f"device (e.g. 0.8), got {value!r}") from exc
    if not number > 0 or math.isinf(number):
        raise MemoryBudgetError(f"memory grant must be > 0, got {value!r}")
    return ("fraction", number) if number <= 1 else ("bytes", number * GIB)


def report_attention(directory: Path) -> str | None:
    """FUSED / FUSED_MASKED / MATERIALIZED from ``report.json``'s ``graph.attention`` in ``directory``; None
    without one."""
    path = Path(directory) / "report.json"
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("graph", {}).get("attention", {}).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    if not kind:
        return None
    return ATTENTION_KINDS.get(str(kind), MATERIALIZED)


def model_shape(model_path: Path, hidden_size: int, precision: str) -> ModelShape:
    """The shape of the exported graph at ``model_path``, read from the graph with ``onnx`` when installed.

    Without ``onnx`` (a lean Triton environment) the layers are estimated from the weights' bytes (12 x hidden²
    parameters per layer, the embedding counted as layers: an over-estimate), the intermediate size as 4 x hidden
    and 16 heads; the attention form comes from ``report.json`` beside the model, materialized when absent.

    Raises:
        MemoryBudgetError: ``model_path`` does not exist.
    """
    files = [p for p in onnx_files(Path(model_path)) if p.is_file()]
    if not files:
        raise MemoryBudgetError(f"{model_path} does not exist")
    weights = sum(p.stat().st_size for p in files)
    declared = BY_NAME.get(precision)
    compute = declared.compute_bytes if declared else 4
    attention = report_attention(Path(model_path).parent)
    try:
        graph = _graph_facts(Path(model_path), hidden_size)
    except ImportError:
        graph = None
    if graph is None:
        weight_bytes = declared.weight_bytes if declared else compute
        layers = max(1, int(weights / (weight_bytes * 12 * hidden_size * hidden_size)))
        return ModelShape(weights, hidden_size, 4 * hidden_size, layers, 16, attention or MATERIALIZED, compute)
    layers, heads, intermediate, fused = graph
    return ModelShape(weights, hidden_size, intermediate, layers, heads, fused or attention or MATERIALIZED, compute)


def _fused_attention_nodes(graph) -> list:
    """The fused attention nodes of ``graph``, one per layer: a BERT graph's ``If`` branches hold the same node twice
    (with and without the mask), the first branch counts."""
    found = []
    for node in graph.node:
        if node.op_type in FUSED_OPS:
            found.append(node)
        elif node.op_type == "If":
            found.extend(n for a in node.attribute if a.name == "then_branch" for n in _fused_attention_nodes(a.g))
    return found


def _graph_facts(model_path: Path, hidden_size: int) -> tuple[int, int, int, str | None] | None:
    """(layers, heads, intermediate size, how its fused attention is priced or None) from the graph's nodes and
    initializer dims.

    Raises:
        ImportError: ``onnx`` is not installed.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    fused_nodes = _fused_attention_nodes(model.graph)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    layers = len(fused_nodes) or len(softmax)
    if not layers:
        return None
    heads = 0
    for node in fused_nodes:
        for attr in node.attribute:
            if attr.name == "num_heads":
                heads = max(heads, int(attr.i))
    if not heads:
        heads = max(1, hidden_size // 32)  # heads are 32-128 wide (MiniLM 32): more heads is the safe side
    # the widest non-hidden dim of a 2-D weight that touches hidden is the MLP's (the vocab is the embedding's rows)
    dims = [tuple(i.dims) for i in model.graph.initializer if len(i.dims) == 2 and hidden_size in i.dims]
    embedding_rows = max((max(d) for d in dims), default=0)
    widths = [max(d) for d in dims if max(d) != embedding_rows]
    intermediate = max(widths, default=4 * hidden_size)
    priced = FUSED_MASKED if any(FUSED_OPS[n.op_type] == FUSED_MASKED for n in fused_nodes) else FUSED
    return layers, heads, max(intermediate, hidden_size), priced if fused_nodes else None


def device_memory(device_id: int) -> tuple[int, int]:
    """(free, total) bytes of CUDA device ``device_id`` from NVML.

    Raises:
        MemoryBudgetError: ``nvidia-ml-py`` is not installed or NVML cannot be read.
    """
    try:
        import pynvml
    except ImportError as exc:
        raise MemoryBudgetError("reading GPU memory needs nvidia-ml-py (pip install nvidia-ml-py), "
                                "or pass --gpu-memory in GiB") from exc
    try:
        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device_id))
        return int(info.free), int(info.total)
    except pynvml.NVMLError as exc:
        raise MemoryBudgetError(f"NVML could not read device {device_id}: {exc}") from exc


def host_memory() -> tuple[int, int]:
    """(available, limit) bytes for this process on the host: the cgroup v2 limit when set, else MemAvailable /
    MemTotal (``/proc/meminfo``).

    Raises:
        MemoryBudgetError: neither can be read (not Linux).
    """
    from tritonembed.model_repository.memory_guard import cgroup_memory, meminfo

    try:
        total, available = meminfo()
    except OSError as exc:
        raise MemoryBudgetError(f"cannot read /proc/meminfo: {exc}") from exc
    cgroup = cgroup_memory()
    if cgroup is not None:
        used, limit = cgroup
        return min(available, max(0, limit - used)), min(total, limit)
    return available, total


def granted_bytes(grant: str | None, *, device: str, device_id: int = 0) -> int:
    """The bytes the encoder may use: ``grant`` (GiB, or a fraction of the device / host limit), or by default
    what is free at start minus :data:`GPU_MARGIN_BYTES` (GPU) or :data:`CPU_MARGIN_FRACTION` (CPU).

    Raises:
        MemoryBudgetError: a bad ``grant``, or memory that cannot be read.
    """
    parsed = parse_grant(grant)
    if parsed is not None and parsed[0] == "bytes":
        return int(parsed[1])
    if device == "cuda":
        free, total = device_memory(device_id)
        return int(parsed[1] * total) if parsed else max(0, free - GPU_MARGIN_BYTES)
    available, limit = host_memory()
    return int(parsed[1] * limit) if parsed else int(available * (1 - CPU_MARGIN_FRACTION))


def token_budget(shape: ModelShape, granted: int, *, sessions: int = 1, concurrent: int = 1) -> TokenBudget:
    """The activation budget of one micro-batch: ``granted`` minus the weights of ``sessions`` sessions, shared by
    ``concurrent`` micro-batches running at once.

    Raises:
        MemoryBudgetError: the weights alone take what is granted.
    """
    left = granted - sessions * shape.weights_bytes
    if left <= 0:
        raise MemoryBudgetError(f"{granted / GIB:.2f} GiB granted cannot hold {sessions} x "
                                f"{shape.weights_bytes / GIB:.2f} GiB of weights; grant more memory (--gpu-memory)")
    return TokenBudget(shape, left // max(1, concurrent), granted)


def budget_for(model_path: Path, hidden_size: int, precision: str, grant: str | None, *, device: str,
               device_id: int = 0, sessions: int = 1, concurrent: int = 1) -> TokenBudget:
    """:func:`token_budget` of the model at ``model_path`` under ``grant`` (see :func:`granted_bytes`).

    Raises:
        MemoryBudgetError: see :func:`model_shape`, :func:`granted_bytes`, :func:`token_budget`.
    """
    shape = model_shape(model_path, hidden_size, precision)
    budget = token_budget(shape, granted_bytes(grant, device=device, device_id=device_id),
                          sessions=sessions, concurrent=concurrent)
    log.info("memory budget of %s: %s; one text alone may have %d tokens", os.path.basename(str(model_path)),
             budget.describe(), budget.longest_text())
    return budget
