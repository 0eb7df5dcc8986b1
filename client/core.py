"""The client's pure core: everything except I/O.

Both shells (:mod:`tritonembed.client.sync` and :mod:`tritonembed.client.aio`, each over gRPC or
HTTP) call into this module to parse the model config, validate arguments, build the request
tensors, plan the chunks, parse and reassemble the outputs, slice Matryoshka embeddings, map
transport errors onto :mod:`tritonembed.client.errors` and decide retries. Nothing here opens a
socket, and nothing imports tritonclient, torch or transformers.

Tensor names and the spec parameter key come from :mod:`tritonembed.spec`, never from here.

It is long because it is the whole protocol of both shells (embed and rerank: validation, chunking,
tensors, outputs, errors, retries); keeping it in one I/O-free module is what lets the two shells stay thin
and the tests cover the protocol without a server.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tritonembed.client.errors import (
    ConnectionFailed,
    EmbeddingError,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    ServerError,
    Timeout,
)
from tritonembed.errors import SpecError
from tritonembed.spec import (
    DOCUMENT,
    INSTRUCTION,
    QUERY,
    SPEC_PARAMETER_KEY,
    TEXT,
    TOKEN_COUNT,
    TRUNCATE,
    ModelSpec,
    TensorSpec,
)
from tritonembed.text_rules import is_blank

logger = logging.getLogger("tritonembed.client")

Protocol = Literal["grpc", "http"]
InputType = Literal["query", "document"]
PROTOCOLS: tuple[str, ...] = ("grpc", "http")
INPUT_TYPES: tuple[str, ...] = ("query", "document")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
_SCHEMES = {"grpc": ("grpc", False), "grpcs": ("grpc", True), "http": ("http", False), "https": ("http", True)}


# --- connection target -------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where and how to reach Triton: ``host:port`` (no scheme), protocol, TLS."""

    address: str
    protocol: Protocol
    ssl: bool = False


def parse_url(url: str, protocol: str | None = None) -> Target:
    """Resolve ``url`` and ``protocol`` into a :class:`Target`.

    ``url`` may carry a scheme (``grpc://``, ``grpcs://``, ``http://``, ``https://``) that selects the
    protocol; without one, ``protocol`` (default ``"grpc"``) decides. A missing port gets Triton's
    default for the protocol (8001 gRPC, 8000 HTTP).

    Raises:
        InvalidArgument: unknown scheme or protocol, or a scheme that contradicts ``protocol``.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise InvalidArgument(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    ssl = False
    address = url.strip()
    if "://" in address:
        scheme, address = address.split("://", 1)
        if scheme.lower() not in _SCHEMES:
            raise InvalidArgument(f"unsupported URL scheme {scheme!r} in {url!r}; use grpc://, grpcs://, http:// or https://")
        implied, ssl = _SCHEMES[scheme.lower()]
        if protocol is not None and protocol != implied:
            raise InvalidArgument(f"URL {url!r} implies protocol {implied!r} but protocol={protocol!r} was given")
        protocol = implied
    protocol = protocol or "grpc"
    address = address.rstrip("/")
    if not address:
        raise InvalidArgument(f"no host in URL {url!r}")
    if not re.search(r":\d+$", address):
        address = f"{address}:{DEFAULT_PORTS[protocol]}"
    return Target(address=address, protocol=protocol, ssl=ssl)  # type: ignore[arg-type]


# --- model discovery ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """A served tritonembed model: its Triton name, its spec and the ensemble's ``max_batch_size``."""

    name: str
    spec: ModelSpec
    max_batch_size: int


