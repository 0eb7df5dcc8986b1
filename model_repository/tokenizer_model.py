"""Triton Python-backend model: texts -> padded token ids (one tokenizer call per execute batch).

Every text is shrunk to the tokenizer's character cap before it is tokenized (see
:class:`~tritonembed.model_repository.tokenization.CharCap`), so one request's work is bounded by
``max_length`` tokens per text whatever its size, and no multi-megabyte copy outlives ``execute``.
"""

from __future__ import annotations

import numpy as np

from tritonembed.errors import InputError
from tritonembed.model_repository.rerank_tokenization import (
    PairRequest,
    PairTokenizer,
    tokenize_pair_requests,
)
from tritonembed.model_repository.stages import TokenizeRequest, tokenize_requests
from tritonembed.model_repository.tokenization import SpecTokenizer
from tritonembed.model_repository.triton_adapter import (
    Counters,
    error_response,
    log,
    model_parameters,
    optional_input,
    pb_utils,
    version_dir,
)
from tritonembed.spec import (
    ATTENTION_MASK,
    DOCUMENT,
    INPUT_IDS,
    INSTRUCTION,
    QUERY,
    TEXT,
    TOKEN_COUNT,
    TRUNCATE,
    ModelSpec,
)


class TritonPythonModel:
    def initialize(self, args):
        directory = version_dir(args)
        self.spec = ModelSpec.load(directory)
        if self.spec.task == "rerank":
            self.tokenizer = PairTokenizer(directory / self.spec.tokenizer_file, self.spec)
        else:
            self.tokenizer = SpecTokenizer(directory / self.spec.tokenizer_file, self.spec)
        self.pad_to_buckets = model_parameters(args).get("pad_to_buckets", "true") == "true"
        self.counters = Counters(args["model_name"], {
            "tokenizer_padded_tokens": "Tokens sent to the encoder, padding included",  # before real: real <= padded
            "tokenizer_real_tokens": "Tokens of the texts (specials included) after truncation",
            "tokenizer_rejected_requests": "Requests refused for invalid input",
        })
        cap = self.tokenizer.body.cap if self.spec.task == "rerank" else self.tokenizer.cap
        log.info("tokenizer for %s ready (max_length %d, %s)", self.spec.name, self.spec.max_length,
                 f"{cap.kind} character cap {cap.limit}" if cap is not None else "no character cap")

    def execute(self, requests):
        if self.spec.task == "rerank":
            try:
                return self._respond(requests, self._tokenize_pairs(requests))
            except Exception as exc:  # never let an exception escape execute(): one error per request
                log.exception("tokenizer failed")
                return [error_response(f"tokenizer failed: {exc}", invalid_arg=False) for _ in requests]
        parsed = []
        for request in requests:
            texts = optional_input(request, TEXT.name)
            instructions = optional_input(request, INSTRUCTION.name)
            truncate = optional_input(request, TRUNCATE.name)
            parsed.append(TokenizeRequest(
                texts=[] if texts is None else texts.reshape(-1).tolist(),
                instructions=None if instructions is None else instructions.reshape(-1).tolist(),
                truncate=None if truncate is None else truncate.reshape(-1).astype(bool).tolist(),
            ))
        try:
            results = tokenize_requests(self.tokenizer, parsed, pad_to_buckets=self.pad_to_buckets)
        except Exception as exc:  # never let an exception escape execute(): one error per request
            log.exception("tokenizer failed")
            return [error_response(f"tokenizer failed: {exc}", invalid_arg=False) for _ in requests]
        return self._respond(requests, results)

    def _tokenize_pairs(self, requests):
        """A reranker's batch: (QUERY, DOCUMENT, INSTRUCTION?, TRUNCATE?) per request, tokenized in one call."""
        parsed = []
        for request in requests:
            rows = {t.name: optional_input(request, t.name) for t in (QUERY, DOCUMENT, INSTRUCTION, TRUNCATE)}
            parsed.append(PairRequest(
                queries=[] if rows[QUERY.name] is None else rows[QUERY.name].reshape(-1).tolist(),
                documents=[] if rows[DOCUMENT.name] is None else rows[DOCUMENT.name].reshape(-1).tolist(),
                instructions=None if rows[INSTRUCTION.name] is None else rows[INSTRUCTION.name].reshape(-1).tolist(),
                truncate=None if rows[TRUNCATE.name] is None else rows[TRUNCATE.name].reshape(-1).astype(bool).tolist(),
            ))
        return tokenize_pair_requests(self.tokenizer, parsed, pad_to_buckets=self.pad_to_buckets)

    def _respond(self, requests, results):
        responses = []
        for result in results:
            if isinstance(result, InputError):
                self.counters.add("tokenizer_rejected_requests", 1)
                responses.append(error_response(str(result)))
                continue
            self.counters.add("tokenizer_real_tokens", result.real_tokens)
            self.counters.add("tokenizer_padded_tokens", result.padded_tokens)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(INPUT_IDS.name, result.input_ids),
                pb_utils.Tensor(ATTENTION_MASK.name, result.attention_mask),
                pb_utils.Tensor(TOKEN_COUNT.name, result.token_counts.astype(np.int32)),
            ]))
        return responses

    def finalize(self):
        if hasattr(self, "counters"):
            self.counters.flush()
        log.info("tokenizer for %s unloaded", getattr(self, "spec", None) and self.spec.name)
