"""The client's pure core: URL parsing, config parsing, validation, chunking, slicing, errors, retries."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tritonembed.client import core
from tritonembed.client.errors import (
    ConnectionFailed,
    EmbeddingError,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    ServerError,
    Timeout,
)
from tritonembed.spec import EMBEDDING_OUTPUT_NAME, INSTRUCTION, SPEC_PARAMETER_KEY, TEXT, TOKEN_COUNT, TRUNCATE, ModelSpec


def make_spec(**overrides) -> ModelSpec:
    base = dict(
        name="Qwen3-Embedding-4B",
        model_id="Qwen/Qwen3-Embedding-4B",
        family="qwen3",
        pooling="last_token",
        normalize=True,
        hidden_size=2560,
        max_length=512,
        padding_side="left",
        pad_token_id=151643,
        precision="fp32",
        matryoshka=True,
        min_dimensions=32,
        query_template="Instruct: {instruction}\nQuery:{text}",
        default_query_instruction="Given a web search query, retrieve relevant passages that answer the query",
    )
    base.update(overrides)
    return ModelSpec(**base)


QWEN = make_spec()
MINILM = make_spec(
    name="all-MiniLM-L6-v2",
    model_id="sentence-transformers/all-MiniLM-L6-v2",
    family="bert",
    pooling="mean",
    hidden_size=384,
    padding_side="right",
    pad_token_id=0,
    matryoshka=False,
    min_dimensions=None,
    query_template="{text}",
    default_query_instruction="",
)


def config_for(spec: ModelSpec, max_batch_size: int = 64) -> dict:
    """A model config as Triton's HTTP endpoint returns it (JSON)."""
    return {
        "name": spec.name,
        "max_batch_size": max_batch_size,
        "parameters": {SPEC_PARAMETER_KEY: {"string_value": json.dumps(spec.to_dict())}},
    }


def info_for(spec: ModelSpec = QWEN, max_batch_size: int = 64) -> core.ModelInfo:
    return core.parse_model_config(spec.name, config_for(spec, max_batch_size))


# --- URL ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "protocol", "expected"),
    [
        ("localhost:8001", None, core.Target("localhost:8001", "grpc")),
        ("localhost", None, core.Target("localhost:8001", "grpc")),
        ("localhost", "http", core.Target("localhost:8000", "http")),
        ("http://triton:9000/", None, core.Target("triton:9000", "http")),
        ("https://triton", None, core.Target("triton:8000", "http", ssl=True)),
        ("grpcs://triton:443", "grpc", core.Target("triton:443", "grpc", ssl=True)),
        ("grpc://10.0.0.1:8001", None, core.Target("10.0.0.1:8001", "grpc")),
    ],
)
def test_parse_url(url, protocol, expected):
    assert core.parse_url(url, protocol) == expected


@pytest.mark.parametrize(("url", "protocol"), [("http://x:1", "grpc"), ("ftp://x", None), ("x:1", "websocket"), ("grpc://", None)])
def test_parse_url_rejects(url, protocol):
    with pytest.raises(InvalidArgument):
        core.parse_url(url, protocol)


# --- model config ------------------------------------------------------------------------------
def test_parse_model_config_http_and_grpc_shapes():
    http_cfg = config_for(QWEN, 32)
    grpc_cfg = {"config": http_cfg}
    for cfg in (http_cfg, grpc_cfg):
        info = core.parse_model_config("Qwen3-Embedding-4B", cfg)
        assert info.spec == QWEN
        assert info.max_batch_size == 32
        assert info.name == "Qwen3-Embedding-4B"


def test_parse_model_config_without_spec_is_not_a_tritonembed_model():
    with pytest.raises(ModelNotFound, match="not a tritonembed model"):
        core.parse_model_config("Qwen3-Embedding-4B_encoder", {"name": "x", "max_batch_size": 8, "parameters": {}})


