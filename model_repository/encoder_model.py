"""Triton Python-backend encoder (CPU and GPU profiles): the exported ``model.onnx`` through ONNX Runtime.

One code path for both profiles: the CPU execution provider on ``KIND_CPU`` (the pip tritonserver has no
onnxruntime backend), the CUDA one (onnxruntime-gpu, ``device_id`` = the instance's GPU) on ``KIND_GPU``.
Inputs are ragged-batched: requests of any padded length share one execute(); rows are regrouped by length into
micro-batches of at most ``max_tokens_per_batch`` padded tokens that also fit the memory budget
(``memory_model``); a text that alone exceeds it gets an error for its request. While the memory guard
(``memory_guard``) reads above its threshold, new work gets UNAVAILABLE (retryable). A non-finite output row
is recomputed with the fallback session when one is configured, else its request gets an error.
"""

from __future__ import annotations

import os

from tritonembed.artifact import model_bytes
from tritonembed.model_repository.configs import ServingOptions, checked_spinning
from tritonembed.model_repository.memory_guard import MemoryGuard, MemoryReading
from tritonembed.model_repository.memory_model import budget_for
from tritonembed.model_repository.microbatch_pool import MicroBatchPool, pool_workers
from tritonembed.model_repository.stages import EncoderRowError, encode_requests
from tritonembed.model_repository.triton_adapter import (
    Counters,
    error_response,
    log,
    model_parameters,
    pb_utils,
    version_dir,
)
from tritonembed.spec import ATTENTION_MASK, ENCODER_EMBEDDING_NAME, INPUT_IDS, ModelSpec

_DEFAULTS = ServingOptions()


