"""Generate every ``config.pbtxt`` from the model spec: no hand-kept copy of names, dtypes or sizes.

Three models serve one embedding model NAME:

- ``NAME`` — the ensemble users call (TEXT in, EMBEDDING + TOKEN_COUNT out); it publishes the spec
  as JSON in its ``parameters`` so clients read dimensions/templates from the server.
- ``NAME_tokenizer`` — Python backend, dynamic batching, pads each request to a length bucket.
- ``NAME_encoder`` — the ONNX model through ONNX Runtime inside a Python-backend model (``encoder_model.py``)
  on both profiles: the CPU execution provider on ``KIND_CPU``, the CUDA one on ``KIND_GPU``, with the same
  length regrouping, memory budget (``memory_model.py``), memory guard and non-finite check. Triton's own
  ``onnxruntime`` backend stays an explicit GPU option (``gpu_backend="onnxruntime"``): batches bounded only by
  ``max_batch_size`` and ORT's arena cap, none of the above.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from tritonembed.precisions import precision
from tritonembed.spec import (
    ATTENTION_MASK,
    INPUT_IDS,
    SPEC_PARAMETER_KEY,
    TOKEN_COUNT,
    ModelSpec,
    TensorSpec,
    encoder_inputs,
)

PROFILES = ("cpu", "gpu")
SPINNING_MODES = ("always", "during_run", "never")
GPU_BACKENDS = ("python", "onnxruntime")
EXECUTION_PROVIDERS = ("cpu", "cuda")


def checked_spinning(mode: str) -> str:
    """``mode`` if it is one of SPINNING_MODES.

    Raises:
        ValueError: any other value (a typo in a flag or a hand-edited config.pbtxt).
    """
    if mode not in SPINNING_MODES:
        raise ValueError(f"intra_op_spinning must be one of {SPINNING_MODES}, got {mode!r}")
    return mode
# Internal tensor names between the ensemble's steps.
_IDS, _MASK = "_input_ids", "_attention_mask"


@dataclass(frozen=True)
class ServingOptions:
    """Knobs of the generated repository; the defaults suit a small CPU box or one GPU."""

    profile: str = "cpu"
    max_texts_per_request: int = 64
    tokenizer_max_batch: int = 256
    encoder_max_batch: int = 256
    # No queue delays: under load the encoder batches whatever queued while it ran (docs/serving.md).
    tokenizer_queue_delay_us: int = 0
    encoder_queue_delay_us: int = 0
    # 0 = unbounded: any default_queue_policy makes Triton 2.51's batcher miss wake-ups (docs/serving.md,
    # "Overload"); the gateway's admission limit refuses overload instead.
    max_queue_size: int = 0
    encoder_instances: int = 1
    tokenizer_instances: int = 1
    intra_op_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # CPU: when ONNX Runtime's threads busy-wait (SPINNING_MODES); "during_run" leaves the cores to the
    # tokenizer and Triton once a run returns (docs/serving.md, "Profiles").
    intra_op_spinning: str = "during_run"
    # CPU: padded tokens per micro-batch of rows regrouped by length (a longer text runs alone); small enough
    # for the activations to stay in the cores' caches (docs/serving.md, "Batching across lengths").
    max_tokens_per_batch: int = 512
    # CPU: micro-batches run this many at a time on a second single-threaded session (MicroBatchPool), only
    # with >= 2 intra-op threads and a model of at most MICROBATCH_POOL_MAX_MODEL_BYTES; 1 = off.
    microbatch_workers: int = 2
    pad_to_buckets: bool = True
    tensorrt: bool = False
    gpu_mem_limit_bytes: int | None = None
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    # GPU: "python" = encoder_model.py on the CUDA execution provider (token budget, guard, NaN check);
    # "onnxruntime" = Triton's backend, bounded only by max_batch_size and ORT's arena cap (a grant in bytes).
    gpu_backend: str = "python"
    # "" = the profile's (cpu / cuda); "cpu" on the gpu profile runs the GPU encoder's code path on KIND_CPU (tests).
    execution_provider: str = ""
    # GPU: padded tokens per micro-batch before the memory budget bounds it further.
    gpu_max_tokens_per_batch: int = 16384
    # Memory the encoder may use: GiB (> 1) or a fraction of the device / host limit (<= 1); "" = what is free at
    # start minus a margin (memory_model.granted_bytes).
    memory_grant: str = ""
    # Shed new work (UNAVAILABLE) at this fraction of the memory limit (memory_guard); 1.0 sheds only when full.
    memory_threshold: float = 0.9
    # A file whose content (bytes, or 4G / 512M) lowers the guard's limit at runtime; "" = none.
    memory_limit_file: str = ""
    # A higher-precision ONNX file in the encoder's folder that recomputes rows that came out non-finite.
    fallback_onnx_file: str = ""

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        checked_spinning(self.intra_op_spinning)
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0 (0: unbounded), got {self.max_queue_size}")
        if self.microbatch_workers < 1:
            raise ValueError(f"microbatch_workers must be >= 1, got {self.microbatch_workers}")
        if self.max_tokens_per_batch < 1:
            raise ValueError(f"max_tokens_per_batch must be >= 1, got {self.max_tokens_per_batch}")
        if not 0 < self.max_texts_per_request <= min(self.tokenizer_max_batch, self.encoder_max_batch):
            raise ValueError("max_texts_per_request must be > 0 and <= the tokenizer's and encoder's max batch")
        if self.gpu_backend not in GPU_BACKENDS:
            raise ValueError(f"gpu_backend must be one of {GPU_BACKENDS}, got {self.gpu_backend!r}")
        if self.execution_provider and self.execution_provider not in EXECUTION_PROVIDERS:
            raise ValueError(f"execution_provider must be one of {EXECUTION_PROVIDERS}, got {self.execution_provider!r}")
        if self.profile == "cpu" and self.execution_provider == "cuda":
            raise ValueError("the cpu profile runs the CPU execution provider; use profile='gpu' for cuda")
        if not 0 < self.memory_threshold <= 1:
            raise ValueError(f"memory_threshold must be in (0, 1], got {self.memory_threshold}")
        from tritonembed.model_repository.memory_model import parse_grant

        grant = parse_grant(self.memory_grant)  # MemoryBudgetError (a ValueError) for a bad value
        if (self.profile == "gpu" and self.gpu_backend == "onnxruntime" and not self.gpu_mem_limit_bytes
                and (grant is None or grant[0] != "bytes")):
            # its only memory bound is ORT's arena cap, which needs bytes when the repository is written
            raise ValueError("gpu_backend='onnxruntime' needs a memory grant in GiB or as a size (--gpu-memory 20): "
                             "Triton's onnxruntime backend has no token budget, only ORT's arena cap")

    @property
    def provider(self) -> str:
        """The encoder's ONNX Runtime execution provider: ``cpu`` or ``cuda``."""
        return self.execution_provider or ("cuda" if self.profile == "gpu" else "cpu")


