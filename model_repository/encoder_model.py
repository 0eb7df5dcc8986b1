"""Triton Python-backend model (CPU profile): the exported ``model.onnx`` through ONNX Runtime.

The pip-installed tritonserver has no onnxruntime backend, so the CPU profile runs the same ONNX file
here. Inputs are ragged-batched: requests of any padded length share one execute(); rows are regrouped
by length into micro-batches of at most ``max_tokens_per_batch`` padded tokens.
"""

from __future__ import annotations

import os

from tritonembed.model_repository.configs import ServingOptions, checked_spinning
from tritonembed.export.onnx_export import model_bytes
from tritonembed.model_repository.microbatch_pool import MicroBatchPool, pool_workers
from tritonembed.model_repository.stages import encode_requests
from tritonembed.model_repository.triton_adapter import (
    Counters,
    error_response,
    log,
    model_parameters,
    pb_utils,
    version_dir,
)
from tritonembed.spec import ATTENTION_MASK, ENCODER_EMBEDDING_NAME, INPUT_IDS, ModelSpec


class TritonPythonModel:
    def initialize(self, args):
        import json

        import onnxruntime as ort

        params = model_parameters(args)
        # a hand-edited config with a bad value fails the load instead of running with a guess
        spinning = checked_spinning(params.get("intra_op_spinning", ServingOptions.intra_op_spinning))
        directory = version_dir(args)
        self.spec = ModelSpec.load(directory)
        self.max_tokens = int(params.get("max_tokens_per_batch", ServingOptions.max_tokens_per_batch))
        self.max_rows = int(json.loads(args["model_config"]).get("max_batch_size", 256))
        threads = int(params.get("intra_op_threads", "0"))
        model_path = directory / self.spec.onnx_file
        self.session = cpu_session(ort, model_path, threads, spinning)
        workers = pool_workers(int(params.get("microbatch_workers", ServingOptions.microbatch_workers)),
                               threads or os.cpu_count() or 1, model_bytes(model_path))
        self.pool = None
        if workers > 1:  # several micro-batches side by side, one thread each (microbatch_pool)
            single_session = cpu_session(ort, model_path, 1)
            self.pool = MicroBatchPool(lambda ids, mask: run_encoder(single_session, ids, mask), workers)
        self.counters = Counters(args["model_name"], {
            "encoder_rows": "Texts encoded",
            "encoder_padded_tokens": "Tokens run through the encoder, padding included",  # before real: real <= padded
            "encoder_real_tokens": "Real tokens encoded",
            "encoder_batches": "ONNX Runtime runs (micro-batches)",
        })
        log.info("encoder %s ready (%s, %d intra-op threads, spinning %s, %d tokens per micro-batch, "
                 "%d micro-batch workers)", self.spec.name, self.spec.precision, threads,
                 spinning, self.max_tokens, workers)

    def _run(self, input_ids, attention_mask):
        return run_encoder(self.session, input_ids, attention_mask)

    def execute(self, requests):
        batch = [(pb_utils.get_input_tensor_by_name(r, INPUT_IDS.name).as_numpy(),
                  pb_utils.get_input_tensor_by_name(r, ATTENTION_MASK.name).as_numpy()) for r in requests]
        try:
            outputs, stats = encode_requests(self._run, batch, pad_id=self.spec.pad_token_id,
                                             padding_side=self.spec.padding_side, max_tokens=self.max_tokens,
                                             max_rows=self.max_rows, run_batches=self.pool)
        except Exception as exc:  # one error per request, never an escaped exception
            log.exception("encoder failed")
            return [error_response(f"encoder failed: {exc}", invalid_arg=False) for _ in requests]
        self.counters.add("encoder_rows", stats.rows)
        self.counters.add("encoder_real_tokens", stats.real_tokens)
        self.counters.add("encoder_padded_tokens", stats.padded_tokens)
        self.counters.add("encoder_batches", stats.batches)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(ENCODER_EMBEDDING_NAME, out)])
                for out in outputs]

    def finalize(self):
        if hasattr(self, "counters"):
            self.counters.flush()
        if getattr(self, "pool", None) is not None:
            self.pool.close()
        self.session = self.pool = None


def run_encoder(session, input_ids, attention_mask):
    """One micro-batch through an ONNX Runtime session: the embedding rows."""
    return session.run([ENCODER_EMBEDDING_NAME], {INPUT_IDS.name: input_ids, ATTENTION_MASK.name: attention_mask})[0]


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