class TritonPythonModel:
    def initialize(self, args):
        import json

        import onnxruntime as ort

        params = model_parameters(args)
        # a hand-edited config with a bad value fails the load instead of running with a guess
        spinning = checked_spinning(params.get("intra_op_spinning", ServingOptions.intra_op_spinning))
        provider = params.get("execution_provider", "cpu") or "cpu"
        if provider not in ("cpu", "cuda"):
            raise ValueError(f"execution_provider must be cpu or cuda, got {provider!r}")
        device_id = int(args.get("model_instance_device_id", "0") or 0)
        directory = version_dir(args)
        self.spec = ModelSpec.load(directory)
        # the encoder serves the spec's declared output (one per model today)
        self.output_name = self.spec.outputs[0].encoder_name
        self.max_tokens = int(params.get("max_tokens_per_batch", ServingOptions.max_tokens_per_batch))
        self.max_rows = int(json.loads(args["model_config"]).get("max_batch_size", 256))
        threads = int(params.get("intra_op_threads", "0"))
        model_path = directory / self.spec.onnx_file
        fallback_file = params.get("fallback_onnx_file", "")
        fallback_path = directory / fallback_file if fallback_file else None
        if fallback_path is not None and not fallback_path.is_file():
            fallback_path = None
        workers = 1
        if provider == "cpu":
            workers = pool_workers(int(params.get("microbatch_workers", ServingOptions.microbatch_workers)),
                                   threads or os.cpu_count() or 1, model_bytes(model_path))
        # priced before any session loads: "free at start" must still include the weights it subtracts
        self.budget = budget_for(model_path, self.spec.hidden_size, self.spec.precision,
                                 params.get("memory_grant", ""), device=provider, device_id=device_id,
                                 sessions=(2 if workers > 1 else 1) + (1 if fallback_path else 0), concurrent=workers)
        if provider == "cuda":  # arena capped at its weights + one micro-batch's activations
            self.session = cuda_session(ort, model_path, device_id,
                                        self.budget.shape.weights_bytes + self.budget.activation_bytes)
        else:
            self.session = cpu_session(ort, model_path, threads, spinning)
        self.pool = None
        if workers > 1:  # several micro-batches side by side, one thread each (microbatch_pool)
            single_session = cpu_session(ort, model_path, 1)
            self.pool = MicroBatchPool(lambda ids, mask: run_encoder(single_session, ids, mask, self.output_name), workers)
        self.fallback = None
        if fallback_path is not None:  # a higher precision of the same checkpoint
            fallback_session = (cuda_session(ort, fallback_path, device_id,
                                             model_bytes(fallback_path) + self.budget.activation_bytes)
                                if provider == "cuda" else cpu_session(ort, fallback_path, threads, spinning))
            self.fallback = lambda ids, mask: run_encoder(fallback_session, ids, mask, self.output_name)
        self.longest_text = self.budget.longest_text(self.spec.max_length)
        self.guard = MemoryGuard(float(params.get("memory_threshold", _DEFAULTS.memory_threshold)),
                                 limit_file=params.get("memory_limit_file") or None, device=provider,
                                 device_id=device_id)
        self._last_reading: MemoryReading | None = None
        self.counters = Counters(args["model_name"], {
            "encoder_rows": "Texts encoded",
            "encoder_padded_tokens": "Tokens run through the encoder, padding included",  # before real: real <= padded
            "encoder_real_tokens": "Real tokens encoded",
            "encoder_batches": "ONNX Runtime runs (micro-batches)",
            "encoder_shed_requests": "Requests refused with UNAVAILABLE by the memory guard",
            "encoder_too_long_rows": "Texts refused: longer than the memory budget allows alone",
            "encoder_nonfinite_rows": "Output rows that came out non-finite (e.g. fp16 overflow)",
            "encoder_recomputed_rows": "Non-finite rows recomputed by the higher-precision fallback",
        })
        self.gauges = Gauges(args["model_name"], {
            "memory_used_bytes": "Memory used, as the encoder's memory guard last read it",
            "memory_limit_bytes": "Memory limit the encoder's memory guard compares against",
        })
        log.info("encoder %s ready (%s, %s execution provider, device %d, %d intra-op threads, spinning %s, "
                 "%d tokens per micro-batch, %d micro-batch workers, memory %s, one text up to %d tokens, "
                 "fallback %s)", self.spec.name, self.spec.precision, provider, device_id, threads, spinning,
                 self.max_tokens, workers, self.budget.describe(), self.longest_text, fallback_file or "none")

    def _run(self, input_ids, attention_mask):
        return run_encoder(self.session, input_ids, attention_mask, self.output_name)

    def _shed(self) -> str | None:
        """The guard's message when new work must wait, else None (and the gauges follow a fresh reading)."""
        try:
            reading = self.guard.reading()
        except OSError:  # no reading (not Linux): serve rather than refuse everything
            return None
        if reading is not self._last_reading:  # a fresh reading (at most every READING_TTL_S), not every request
            self._last_reading = reading
            self.gauges.set("memory_used_bytes", reading.used)
            self.gauges.set("memory_limit_bytes", reading.limit)
        if reading.fraction < self.guard.threshold:
            return None
        return (f"encoder memory at {reading.fraction:.0%} of its limit ({reading.describe()}, shedding at "
                f"{self.guard.threshold:.0%}); retry later")

    def execute(self, requests):
        shed = self._shed()
        if shed is not None:
            self.counters.add("encoder_shed_requests", len(requests))
            return [unavailable_response(shed) for _ in requests]
        batch = [(pb_utils.get_input_tensor_by_name(r, INPUT_IDS.name).as_numpy(),
                  pb_utils.get_input_tensor_by_name(r, ATTENTION_MASK.name).as_numpy()) for r in requests]
        try:
            outputs, stats = encode_requests(self._run, batch, pad_id=self.spec.pad_token_id,
                                             padding_side=self.spec.padding_side, max_tokens=self.max_tokens,
                                             max_rows=self.max_rows, run_batches=self.pool, fits=self.budget.fits,
                                             longest_text=self.longest_text, normalized=self.spec.normalize,
                                             fallback=self.fallback)
        except Exception as exc:  # one error per request, never an escaped exception
            log.exception("encoder failed")
            return [error_response(f"encoder failed: {exc}", invalid_arg=False) for _ in requests]
        self.counters.add("encoder_rows", stats.rows)
        self.counters.add("encoder_real_tokens", stats.real_tokens)
        self.counters.add("encoder_padded_tokens", stats.padded_tokens)
        self.counters.add("encoder_batches", stats.batches)
        self.counters.add("encoder_too_long_rows", stats.too_long_rows)
        self.counters.add("encoder_nonfinite_rows", stats.nonfinite_rows)
        self.counters.add("encoder_recomputed_rows", stats.recomputed_rows)
        return [error_response(str(out)) if isinstance(out, EncoderRowError)
                else pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, out)])
                for out in outputs]

    def finalize(self):
        if hasattr(self, "counters"):
            self.counters.flush()
        if getattr(self, "pool", None) is not None:
            self.pool.close()
        self.session = self.pool = self.fallback = None