def unwrap_model_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config dict from either protocol (gRPC's JSON wraps it as ``{"config": {...}}``)."""
    inner = config.get("config")
    return inner if isinstance(inner, Mapping) else config


def spec_json_from_config(config: Mapping[str, Any]) -> str | None:
    """The ``tritonembed_spec`` parameter's JSON string, or None when the model has none."""
    params = unwrap_model_config(config).get("parameters") or {}
    entry = params.get(SPEC_PARAMETER_KEY)
    if isinstance(entry, Mapping):
        value = entry.get("string_value")
        return value if isinstance(value, str) and value else None
    return None


def parse_model_config(name: str, config: Mapping[str, Any]) -> ModelInfo:
    """Read a model's spec and batch limit from its Triton config (JSON form, either protocol).

    Raises:
        ModelNotFound: the model's config carries no tritonembed spec parameter.
        ServerError: the spec is invalid or ``max_batch_size`` is not positive.
    """
    spec_json = spec_json_from_config(config)
    if spec_json is None:
        raise ModelNotFound(f"model {name!r} is served but is not a tritonembed model (no {SPEC_PARAMETER_KEY!r} parameter)")
    try:
        spec = ModelSpec.from_json(spec_json)
    except SpecError as exc:
        raise ServerError(f"model {name!r} publishes an invalid spec: {exc}") from exc
    try:
        max_batch_size = int(unwrap_model_config(config).get("max_batch_size", 0))
    except (TypeError, ValueError):
        max_batch_size = 0
    if max_batch_size <= 0:
        raise ServerError(f"model {name!r} has max_batch_size {max_batch_size}; tritonembed ensembles batch (> 0)")
    return ModelInfo(name=name, spec=spec, max_batch_size=max_batch_size)


def ready_model_names(index: Any) -> list[str]:
    """Names of READY models in a repository index (gRPC: ``{"models": [...]}``; HTTP: a list)."""
    entries = index.get("models", []) if isinstance(index, Mapping) else index or []
    names = []
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("state", "READY") == "READY" and entry.get("name"):
            if entry["name"] not in names:
                names.append(entry["name"])
    return names


# --- reranking ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RerankHit:
    """One ranked document: its index in the call's ``documents``, P(relevant) in [0, 1], its text."""

    index: int
    relevance_score: float
    document: str


@dataclass(frozen=True)
class RerankResult:
    """What :meth:`rerank` returns: the ``top_n`` best documents, highest score first (ties by index)."""

    results: tuple[RerankHit, ...]
    token_counts: np.ndarray  # int64 [len(documents)], tokens of each templated pair
    model: str

    @property
    def total_tokens(self) -> int:
        return int(self.token_counts.sum())


@dataclass(frozen=True)
class RerankPlan:
    """A validated rerank call split into chunks of documents (the query repeated per row)."""

    info: ModelInfo
    query: bytes
    documents: tuple[str, ...]
    encoded: tuple[bytes, ...]
    instruction: bytes
    top_n: int
    truncate: bool
    chunks: tuple[np.ndarray, ...]

    @property
    def size(self) -> int:
        return len(self.encoded)

    @property
    def output_name(self) -> str:
        return self.info.spec.output("yes_no_logit").name

    def chunk_inputs(self, k: int) -> list[TensorData]:
        indices = self.chunks[k]
        inputs = [_column(QUERY, [self.query] * len(indices)), _column(DOCUMENT, [self.encoded[i] for i in indices])]
        if self.instruction:
            inputs.append(_column(INSTRUCTION, [self.instruction] * len(indices)))
        if not self.truncate:
            inputs.append(_column(TRUNCATE, [False] * len(indices)))
        return inputs

    def locate_error(self, k: int, error: EmbeddingError) -> EmbeddingError:
        """``error`` of chunk ``k`` with the server's row numbers turned into ``documents[i]``."""
        indices = self.chunks[k]
        match = _CHUNK_TEXT.search(error.message)
        local = int(match.group(1) or match.group(2)) if match else len(indices)
        if local >= len(indices):
            return error
        where = f"documents[{int(indices[local])}]"
        located = type(error)(_CHUNK_TEXT.sub(where, error.message, count=1), status=error.status, param=where,
                              hint=error.hint)
        located.__cause__ = error.__cause__
        return located

    def read_outputs(self, k: int, score: np.ndarray | None, token_count: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Raises: ServerError for a missing output or shapes that do not match the request."""
        rows = len(self.chunks[k])
        if score is None or token_count is None:
            missing = self.output_name if score is None else TOKEN_COUNT.name
            raise ServerError(f"model {self.info.name!r} returned no {missing} output")
        score = np.asarray(score, dtype=np.float64).reshape(-1)
        counts = np.asarray(token_count).reshape(-1)
        if score.shape != (rows,) or counts.shape != (rows,):
            raise ServerError(f"model {self.info.name!r} returned {score.shape[0]} scores for {rows} documents")
        return score, counts.astype(np.int64)

    def finish(self, parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> RerankResult:
        """Scores in input order -> P(yes) = sigmoid(logit), sorted, cut to ``top_n``."""
        logits = assemble(self.size, self.chunks, [p[0][:, None] for p in parts]).reshape(-1) if parts else np.zeros(0)
        counts = assemble(self.size, self.chunks, [p[1][:, None] for p in parts]).reshape(-1) if parts else np.zeros(0)
        probs = 1.0 / (1.0 + np.exp(-logits))
        order = sorted(range(self.size), key=lambda i: (-probs[i], i))[: self.top_n]
        hits = tuple(RerankHit(i, float(probs[i]), self.documents[i]) for i in order)
        return RerankResult(hits, counts.astype(np.int64), self.info.name)


def plan_rerank(info: ModelInfo, query: str, documents: Sequence[str], *, top_n: int | None = None,
                instruction: str | None = None, truncate: bool = True, batch_size: int | None = None) -> RerankPlan:
    """Validate one rerank call and split its documents into length-sorted chunks.

    Raises:
        InvalidArgument: the model is not a reranker, a blank query or document, no documents, a
            ``top_n`` that is not a positive integer, or a non-string instruction.
    """
    if info.spec.task != "rerank":
        raise InvalidArgument(f"model {info.name!r} is a {info.spec.task} model, not a reranker", param="model")
    if not isinstance(query, str) or is_blank(query):
        raise InvalidArgument("query must be a non-empty string", param="query")
    if isinstance(documents, str) or not isinstance(documents, Sequence) or not documents:
        raise InvalidArgument("documents must be a non-empty list of strings", param="documents")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n <= 0):
        raise InvalidArgument(f"top_n must be a positive integer, got {top_n!r}", param="top_n")
    if instruction is not None and not isinstance(instruction, str):
        raise InvalidArgument("instruction must be a string", param="instruction")
    if not isinstance(truncate, (bool, np.bool_)):
        raise InvalidArgument(f"truncate must be a boolean, got {truncate!r}", param="truncate")
    try:
        encoded = encode_texts(list(documents))
    except InvalidArgument as exc:
        param = (exc.param or "").replace("texts", "documents")
        raise InvalidArgument(exc.message.replace("texts", "documents"), param=param) from None
    chunk_size = min(batch_size or info.max_batch_size, info.max_batch_size)
    return RerankPlan(info, _encode(query, "query", "query"), tuple(documents), tuple(encoded),
                      (instruction or "").encode("utf-8"), min(top_n or len(encoded), len(encoded)), bool(truncate),
                      tuple(plan_chunks([len(t) for t in encoded], chunk_size)))


def choose_model(models: Sequence[ModelInfo]) -> ModelInfo:
    """The only served tritonembed model, for a client built without ``model=``.

    Raises:
        ModelNotFound: the server serves none.
        InvalidArgument: it serves several (the caller must name one).
    """
    if not models:
        raise ModelNotFound("the server serves no tritonembed model")
    if len(models) > 1:
        names = ", ".join(sorted(m.name for m in models))
        raise InvalidArgument(f"the server serves several tritonembed models ({names}); pass model=")
    return models[0]


# --- argument validation -----------------------------------------------------------------------
def resolve_dimensions(spec: ModelSpec, dimensions: Any, *, force: bool = False) -> int:
    """The output size for ``dimensions`` (None = the full ``hidden_size``).

    Without ``force`` the value must lie in ``spec.dimension_range`` (a single value, ``hidden_size``,
    for models without Matryoshka training). With ``force`` any size in 1..hidden_size is accepted.

    Raises:
        InvalidArgument: not an integer, or outside the allowed range.
    """
    if dimensions is None:
        return spec.hidden_size
    if isinstance(dimensions, (bool, np.bool_)) or not isinstance(dimensions, (int, np.integer)):
        raise InvalidArgument(f"dimensions must be an integer, got {dimensions!r}", param="dimensions")
    dims = int(dimensions)
    low, high = (1, spec.hidden_size) if force else spec.dimension_range
    if low <= dims <= high:
        return dims
    if low == high and not force:
        raise InvalidArgument(
            f"model {spec.name!r} is not Matryoshka-trained: dimensions must be {high} (or left out), got {dims}",
            param="dimensions",
            hint="pass force_dimensions=True to slice anyway",
        )
    raise InvalidArgument(f"dimensions must be between {low} and {high} for model {spec.name!r}, got {dims}", param="dimensions")


def resolve_instruction(spec: ModelSpec, input_type: str | None, instruction: str | None) -> str:
    """The instruction to send for every text ('' = embed as documents).

    Rules: an explicit non-empty ``instruction`` makes the texts queries and wins over the default;
    ``input_type="query"`` alone uses ``spec.default_query_instruction``; ``input_type="document"``
    together with an ``instruction`` is a contradiction and is rejected. A model whose
    ``default_query_instruction`` is empty embeds queries exactly like documents. An explicit
    ``instruction`` for a model whose ``query_template`` has no ``{instruction}`` slot would be
    ignored, so it is refused.

    Raises:
        InvalidArgument: unknown ``input_type``, non-string ``instruction``, the contradiction above,
            or an ``instruction`` the model has no template for.
    """
    if input_type is not None and input_type not in INPUT_TYPES:
        raise InvalidArgument(f"input_type must be one of {INPUT_TYPES} or None, got {input_type!r}", param="input_type")
    if instruction is not None and not isinstance(instruction, str):
        raise InvalidArgument(f"instruction must be a string, got {type(instruction).__name__}", param="instruction")
    if instruction:
        if input_type == "document":
            raise InvalidArgument(
                "instruction makes the texts queries; it cannot be combined with input_type='document'", param="instruction"
            )
        if "{instruction}" not in spec.query_template:
            raise InvalidArgument(
                f"model {spec.name!r} takes no instruction (its query template has no instruction slot); "
                f"leave 'instruction' out" + (", or send input_type='query'" if spec.default_query_instruction else ""),
                param="instruction",
            )
        _encode(instruction, "instruction", "instruction")
        return instruction
    if input_type == "query":
        return spec.default_query_instruction
    return ""


def _encode(text: str, where: str, param: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{where} is not valid UTF-8 (position {exc.start}: {exc.reason})", param=param) from None


def encode_texts(texts: str | Sequence[str]) -> list[bytes]:
    """UTF-8 encode ``texts`` (one string or a sequence of strings), checking each locally.

    Raises:
        InvalidArgument: not a string or a sequence of strings, a blank text (see
            :func:`tritonembed.text_rules.is_blank`), or text that is not encodable as UTF-8 (lone
            surrogates). The message and ``param`` name the offending index (``texts[3]``).
    """
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise InvalidArgument(f"texts must be a string or a sequence of strings, got {type(texts).__name__}", param="texts")
    encoded = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidArgument(f"texts[{i}] must be a string, got {type(text).__name__}", param=f"texts[{i}]")
        if is_blank(text):
            raise InvalidArgument(f"texts[{i}] is empty", param=f"texts[{i}]")
        encoded.append(_encode(text, f"texts[{i}]", f"texts[{i}]"))
    return encoded


# --- chunking ----------------------------------------------------------------------------------
def plan_chunks(lengths: Sequence[int], chunk_size: int) -> list[np.ndarray]:
    """Group indices into chunks of at most ``chunk_size``, longest texts first.

    Sorting by length means each request holds texts of similar length, so the server (which pads a
    request to its longest text) wastes little compute on padding. The chunks' concatenation is a
    permutation of ``range(len(lengths))``; :func:`assemble` undoes it.
    """
    if chunk_size <= 0:
        raise InvalidArgument(f"chunk size must be positive, got {chunk_size}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]


def assemble(n: int, chunks: Sequence[np.ndarray], parts: Sequence[np.ndarray]) -> np.ndarray:
    """Scatter per-chunk rows back into original order: ``out[chunks[k][j]] = parts[k][j]``."""
    if not parts:
        raise ValueError("assemble needs at least one part")
    out = np.empty((n,) + parts[0].shape[1:], dtype=parts[0].dtype)
    for indices, part in zip(chunks, parts, strict=True):
        out[indices] = part
    return out


# --- request / response ------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorData:
    """One request input, protocol-neutral: the shells wrap it in tritonclient's ``InferInput``."""

    name: str
    datatype: str
    data: np.ndarray


def _column(spec: TensorSpec, values: Sequence[Any]) -> TensorData:
    array = np.array(list(values), dtype=spec.numpy_dtype).reshape(len(values), 1)
    return TensorData(spec.name, spec.dtype, array)


@dataclass(frozen=True)
class EmbeddingResult:
    """What :meth:`embed_with_usage` returns.

    Attributes:
        embeddings: float32 ``[n, dimensions]``, in the order of the input texts.
        token_counts: int64 ``[n]``, tokens the model consumed per text (after templating/truncation).
        model: the served model's name.
    """

    embeddings: np.ndarray
    token_counts: np.ndarray
    model: str

    @property
    def total_tokens(self) -> int:
        return int(self.token_counts.sum())

    @property
    def dimensions(self) -> int:
        return int(self.embeddings.shape[1])


# How the Triton tokenizer model numbers a text inside one request ("text 7", "texts[7]", "input[7]").
_CHUNK_TEXT = re.compile(r"\btext (\d+)\b|\b(?:texts|input)\[(\d+)\]")


@dataclass(frozen=True)
class EmbedPlan:
    """A validated embed call split into chunks; the shells send ``chunk_inputs(k)`` for each k."""

    info: ModelInfo
    texts: tuple[bytes, ...]
    instruction: bytes
    truncate: bool
    dimensions: int
    normalize: bool
    chunks: tuple[np.ndarray, ...]

    @property
    def size(self) -> int:
        return len(self.texts)

    @property
    def output_name(self) -> str:
        """The served tensor holding the vectors, as the model's spec declares it."""
        return self.info.spec.output("embedding").name

    def chunk_inputs(self, k: int) -> list[TensorData]:
        """The input tensors of chunk ``k``. Optional inputs are sent only when they differ from
        the server's default (no instruction, truncation on)."""
        indices = self.chunks[k]
        inputs = [_column(TEXT, [self.texts[i] for i in indices])]
        if self.instruction:
            inputs.append(_column(INSTRUCTION, [self.instruction] * len(indices)))
        if not self.truncate:
            inputs.append(_column(TRUNCATE, [False] * len(indices)))
        return inputs

    def locate_error(self, k: int, error: EmbeddingError) -> EmbeddingError:
        """``error`` from chunk ``k`` with the server's chunk-local text numbers ("text 7") turned
        into the caller's indices (``texts[157]``), in the message and in ``param``."""
        indices = self.chunks[k]
        found: list[int] = []

        def caller_index(match: re.Match[str]) -> str:
            local = int(match.group(1) or match.group(2))
            if local >= len(indices):
                return match.group(0)
            found.append(int(indices[local]))
            return f"texts[{found[-1]}]"

        message = _CHUNK_TEXT.sub(caller_index, error.message)
        if not found:
            return error
        located = type(error)(message, status=error.status, param=f"texts[{found[0]}]", hint=error.hint)
        located.__cause__ = error.__cause__
        return located

    def read_outputs(self, k: int, embedding: np.ndarray | None, token_count: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Check chunk ``k``'s outputs against the contract.

        Raises:
            ServerError: a missing output, or shapes that do not match the request.
        """
        rows = len(self.chunks[k])
        hidden = self.info.spec.hidden_size
        if embedding is None or token_count is None:
            missing = self.output_name if embedding is None else TOKEN_COUNT.name
            raise ServerError(f"model {self.info.name!r} returned no {missing} output")
        embedding = np.asarray(embedding)
        if embedding.shape != (rows, hidden):
            raise ServerError(
                f"model {self.info.name!r} returned {self.output_name} of shape {embedding.shape}, expected {(rows, hidden)}"
            )
        counts = np.asarray(token_count).reshape(-1)
        if counts.shape != (rows,):
            raise ServerError(f"model {self.info.name!r} returned {TOKEN_COUNT.name} of shape {np.shape(token_count)} for {rows} texts")
        return embedding.astype(np.float32, copy=False), counts.astype(np.int64)

    def finish(self, parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> EmbeddingResult:
        """Reassemble chunk outputs in input order and apply Matryoshka slicing."""
        if not parts:
            return EmbeddingResult(
                embeddings=np.zeros((0, self.dimensions), dtype=np.float32),
                token_counts=np.zeros((0,), dtype=np.int64),
                model=self.info.name,
            )
        embeddings = assemble(self.size, self.chunks, [p[0] for p in parts])
        counts = assemble(self.size, self.chunks, [p[1] for p in parts])
        return EmbeddingResult(
            embeddings=slice_embeddings(embeddings, self.dimensions, normalize=self.normalize),
            token_counts=counts,
            model=self.info.name,
        )


def plan_embed(
    info: ModelInfo,
    texts: str | Sequence[str],
    *,
    dimensions: int | None = None,
    input_type: str | None = None,
    instruction: str | None = None,
    normalize: bool = True,
    truncate: bool = True,
    force_dimensions: bool = False,
    batch_size: int | None = None,
) -> EmbedPlan:
    """Validate one embed call and split it into length-sorted chunks.

    ``batch_size`` caps the chunk size below the model's ``max_batch_size`` (it never raises it).

    Raises:
        InvalidArgument: the model is not an embedder, any argument is invalid (see :func:`encode_texts`,
            :func:`resolve_dimensions`, :func:`resolve_instruction`), or ``truncate``/``normalize`` are not booleans.
    """
    if info.spec.task != "embed":
        raise InvalidArgument(f"model {info.name!r} is a {info.spec.task} model, not an embedder: use rerank()",
                              param="model")
    for flag, value in (("truncate", truncate), ("normalize", normalize)):
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidArgument(f"{flag} must be a boolean, got {value!r}", param=flag)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0):
        raise InvalidArgument(f"batch_size must be a positive integer, got {batch_size!r}", param="batch_size")
    dims = resolve_dimensions(info.spec, dimensions, force=force_dimensions)
    encoded = encode_texts(texts)
    instr = resolve_instruction(info.spec, input_type, instruction)
    chunk_size = min(batch_size or info.max_batch_size, info.max_batch_size)
    chunks = plan_chunks([len(t) for t in encoded], chunk_size) if encoded else []
    return EmbedPlan(
        info=info,
        texts=tuple(encoded),
        instruction=instr.encode("utf-8"),
        truncate=bool(truncate),
        dimensions=dims,
        normalize=bool(normalize),
        chunks=tuple(chunks),
    )


def slice_embeddings(embeddings: np.ndarray, dimensions: int, *, normalize: bool = True) -> np.ndarray:
    """Keep the first ``dimensions`` columns (Matryoshka) and, if ``normalize``, L2-normalize rows.

    The server returns full-size L2-normalized vectors; a prefix of one is not unit-length, hence the
    re-normalization. All-zero rows stay zero.
    """
    out = np.ascontiguousarray(embeddings[:, :dimensions], dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.maximum(norms, np.finfo(np.float32).tiny)
    return out.astype(np.float32, copy=False)


# --- error mapping -----------------------------------------------------------------------------
# One table: transport status -> error class. gRPC statuses arrive as "StatusCode.NAME", HTTP as "503".
_STATUS_ERRORS: dict[str, type[EmbeddingError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "OUT_OF_RANGE": InvalidArgument,
    "FAILED_PRECONDITION": InvalidArgument,
    "RESOURCE_EXHAUSTED": InvalidArgument,  # gRPC: message larger than the channel allows
    "400": InvalidArgument,
    "413": InvalidArgument,
    "NOT_FOUND": ModelNotFound,
    "404": ModelNotFound,
    # gRPC UNAVAILABLE / HTTP 503 without a queue message: the server is down, restarting or not ready.
    "UNAVAILABLE": ConnectionFailed,
    "503": ConnectionFailed,
    "429": Overloaded,
    "DEADLINE_EXCEEDED": Timeout,
    "408": Timeout,
    "504": Timeout,
    "INTERNAL": ServerError,
    "UNKNOWN": ServerError,
    "UNIMPLEMENTED": ServerError,
    "DATA_LOSS": ServerError,
    "500": ServerError,
    "501": ServerError,
    "502": ServerError,
}
# Message patterns that override the status (checked in order), each only for the statuses where
# it is ambiguous. Triton reports an unknown model as INVALID_ARG, NOT_FOUND or UNAVAILABLE
# depending on version and route; gRPC reports a refused connection as UNAVAILABLE, like a full
# queue, and only the message tells them apart. INVALID_ARG messages (which may quote user text)
# are never reinterpreted except for the unknown-model wording.
_AMBIGUOUS = frozenset({"UNAVAILABLE", "503", "UNKNOWN", "CANCELLED", "INTERNAL", "500", ""})
_MESSAGE_ERRORS: tuple[tuple[re.Pattern[str], frozenset[str], type[EmbeddingError]], ...] = (
    (
        re.compile(r"request for unknown model|failed to find model|model '[^']*' is not found", re.IGNORECASE),
        _AMBIGUOUS | {"INVALID_ARGUMENT", "NOT_FOUND", "400", "404"},
        ModelNotFound,
    ),
    (re.compile(r"queue size|queue is full|maximum queue", re.IGNORECASE), _AMBIGUOUS, Overloaded),
    (
        re.compile(
            r"failed to connect|connection refused|connect failed|connection reset|socket closed|broken pipe|"
            r"dns resolution|name resolution|name or service not known|no route to host|network is unreachable|"
            r"failed to pick subchannel|connection aborted|server disconnected|stream removed|goaway|"
            r"endpoint closing|transport is closing|server is not ready|server is stopping",
            re.IGNORECASE,
        ),
        _AMBIGUOUS,
        ConnectionFailed,
    ),
    (re.compile(r"deadline exceeded|timeout expired|timed out", re.IGNORECASE), _AMBIGUOUS, Timeout),
)


def _status_key(status: Any) -> str:
    if status is None:
        return ""
    text = str(status)
    return text.split(".", 1)[1] if text.startswith("StatusCode.") else text


def classify(status: Any, message: str) -> type[EmbeddingError]:
    """The error class for a transport status and message (see the two tables above)."""
    key = _status_key(status)
    for pattern, statuses, error in _MESSAGE_ERRORS:
        if key in statuses and pattern.search(message or ""):
            return error
    return _STATUS_ERRORS.get(key, EmbeddingError)


def _mro_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def map_error(exc: BaseException) -> EmbeddingError | None:
    """Translate a transport exception into the client's error tree.

    Handles tritonclient's ``InferenceServerException`` (``status()`` / ``message()``), raw gRPC
    ``RpcError`` (``code()`` / ``details()``), socket and aiohttp timeouts and connection errors.
    Errors already in the tree pass through. Returns None for anything else (a bug, not an I/O
    failure), which the shells re-raise unchanged.
    """
    if isinstance(exc, EmbeddingError):
        return exc
    status_fn, message_fn = getattr(exc, "status", None), getattr(exc, "message", None)
    if callable(status_fn) and callable(message_fn):  # tritonclient.utils.InferenceServerException
        status, message = status_fn(), message_fn() or str(exc)
        return classify(status, message)(str(message), status=None if status is None else str(status))
    code_fn, details_fn = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code_fn) and callable(details_fn):  # grpc.RpcError
        status, message = str(code_fn()), details_fn() or str(exc)
        return classify(status, message)(str(message), status=status)
    names = _mro_names(exc)
    message = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) or names & {"ServerTimeoutError", "Timeout", "TimeoutError"}:
        return Timeout(f"request timed out: {message}")
    if isinstance(exc, (ConnectionError, OSError)) or names & {"ClientConnectionError", "ServerDisconnectedError"}:
        return ConnectionFailed(f"cannot reach the server: {message}")
    return None


# --- retries -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, for errors whose class is ``retryable``.

    Only :class:`Overloaded` and :class:`ConnectionFailed` are retried: the request never reached
    the model, so resending it cannot double any work. ``max_retries=0`` disables retries.
    Delay before retry ``k`` (0-based): ``min(max_backoff, initial_backoff * multiplier**k)``, of
    which a random fraction up to ``jitter`` is removed.
    """

    max_retries: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise InvalidArgument(f"invalid retry policy {self}")
        if not 0 <= self.jitter <= 1:
            raise InvalidArgument(f"retry jitter must be within 0..1, got {self.jitter}")

    def should_retry(self, error: EmbeddingError, attempt: int) -> bool:
        """Whether to resend after ``error`` on 0-based ``attempt``."""
        return error.retryable and attempt < self.max_retries

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        base = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return base * (1.0 - self.jitter * rand())


NO_RETRY = RetryPolicy(max_retries=0)