def pbtxt_string(value: str) -> str:
    """Quote ``value`` as a protobuf text-format string literal (UTF-8 kept, quotes/backslashes/newlines escaped)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped + '"'


def tensor_block(kind: str, tensors: tuple[TensorSpec, ...], *, ragged: bool = False) -> str:
    entries = []
    for t in tensors:
        lines = [f"    name: {pbtxt_string(t.name)}", f"    data_type: {t.config_dtype}",
                 f"    dims: [ {', '.join(str(d) for d in t.dims)} ]"]
        if t.optional:
            lines.append("    optional: true")
        if ragged and kind == "input":
            lines.append("    allow_ragged_batch: true")
        entries.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{kind} [\n" + ",\n".join(entries) + "\n]"


def parameters_block(params: dict[str, str]) -> str:
    return "\n".join(
        f"parameters {{ key: {pbtxt_string(k)} value: {{ string_value: {pbtxt_string(v)} }} }}" for k, v in params.items()
    )


def queue_block(options: ServingOptions, *, delay_us: int, preferred: bool) -> str:
    pref = ""
    if preferred and options.preferred_batch_sizes:
        sizes = [s for s in options.preferred_batch_sizes if s <= options.encoder_max_batch]
        pref = f"  preferred_batch_size: [ {', '.join(map(str, sizes))} ]\n"
    policy = ""
    if options.max_queue_size:
        policy = f"  default_queue_policy {{\n    timeout_action: REJECT\n    max_queue_size: {options.max_queue_size}\n  }}\n"
    return "dynamic_batching {\n" + pref + f"  max_queue_delay_microseconds: {delay_us}\n" + policy + "}"


def python_encoder_parameters(options: ServingOptions) -> dict[str, str]:
    """The parameters ``encoder_model.py`` reads (names and defaults owned by ServingOptions)."""
    gpu = options.profile == "gpu"
    return {"execution_provider": options.provider,
            "intra_op_threads": str(options.intra_op_threads),
            "intra_op_spinning": options.intra_op_spinning,
            "max_tokens_per_batch": str(options.gpu_max_tokens_per_batch if gpu else options.max_tokens_per_batch),
            # one session per GPU: micro-batches side by side only pay on a small CPU
            "microbatch_workers": str(1 if gpu else options.microbatch_workers),
            "memory_grant": options.memory_grant,
            "memory_threshold": str(options.memory_threshold),
            "memory_limit_file": options.memory_limit_file,
            "fallback_onnx_file": options.fallback_onnx_file}


def tokenizer_outputs() -> tuple[TensorSpec, ...]:
    return (INPUT_IDS, ATTENTION_MASK, TOKEN_COUNT)


def ensemble_config(spec: ModelSpec, options: ServingOptions) -> str:
    ins = spec.serving_inputs
    tok_in = "\n".join(f'      input_map {{ key: "{t.name}" value: "{t.name}" }}' for t in ins)
    encoder_out = "\n".join(f'      output_map {{ key: "{o.encoder_name}" value: "{o.name}" }}' for o in spec.outputs)
    return f"""name: {pbtxt_string(spec.name)}