def test_parse_model_config_bad_spec_or_batch():
    cfg = config_for(QWEN)
    cfg["parameters"][SPEC_PARAMETER_KEY]["string_value"] = "{not json"
    with pytest.raises(ServerError, match="invalid spec"):
        core.parse_model_config("m", cfg)
    with pytest.raises(ServerError, match="max_batch_size"):
        core.parse_model_config("m", config_for(QWEN, 0))


def test_ready_model_names_both_shapes():
    models = [
        {"name": "a", "version": "1", "state": "READY"},
        {"name": "b", "version": "1", "state": "UNAVAILABLE"},
        {"name": "c", "version": "1", "state": "READY"},
        {"name": "a", "version": "2", "state": "READY"},
    ]
    assert core.ready_model_names(models) == ["a", "c"]
    assert core.ready_model_names({"models": models}) == ["a", "c"]
    assert core.ready_model_names({}) == []


def test_choose_model():
    info = info_for()
    assert core.choose_model([info]) is info
    with pytest.raises(ModelNotFound):
        core.choose_model([])
    with pytest.raises(InvalidArgument, match="several"):
        core.choose_model([info, info_for(MINILM)])


# --- dimensions --------------------------------------------------------------------------------
@pytest.mark.parametrize(("dims", "expected"), [(None, 2560), (2560, 2560), (768, 768), (32, 32), (np.int64(512), 512)])
def test_dimensions_within_matryoshka_range(dims, expected):
    assert core.resolve_dimensions(QWEN, dims) == expected


@pytest.mark.parametrize("dims", [0, 31, -5, 2561, 512.0, "512", True, [512]])
def test_dimensions_rejected(dims):
    with pytest.raises(InvalidArgument, match="dimensions"):
        core.resolve_dimensions(QWEN, dims)


def test_dimensions_non_matryoshka_model():
    assert core.resolve_dimensions(MINILM, None) == 384
    assert core.resolve_dimensions(MINILM, 384) == 384
    with pytest.raises(InvalidArgument, match="not Matryoshka-trained.*force_dimensions"):
        core.resolve_dimensions(MINILM, 256)
    assert core.resolve_dimensions(MINILM, 256, force=True) == 256
    assert core.resolve_dimensions(QWEN, 8, force=True) == 8
    for dims in (0, 385):
        with pytest.raises(InvalidArgument):
            core.resolve_dimensions(MINILM, dims, force=True)


# --- instructions ------------------------------------------------------------------------------
def test_instruction_rules():
    default = QWEN.default_query_instruction
    assert core.resolve_instruction(QWEN, None, None) == ""
    assert core.resolve_instruction(QWEN, "document", None) == ""
    assert core.resolve_instruction(QWEN, "query", None) == default
    assert core.resolve_instruction(QWEN, "query", "Find code") == "Find code"
    assert core.resolve_instruction(QWEN, None, "Find code") == "Find code"
    assert core.resolve_instruction(QWEN, "query", "") == default  # empty = not given
    assert core.resolve_instruction(MINILM, "query", None) == ""  # no default: queries embed like documents
    with pytest.raises(InvalidArgument, match="input_type='document'"):
        core.resolve_instruction(QWEN, "document", "Find code")
    with pytest.raises(InvalidArgument, match="input_type"):
        core.resolve_instruction(QWEN, "passage", None)
    with pytest.raises(InvalidArgument, match="instruction"):
        core.resolve_instruction(QWEN, None, 42)
    with pytest.raises(InvalidArgument, match="UTF-8"):
        core.resolve_instruction(QWEN, None, "bad \ud800")