def unavailable_response(message: str):
    """An InferenceResponse with a retryable UNAVAILABLE error (INTERNAL where this Triton has no such code)."""
    try:
        err = pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE)
    except (AttributeError, TypeError):  # older python_backend
        return error_response(message, invalid_arg=False)
    return pb_utils.InferenceResponse(error=err)


class Gauges:
    """Prometheus gauges on Triton's metrics endpoint (no-ops where the stub has no MetricFamily)."""

    def __init__(self, model_name: str, names: dict[str, str]) -> None:
        self._metrics = {}
        self._families = []  # must outlive their Metric objects
        family_cls = getattr(pb_utils, "MetricFamily", None)
        if family_cls is None:
            return
        for key, description in names.items():
            family = family_cls(name=f"tritonembed_{key}", description=description, kind=family_cls.GAUGE)
            self._families.append(family)
            self._metrics[key] = family.Metric(labels={"model": model_name})

    def set(self, key: str, value: float) -> None:
        metric = self._metrics.get(key)
        if metric is None:
            return
        try:
            metric.set(float(value))
        except Exception:  # a gauge that cannot be published must not fail a request
            log.exception("could not set gauge %s", key)


def run_encoder(session, input_ids, attention_mask, output_name: str = ENCODER_EMBEDDING_NAME):
    """One micro-batch through an ONNX Runtime session: the rows of its (declared) output."""
    return session.run([output_name], {INPUT_IDS.name: input_ids, ATTENTION_MASK.name: attention_mask})[0]


def cuda_session(ort, model_path, device_id: int, mem_limit: int | None = None):
    """An ONNX Runtime session on CUDA device ``device_id`` (CPU fallback for nodes CUDA lacks); ``mem_limit``
    caps its memory arena (bytes) so a mis-estimate fails one run instead of the device.

    Raises:
        RuntimeError: this onnxruntime has no CUDA execution provider (install onnxruntime-gpu); what
            ``ort.InferenceSession`` raises.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("the gpu profile's encoder needs onnxruntime-gpu (CUDAExecutionProvider); this "
                           f"onnxruntime has {ort.get_available_providers()}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # kSameAsRequested: the arena grows by what a micro-batch needs, not by doubling past the budget
    cuda = {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"}
    if mem_limit:
        cuda["gpu_mem_limit"] = int(mem_limit)
    return ort.InferenceSession(str(model_path), options, providers=[("CUDAExecutionProvider", cuda),
                                                                     "CPUExecutionProvider"])


def cpu_session(ort, model_path, threads: int, spinning: str = "always"):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (0 = ORT's default), one inter-op thread.

    ``spinning``: ``always`` (ORT's default), ``never``, or ``during_run`` (spin inside a run for cheap
    wake-ups between ops, stop when it returns). Raises what ``ort.InferenceSession`` raises.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if spinning == "never":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spinning == "during_run":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
