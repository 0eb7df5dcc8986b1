"""Token-id input: OpenAI's ``input`` may be token ids; the gateway decodes them back to text.

Triton's ensemble takes text, so ids are decoded with the served model's own ``tokenizer.json``
(from an exported model directory given with ``--model-dir`` / ``TRITONEMBED_MODEL_DIRS``) and
the text is tokenized again by the server. Ids produced by that same tokenizer round-trip; ids
from another tokenizer (e.g. tiktoken ids sent by LangChain's ``OpenAIEmbeddings`` with
``check_embedding_ctx_length=True``) would decode to unrelated text, which is why there is no
fallback tokenizer: without the model's own file, token-id input is refused with a 400.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tritonembed.errors import SpecError
from tritonembed.gateway.errors import ErrorKind, GatewayError
from tritonembed.spec import ModelSpec

logger = logging.getLogger("tritonembed.gateway")


class TokenDecoder:
    """Decodes token ids per model; tokenizers are loaded lazily from exported model dirs."""

    def __init__(self, model_dirs: Iterable[Path] = ()) -> None:
        self._files: dict[str, Path] = {}
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()
        for directory in model_dirs:
            try:
                spec = ModelSpec.load(Path(directory))
            except SpecError as exc:
                raise GatewayError(ErrorKind.INTERNAL, f"--model-dir {directory}: {exc}") from exc
            path = Path(directory) / spec.tokenizer_file
            if not path.is_file():
                raise GatewayError(ErrorKind.INTERNAL, f"--model-dir {directory}: no {spec.tokenizer_file}")
            self._files[spec.name] = path
            logger.info("token-id input enabled for %s (%s)", spec.name, path)

    def supports(self, spec: ModelSpec) -> bool:
        return spec.name in self._files

    def _tokenizer(self, spec: ModelSpec) -> Any:
        with self._lock:
            tokenizer = self._loaded.get(spec.name)
            if tokenizer is None:
                from tokenizers import Tokenizer  # lazy: only token-id input needs it

                tokenizer = self._loaded[spec.name] = Tokenizer.from_file(str(self._files[spec.name]))
            return tokenizer

    def decode(self, spec: ModelSpec, rows: Sequence[Sequence[int]]) -> list[str]:
        """Texts for rows of token ids.

        Raises:
            GatewayError: no tokenizer for this model (UNSUPPORTED_INPUT), an id outside the
                vocabulary or a row that decodes to nothing (INVALID_REQUEST).
        """
        if not self.supports(spec):
            raise GatewayError(
                ErrorKind.UNSUPPORTED_INPUT,
                f"token-id input needs the tokenizer of model {spec.name!r}: start the gateway with "
                f"--model-dir pointing at its exported directory, or send text",
                param="input",
            )
        tokenizer = self._tokenizer(spec)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        texts = []
        for i, row in enumerate(rows):
            bad = next((t for t in row if t >= vocab), None)
            if bad is not None:
                raise GatewayError(
                    ErrorKind.INVALID_REQUEST, f"input[{i}] has token id {bad}, outside the vocabulary (size {vocab})", "input"
                )
            text = tokenizer.decode(list(row), skip_special_tokens=True)
            if not text:
                raise GatewayError(ErrorKind.INVALID_REQUEST, f"input[{i}] decodes to empty text", "input")
            texts.append(text)
        return texts