# --- texts -------------------------------------------------------------------------------------
def test_encode_texts():
    assert core.encode_texts("héllo") == ["héllo".encode()]
    assert core.encode_texts(("a", "b")) == [b"a", b"b"]
    assert core.encode_texts([]) == []
    with pytest.raises(InvalidArgument, match=r"texts\[1\] is empty"):
        core.encode_texts(["a", ""])
    with pytest.raises(InvalidArgument, match=r"texts\[0\] is not valid UTF-8"):
        core.encode_texts(["\udcff"])
    with pytest.raises(InvalidArgument, match=r"texts\[1\] must be a string"):
        core.encode_texts(["a", 3])
    for bad in (b"bytes", 42, None, {"a"}):
        with pytest.raises(InvalidArgument):
            core.encode_texts(bad)


# --- chunking ----------------------------------------------------------------------------------
def test_plan_chunks_bounded_sorted_and_restored():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=10_000)
    chunks = core.plan_chunks(lengths, 64)
    assert all(1 <= len(c) <= 64 for c in chunks)
    assert len(chunks) == -(-10_000 // 64)
    flat = np.concatenate(chunks)
    assert sorted(flat.tolist()) == list(range(10_000))  # a permutation
    sorted_lengths = lengths[flat]
    assert np.all(np.diff(sorted_lengths) <= 0)  # longest first: similar lengths share a request
    parts = [lengths[c] * 10 for c in chunks]  # "server" output computed from the sorted order
    assert np.array_equal(core.assemble(10_000, chunks, parts), lengths * 10)


def test_plan_chunks_edge_cases():
    assert core.plan_chunks([], 8) == []
    assert [c.tolist() for c in core.plan_chunks([3, 3, 3], 2)] == [[0, 1], [2]]  # stable among equals
    with pytest.raises(InvalidArgument):
        core.plan_chunks([1], 0)


def fake_server(plan: core.EmbedPlan, k: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """What the ensemble returns for chunk k: a unit vector derived from each text."""
    texts = plan.chunk_inputs(k)[0].data.reshape(-1)
    rows = []
    for text in texts:
        v = np.random.default_rng(abs(hash(text)) % 2**32).standard_normal(hidden).astype(np.float32)
        rows.append(v / np.linalg.norm(v))
    counts = np.array([[len(t.split()) + 2] for t in texts], dtype=np.int32)
    return np.stack(rows), counts


def test_plan_embed_round_trip_keeps_order():
    spec = make_spec(hidden_size=64, min_dimensions=16)
    info = info_for(spec, max_batch_size=7)
    texts = [("word " * (i % 13)) + str(i) for i in range(100)]
    plan = core.plan_embed(info, texts, dimensions=16)
    assert all(len(c) <= 7 for c in plan.chunks)
    parts = [plan.read_outputs(k, *fake_server(plan, k, 64)) for k in range(len(plan.chunks))]
    result = plan.finish(parts)
    assert result.embeddings.shape == (100, 16) and result.embeddings.dtype == np.float32
    assert result.token_counts.tolist() == [len(t.split()) + 2 for t in texts]
    assert result.total_tokens == sum(len(t.split()) + 2 for t in texts)
    one = core.plan_embed(info, texts[42], dimensions=16)
    alone = one.finish([one.read_outputs(0, *fake_server(one, 0, 64))])
    np.testing.assert_allclose(alone.embeddings[0], result.embeddings[42], atol=1e-6)


def test_plan_embed_batch_size_caps_chunks():
    info = info_for(max_batch_size=64)
    assert {len(c) for c in core.plan_embed(info, ["x"] * 100, batch_size=10).chunks} == {10}
    assert max(len(c) for c in core.plan_embed(info, ["x"] * 100, batch_size=1000).chunks) == 64
    for bad in (0, -1, True, 2.5):
        with pytest.raises(InvalidArgument, match="batch_size"):
            core.plan_embed(info, ["x"], batch_size=bad)


def test_plan_embed_empty_list():
    plan = core.plan_embed(info_for(), [], dimensions=768)
    result = plan.finish([])
    assert result.embeddings.shape == (0, 768) and result.token_counts.shape == (0,)


def test_chunk_inputs_follow_the_contract():
    info = info_for()
    plan = core.plan_embed(info, ["short", "a longer text"])
    (text,) = plan.chunk_inputs(0)  # defaults: no INSTRUCTION, no TRUNCATE
    assert (text.name, text.datatype, text.data.shape) == (TEXT.name, TEXT.dtype, (2, 1))
    assert text.data.dtype == np.dtype(TEXT.numpy_dtype)
    assert text.data[:, 0].tolist() == [b"a longer text", b"short"]  # longest first

    plan = core.plan_embed(info, ["q1", "q2"], input_type="query", truncate=False)
    names = {t.name: t for t in plan.chunk_inputs(0)}
    assert set(names) == {TEXT.name, INSTRUCTION.name, TRUNCATE.name}
    assert names[INSTRUCTION.name].datatype == INSTRUCTION.dtype
    assert names[INSTRUCTION.name].data[:, 0].tolist() == [QWEN.default_query_instruction.encode()] * 2
    assert names[TRUNCATE.name].datatype == TRUNCATE.dtype
    assert names[TRUNCATE.name].data.dtype == np.bool_ and names[TRUNCATE.name].data.shape == (2, 1)
    assert not names[TRUNCATE.name].data.any()


def test_plan_embed_rejects_bad_flags():
    for kwargs in ({"truncate": "no"}, {"normalize": None}):
        with pytest.raises(InvalidArgument):
            core.plan_embed(info_for(), ["x"], **kwargs)


def test_read_outputs_checks_shapes():
    plan = core.plan_embed(info_for(make_spec(hidden_size=64, min_dimensions=16)), ["a", "b"])
    good = (np.zeros((2, 64), np.float32), np.ones((2, 1), np.int32))
    emb, counts = plan.read_outputs(0, *good)
    assert emb.shape == (2, 64) and counts.tolist() == [1, 1]
    with pytest.raises(ServerError, match=EMBEDDING_OUTPUT_NAME):
        plan.read_outputs(0, None, good[1])
    with pytest.raises(ServerError, match=TOKEN_COUNT.name):
        plan.read_outputs(0, good[0], None)
    with pytest.raises(ServerError, match="shape"):
        plan.read_outputs(0, np.zeros((2, 32), np.float32), good[1])
    with pytest.raises(ServerError, match="shape"):
        plan.read_outputs(0, good[0], np.ones((3, 1), np.int32))


# --- Matryoshka slicing ------------------------------------------------------------------------
def test_slice_embeddings_renormalizes():
    rng = np.random.default_rng(1)
    full = rng.standard_normal((5, 2560)).astype(np.float32)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    sliced = core.slice_embeddings(full, 768)
    assert sliced.shape == (5, 768) and sliced.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sliced, axis=1), 1.0, atol=1e-6)
    expected = full[:, :768] / np.linalg.norm(full[:, :768], axis=1, keepdims=True)
    np.testing.assert_allclose(sliced, expected, atol=1e-6)
    raw = core.slice_embeddings(full, 768, normalize=False)
    np.testing.assert_array_equal(raw, full[:, :768])
    np.testing.assert_allclose(core.slice_embeddings(full, 2560), full, atol=1e-6)
    zeros = core.slice_embeddings(np.zeros((2, 8), np.float32), 4)
    assert np.all(zeros == 0) and np.all(np.isfinite(zeros))