platform: "ensemble"
max_batch_size: {options.max_texts_per_request}
{tensor_block("input", ins)}
{tensor_block("output", spec.ensemble_outputs)}
ensemble_scheduling {{
  step [
    {{
      model_name: {pbtxt_string(spec.tokenizer_model_name)}
      model_version: -1
{tok_in}
      output_map {{ key: "{INPUT_IDS.name}" value: "{_IDS}" }}
      output_map {{ key: "{ATTENTION_MASK.name}" value: "{_MASK}" }}
      output_map {{ key: "{TOKEN_COUNT.name}" value: "{TOKEN_COUNT.name}" }}
    }},
    {{
      model_name: {pbtxt_string(spec.encoder_model_name)}
      model_version: -1
      input_map {{ key: "{INPUT_IDS.name}" value: "{_IDS}" }}
      input_map {{ key: "{ATTENTION_MASK.name}" value: "{_MASK}" }}
{encoder_out}
    }}
  ]
}}
{parameters_block({SPEC_PARAMETER_KEY: json.dumps(spec.to_dict(), sort_keys=True, ensure_ascii=True)})}
"""


def tokenizer_config(spec: ModelSpec, options: ServingOptions) -> str:
    return f"""name: {pbtxt_string(spec.tokenizer_model_name)}
backend: "python"
max_batch_size: {options.tokenizer_max_batch}
{tensor_block("input", spec.serving_inputs)}
{tensor_block("output", tokenizer_outputs())}
{queue_block(options, delay_us=options.tokenizer_queue_delay_us, preferred=False)}
instance_group [ {{ count: {options.tokenizer_instances} kind: KIND_CPU }} ]
{parameters_block({"pad_to_buckets": str(options.pad_to_buckets).lower()})}
"""


def encoder_config(spec: ModelSpec, options: ServingOptions) -> str:
    outputs = tensor_block("output", spec.encoder_outputs)
    if options.profile == "cpu" or options.gpu_backend == "python":
        cuda = options.provider == "cuda"
        # allow_ragged_batch: requests of different padded lengths share one execute(); the model
        # regroups rows by length itself.
        return f"""name: {pbtxt_string(spec.encoder_model_name)}
backend: "python"
max_batch_size: {options.encoder_max_batch}
{tensor_block("input", encoder_inputs(), ragged=True)}
{outputs}
{queue_block(options, delay_us=options.encoder_queue_delay_us, preferred=False)}
instance_group [ {{ count: {options.encoder_instances} kind: {"KIND_GPU" if cuda else "KIND_CPU"} }} ]
{parameters_block(python_encoder_parameters(options))}
"""
    params = {"enable_mem_arena": "1", "memory.enable_memory_arena_shrinkage": "gpu:0",
              "arena_extend_strategy": "1"}
    from tritonembed.model_repository.memory_model import parse_grant

    grant = parse_grant(options.memory_grant)
    limit = options.gpu_mem_limit_bytes or (int(grant[1]) if grant and grant[0] == "bytes" else None)
    if limit:  # ORT's arena cap: a batch over it fails with an allocation error instead of being split
        params["gpu_mem_limit"] = str(limit)
    accel = ""
    if options.tensorrt:
        trt_precision = "FP16" if precision(spec.precision).reduced_gpu_math else "FP32"
        accel = f"""optimization {{ execution_accelerators {{
  gpu_execution_accelerator : [ {{
    name : "tensorrt"
    parameters {{ key: "precision_mode" value: "{trt_precision}" }}
    parameters {{ key: "max_workspace_size_bytes" value: "4294967296" }}
    parameters {{ key: "trt_engine_cache_enable" value: "1" }}
    parameters {{ key: "trt_engine_cache_path" value: "/tmp/trt_cache" }}
  }} ]
}} }}
"""
    warm_len = min(64, spec.max_length)
    warmup = "\n".join(
        f"""model_warmup [ {{
  name: "warmup_{b}x{warm_len}"
  batch_size: {b}
  inputs {{ key: "{INPUT_IDS.name}" value: {{ data_type: TYPE_INT64 dims: [ {warm_len} ] zero_data: true }} }}
  inputs {{ key: "{ATTENTION_MASK.name}" value: {{ data_type: TYPE_INT64 dims: [ {warm_len} ] zero_data: true }} }}
}} ]""" for b in (1, min(options.encoder_max_batch, 32)))
    return f"""name: {pbtxt_string(spec.encoder_model_name)}
backend: "onnxruntime"
default_model_filename: {pbtxt_string(spec.onnx_file)}
max_batch_size: {options.encoder_max_batch}
{tensor_block("input", encoder_inputs())}
{outputs}
{queue_block(options, delay_us=options.encoder_queue_delay_us, preferred=True)}
instance_group [ {{ count: {options.encoder_instances} kind: KIND_GPU }} ]
{accel}{warmup}
{parameters_block(params)}
"""