# --- error mapping -----------------------------------------------------------------------------
class FakeRpcError(Exception):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


# Messages as tritonserver 2.51 and tritonclient 2.73 report them (seen against a real server).
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (InferenceServerException("empty text", "StatusCode.INVALID_ARGUMENT"), InvalidArgument),
        (InferenceServerException("empty text", "400"), InvalidArgument),
        (InferenceServerException("inference request batch-size must be <= 4 for 'm'", "400"), InvalidArgument),
        (InferenceServerException("Request for unknown model: 'nope' is not found", "StatusCode.NOT_FOUND"), ModelNotFound),
        (InferenceServerException("Request for unknown model: 'nope' is not found", "404"), ModelNotFound),
        (InferenceServerException("Request for unknown model: 'nope' is not found", "400"), ModelNotFound),
        (InferenceServerException("[request id: <id_unknown>] Exceeds maximum queue size", "StatusCode.UNAVAILABLE"), Overloaded),
        (InferenceServerException("[request id: <id_unknown>] Exceeds maximum queue size", "503"), Overloaded),
        (
            InferenceServerException(
                "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
                "Failed to connect to remote host: Connection refused",
                "StatusCode.UNAVAILABLE",
            ),
            ConnectionFailed,
        ),
        (InferenceServerException("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED"), Timeout),
        (InferenceServerException("Request timeout expired", "StatusCode.UNAVAILABLE"), Timeout),
        (InferenceServerException("Stub process is not healthy", "StatusCode.INTERNAL"), ServerError),
        (InferenceServerException("boom", "500"), ServerError),
        (InferenceServerException("Received message larger than max", "StatusCode.RESOURCE_EXHAUSTED"), InvalidArgument),
        (InferenceServerException("something odd", None), EmbeddingError),
        # an INVALID_ARG that quotes user text is never reinterpreted by its wording
        (InferenceServerException("text 'connection refused, queue size' has 900 tokens", "400"), InvalidArgument),
        (FakeRpcError("StatusCode.UNAVAILABLE", "Socket closed"), ConnectionFailed),
        (FakeRpcError("StatusCode.INVALID_ARGUMENT", "bad"), InvalidArgument),
        (ConnectionRefusedError(111, "Connection refused"), ConnectionFailed),
        (ConnectionResetError(104, "Connection reset by peer"), ConnectionFailed),
        (TimeoutError("timed out"), Timeout),
        (asyncio.TimeoutError(), Timeout),
    ],
)
def test_map_error(exc, expected):
    error = core.map_error(exc)
    assert type(error) is expected
    assert error.message


def test_map_error_keeps_status_and_passes_through():
    error = core.map_error(InferenceServerException("Exceeds maximum queue size", "503"))
    assert error.status == "503" and error.retryable
    same = InvalidArgument("x")
    assert core.map_error(same) is same
    assert core.map_error(ValueError("a bug")) is None  # not an I/O failure: re-raised as is


def test_map_error_aiohttp():
    aiohttp = pytest.importorskip("aiohttp")
    assert type(core.map_error(aiohttp.ServerDisconnectedError())) is ConnectionFailed
    assert type(core.map_error(aiohttp.ServerTimeoutError("read timeout"))) is Timeout


def test_error_tree():
    for cls in (ConnectionFailed, Timeout, InvalidArgument, Overloaded, ModelNotFound, ServerError):
        assert issubclass(cls, EmbeddingError)
    assert issubclass(InvalidArgument, ValueError)
    assert {c for c in (ConnectionFailed, Timeout, InvalidArgument, Overloaded, ModelNotFound, ServerError) if c.retryable} == {
        ConnectionFailed,
        Overloaded,
    }


# --- retries -----------------------------------------------------------------------------------
def test_retry_policy_backoff_capped_with_jitter():
    policy = core.RetryPolicy(max_retries=5, initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.5)
    no_jitter = [policy.delay(k, rand=lambda: 0.0) for k in range(8)]
    assert no_jitter[:5] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert max(no_jitter) == 1.0
    full_jitter = [policy.delay(k, rand=lambda: 1.0) for k in range(8)]
    assert full_jitter == pytest.approx([d / 2 for d in no_jitter])
    assert policy.should_retry(Overloaded("q"), 4)
    assert not policy.should_retry(Overloaded("q"), 5)
    assert policy.should_retry(ConnectionFailed("c"), 0)
    for error in (Timeout("t"), InvalidArgument("i"), ServerError("s"), ModelNotFound("m")):
        assert not policy.should_retry(error, 0)
    assert not core.NO_RETRY.should_retry(Overloaded("q"), 0)
    with pytest.raises(InvalidArgument):
        core.RetryPolicy(jitter=2)
    with pytest.raises(InvalidArgument):
        core.RetryPolicy(max_retries=-1)


# --- issue 15: exact errors ---------------------------------------------------------------------
def test_dimensions_hint_is_for_python_callers_only():
    with pytest.raises(InvalidArgument) as exc:
        core.resolve_dimensions(MINILM, 256)
    assert "force_dimensions" in str(exc.value) and "force_dimensions" not in exc.value.message
    assert exc.value.hint and exc.value.param == "dimensions"


def test_instruction_needs_an_instruction_template():
    with pytest.raises(InvalidArgument, match="takes no instruction") as exc:
        core.resolve_instruction(MINILM, None, "x" * 1_000_000)
    assert exc.value.param == "instruction"
    e5 = make_spec(name="e5", query_template="query: {text}", document_template="passage: {text}",
                   default_query_instruction="query")
    assert core.resolve_instruction(e5, "query", None) == "query"  # the prefix template applies
    with pytest.raises(InvalidArgument, match="input_type='query'"):
        core.resolve_instruction(e5, None, "Find code")


@pytest.mark.parametrize(
    ("text", "blank"),
    [("", True), ("   ", True), ("\t\n\r", True), ("\x00\x01\x1f\x7f", True), ("\u200b", True),
     ("\ufeff\u200d\u2060", True), ("\u3000\u00a0\u2028\u2029", True), ("\U000e0041", True),
     ("a", False), ("\u200ba", False), (".", False), ("\x00x", False), ("日本", False), ("🙂", False)],
)
def test_one_blank_rule(text, blank):
    from tritonembed.text_rules import is_blank

    assert is_blank(text) is blank
    if blank:
        with pytest.raises(InvalidArgument, match=r"texts\[1\] is empty") as exc:
            core.encode_texts(["ok", text])
        assert exc.value.param == "texts[1]"
    else:
        assert core.encode_texts(["ok", text])[1] == text.encode()


def test_server_errors_name_the_callers_index():
    info = core.parse_model_config(QWEN.name, config_for(QWEN, 16))
    texts = [f"text number {i} " + "x" * (i % 7) for i in range(200)]
    plan = core.plan_embed(info, texts)
    k, j = 3, 7
    caller = int(plan.chunks[k][j])
    error = core.map_error(InferenceServerException(f"text {j} has 900 tokens, more than max_length 512", "400"))
    located = plan.locate_error(k, error)
    assert isinstance(located, InvalidArgument)
    assert located.message == f"texts[{caller}] has 900 tokens, more than max_length 512"
    assert located.param == f"texts[{caller}]"
    bracketed = plan.locate_error(k, InvalidArgument(f"input[{j}] is empty"))
    assert bracketed.message == f"texts[{caller}] is empty"
    unrelated = InvalidArgument("batch too large")
    assert plan.locate_error(k, unrelated) is unrelated


def test_unavailable_without_a_queue_message_is_a_connection_failure():
    refused = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"
    assert core.classify("StatusCode.UNAVAILABLE", refused) is ConnectionFailed
    assert core.classify("StatusCode.UNAVAILABLE", "Socket closed") is ConnectionFailed
    assert core.classify("StatusCode.UNAVAILABLE", "") is ConnectionFailed
    assert core.classify("503", "") is ConnectionFailed
    assert core.classify("StatusCode.UNAVAILABLE", "Exceeds maximum queue size") is Overloaded


def test_grpc_channel_reconnects_quickly():
    from tritonembed.client import _transport

    options = dict(_transport.grpc_channel_args())
    assert options["grpc.max_reconnect_backoff_ms"] <= 1000
    assert options["grpc.initial_reconnect_backoff_ms"] <= options["grpc.max_reconnect_backoff_ms"]
    assert options["grpc.max_receive_message_length"] == 2**31 - 1  # tritonclient's default kept
