"""The gateway app over a stand-in client (no Triton): routes, envelopes, auth, limits, metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from starlette.testclient import TestClient

from tritonembed.client import ConnectionFailed, InvalidArgument, ModelNotFound, Overloaded, ServerError, Timeout
from tritonembed.client.core import parse_model_config, plan_embed
from tritonembed.gateway import GatewaySettings, create_app
from tritonembed.gateway.errors import ErrorKind
from tritonembed.gateway.settings import SettingsError
from tritonembed.spec import ModelSpec

try:
    from .test_client_core import MINILM, config_for, make_spec
except ImportError:
    from test_client_core import MINILM, config_for, make_spec

QWEN = make_spec(hidden_size=1024, min_dimensions=32)
KEY = "sk-test-key"


class StubClient:
    """Stands in for AsyncEmbeddingClient: validates through the real core, answers with vectors
    derived from the text, counts one token per character."""

    def __init__(self, specs=(QWEN, MINILM)) -> None:
        self.infos = [parse_model_config(s.name, config_for(s, 16)) for s in specs]
        self.error: Exception | None = None
        self.ready = True
        self.calls: list[dict] = []
        self.closed = False

    async def models(self):
        if isinstance(self.error, ConnectionFailed):
            raise self.error
        return list(self.infos)

    async def is_ready(self, model=None):
        return self.ready

    async def embed_with_usage(self, texts, *, model, **kwargs):
        self.calls.append({"texts": list(texts), "model": model, **kwargs})
        if self.error is not None:
            raise self.error
        info = next(i for i in self.infos if i.name == model)
        plan = plan_embed(info, texts, **kwargs)
        parts = []
        for k, chunk in enumerate(plan.chunks):
            rows = []
            for i in chunk:
                v = np.random.default_rng(len(plan.texts[i]) * 7919 + plan.texts[i][0]).standard_normal(info.spec.hidden_size)
                rows.append(v / np.linalg.norm(v))
            counts = np.array([[len(plan.texts[i])] for i in chunk], dtype=np.int32)
            parts.append(plan.read_outputs(k, np.stack(rows).astype(np.float32), counts))
        return plan.finish(parts)

    async def close(self):
        self.closed = True


@pytest.fixture
def stub():
    return StubClient()


def make_client(stub, **settings) -> TestClient:
    base = {"api_keys": (KEY,), "max_request_bytes": 4096, "max_inputs": 8, "models_ttl": 60.0}
    base.update(settings)
    return TestClient(create_app(GatewaySettings(**base), client=stub), raise_server_exceptions=False)


AUTH = {"Authorization": f"Bearer {KEY}"}


def assert_envelope(response, status: int, code: str, param=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["param"] == param
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


def test_embeddings_float_and_base64(stub):
    with make_client(stub) as tc:
        r = tc.post("/v1/embeddings", json={"model": QWEN.name, "input": "How are you today?", "dimensions": 768}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == QWEN.name
        assert len(body["data"]) == 1 and body["data"][0]["index"] == 0 and body["data"][0]["object"] == "embedding"
        vec = np.array(body["data"][0]["embedding"], dtype=np.float32)
        assert vec.shape == (768,) and abs(np.linalg.norm(vec) - 1) < 1e-5
        assert body["usage"] == {"prompt_tokens": 18, "total_tokens": 18}

        texts = ["a", "bb", "ccc", "dddd"]
        rf = tc.post("/v1/embeddings", json={"model": QWEN.model_id, "input": texts, "dimensions": 512}, headers=AUTH).json()
        rb = tc.post(
            "/v1/embeddings",
            json={"model": QWEN.model_id, "input": texts, "dimensions": 512, "encoding_format": "base64"},
            headers=AUTH,
        ).json()
        assert rf["model"] == QWEN.model_id  # echoes the name the caller used
        assert [d["index"] for d in rb["data"]] == [0, 1, 2, 3]
        for f, b in zip(rf["data"], rb["data"], strict=True):
            decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
            np.testing.assert_array_equal(decoded, np.array(f["embedding"], dtype=np.float32))
        assert rb["usage"]["prompt_tokens"] == 10
    assert stub.closed is False  # an injected client belongs to the caller


def test_extension_fields_reach_the_client(stub):
    with make_client(stub) as tc:
        r = tc.post(
            "/v1/embeddings",
            json={"model": QWEN.name, "input": ["q"], "input_type": "query", "instruction": "Find code", "truncate": False},
            headers=AUTH,
        )
        assert r.status_code == 200
        call = stub.calls[-1]
        assert (call["input_type"], call["instruction"], call["truncate"], call["dimensions"]) == ("query", "Find code", False, None)
        tc.post("/embeddings", json={"model": MINILM.name, "input": "x", "user": "someone"}, headers=AUTH)  # no /v1 prefix
        assert stub.calls[-1]["model"] == MINILM.name


def test_models_routes(stub):
    with make_client(stub) as tc:
        body = tc.get("/v1/models", headers=AUTH).json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == [QWEN.name, MINILM.name]
        assert all(m["object"] == "model" for m in body["data"])
        assert tc.get(f"/v1/models/{QWEN.model_id}", headers=AUTH).json()["id"] == QWEN.name
        assert_envelope(tc.get("/v1/models/nope", headers=AUTH), 404, "model_not_found", "model")


def test_health_ready_metrics(stub):
    with make_client(stub) as tc:
        assert tc.get("/health").json() == {"status": "ok"}  # no key needed
        assert tc.get("/ready", headers=AUTH).json()["status"] == "ready"
        stub.ready = False
        assert_envelope(tc.get("/ready", headers=AUTH), 503, "not_ready")
        stub.ready = True
        stub.error = ConnectionFailed("down")
        assert_envelope(tc.get("/ready", headers=AUTH), 503, "not_ready")
        stub.error = None
        tc.post("/v1/embeddings", json={"model": QWEN.name, "input": ["ab", "c"]}, headers=AUTH)
        tc.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=AUTH)
        assert_envelope(tc.get("/metrics"), 401, "invalid_api_key")
        r = tc.get("/metrics", headers=AUTH)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    assert 'tritonembed_gateway_requests_total{route="/v1/embeddings",status="200"} 1' in text
    assert 'tritonembed_gateway_requests_total{route="/v1/embeddings",status="404"} 1' in text
    assert 'tritonembed_gateway_errors_total{code="model_not_found"} 1' in text
    assert f'tritonembed_gateway_tokens_total{{model="{QWEN.name}"}} 3' in text
    assert f'tritonembed_gateway_inputs_total{{model="{QWEN.name}"}} 2' in text
    assert 'tritonembed_gateway_request_duration_seconds_bucket{route="/v1/embeddings",le="+Inf"} 2' in text
    assert 'tritonembed_gateway_request_duration_seconds_count{route="/v1/embeddings"} 2' in text
    assert "tritonembed_gateway_requests_in_flight 1" in text  # the /metrics request itself
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_auth(stub):
    body = {"model": QWEN.name, "input": "x"}
    with make_client(stub, api_keys=("k1", "k2")) as tc:
        assert_envelope(tc.post("/v1/embeddings", json=body), 401, "invalid_api_key")
        assert_envelope(tc.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
        assert_envelope(tc.post("/v1/embeddings", json=body, headers={"Authorization": "Basic k1"}), 401, "invalid_api_key")
        assert_envelope(tc.get("/v1/models"), 401, "invalid_api_key")
        assert_envelope(tc.get("/ready"), 401, "invalid_api_key")
        r = tc.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
        assert "nope" not in r.text and r.headers["www-authenticate"] == "Bearer"
        for key in ("k1", "k2"):
            assert tc.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with make_client(stub, api_keys=()) as tc:  # no keys configured: open
        assert tc.post("/v1/embeddings", json=body).status_code == 200


def test_body_limit_before_parsing(stub):
    with make_client(stub, max_request_bytes=200) as tc:
        big = json.dumps({"model": QWEN.name, "input": "x" * 500})
        err = assert_envelope(
            tc.post("/v1/embeddings", content=big, headers={**AUTH, "Content-Type": "application/json"}), 413, "request_too_large"
        )
        assert "200 bytes" in err["message"]

        def chunked():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b"x" * 50

        assert_envelope(tc.post("/v1/embeddings", content=chunked(), headers=AUTH), 413, "request_too_large")
        assert not stub.calls
        assert tc.post("/v1/embeddings", json={"model": QWEN.name, "input": "ok"}, headers=AUTH).status_code == 200


# (request body or raw bytes, status, code, param): every documented 4xx from bad input.
BAD_REQUESTS = [
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_value", None),
    ({"input": "x"}, 400, "invalid_value", "model"),
    ({"model": QWEN.name}, 400, "invalid_value", "input"),
    ({"model": QWEN.name, "input": ""}, 400, "invalid_value", "input[0]"),
    ({"model": QWEN.name, "input": []}, 400, "invalid_value", "input"),
    ({"model": QWEN.name, "input": ["ok", ""]}, 400, "invalid_value", "input[1]"),
    # one blank rule (tritonembed.text_rules): whitespace, control, format and separator characters only
    ({"model": QWEN.name, "input": ["ok", " \t\n"]}, 400, "invalid_value", "input[1]"),
    ({"model": QWEN.name, "input": ["ok", "ok", "\x00\x01\x7f"]}, 400, "invalid_value", "input[2]"),
    ({"model": QWEN.name, "input": ["\u200b\u200d\ufeff"]}, 400, "invalid_value", "input[0]"),
    ({"model": QWEN.name, "input": ["ok", "\u3000\u2028\u00a0"]}, 400, "invalid_value", "input[1]"),
    ({"model": QWEN.name, "input": ["ok", 3]}, 400, "invalid_value", "input"),
    ({"model": QWEN.name, "input": {"text": "x"}}, 400, "invalid_value", "input"),
    ({"model": QWEN.name, "input": ["x"] * 9}, 400, "too_many_inputs", "input"),
    ({"model": QWEN.name, "input": [1, 2, 3]}, 400, "unsupported_input", "input"),
    ({"model": QWEN.name, "input": "x", "dimensions": 31}, 400, "invalid_value", "dimensions"),
    ({"model": QWEN.name, "input": "x", "dimensions": 1025}, 400, "invalid_value", "dimensions"),
    ({"model": QWEN.name, "input": "x", "dimensions": 0}, 400, "invalid_value", "dimensions"),
    ({"model": QWEN.name, "input": "x", "dimensions": "768"}, 400, "invalid_value", "dimensions"),
    ({"model": MINILM.name, "input": "x", "dimensions": 256}, 400, "invalid_value", "dimensions"),
    ({"model": QWEN.name, "input": "x", "encoding_format": "int8"}, 400, "invalid_value", "encoding_format"),
    ({"model": QWEN.name, "input": "x", "input_type": "passage"}, 400, "invalid_value", "input_type"),
    ({"model": QWEN.name, "input": "x", "input_type": "document", "instruction": "Find"}, 400, "invalid_value", "instruction"),
    ({"model": QWEN.name, "input": "x", "truncate": "no"}, 400, "invalid_value", "truncate"),
    ({"model": QWEN.name, "input": "x", "frobnicate": True}, 400, "invalid_value", "frobnicate"),
    ({"model": QWEN.name, "input": "bad \udcff"}, 400, "invalid_value", "input[0]"),
    ({"model": "no-such-model", "input": "x"}, 404, "model_not_found", "model"),
    # MiniLM's query template has no {instruction} slot: an instruction would be silently ignored
    ({"model": MINILM.name, "input": "x", "instruction": "Find code"}, 400, "invalid_value", "instruction"),
    # malformed JSON of every kind is a 400, never a 500
    (b"[" * 100_000, 400, "invalid_json", None),
    (b'{"model": "m", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json", None),
    (b'{"model": "m", "input": "x", "dimensions": ' + b"7" * 5000 + b"}", 400, "invalid_json", None),
    (b'\xff\xfe\x00', 400, "invalid_json", None),
]

# What no error message may mention: Python internals and client-only options.
INTERNALS = ("sys.", "set_int_max_str_digits", "Traceback", "RecursionError", "pydantic", "force_dimensions", "File \"")


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD_REQUESTS)
def test_bad_requests_get_the_envelope(stub, body, status, code, param):
    with make_client(stub, max_request_bytes=1 << 20) as tc:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = tc.post("/v1/embeddings", content=content, headers={**AUTH, "Content-Type": "application/json"})
        error = assert_envelope(r, status, code, param)
        assert r.status_code != 422
        assert not [word for word in INTERNALS if word in error["message"]], error["message"]
        ok = tc.post("/v1/embeddings", json={"model": QWEN.name, "input": "fine"}, headers=AUTH)
        assert ok.status_code == 200


def test_routes_and_methods(stub):
    with make_client(stub) as tc:
        err = assert_envelope(tc.get("/v1/nothing", headers=AUTH), 404, "not_found")
        assert "/v1/nothing" in err["message"]
        assert_envelope(tc.get("/v1/embeddings", headers=AUTH), 405, "method_not_allowed")
        assert_envelope(tc.delete("/v1/models", headers=AUTH), 405, "method_not_allowed")


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (Overloaded("Exceeds maximum queue size"), 429, "overloaded"),
        (ConnectionFailed("refused"), 503, "backend_unavailable"),
        (Timeout("deadline"), 504, "timeout"),
        (InvalidArgument("text has 900 tokens, more than max_length 512"), 400, "invalid_value"),
        # the registry resolved the model, so Triton not knowing it means it is (re)loading it
        (ModelNotFound("Request for unknown model"), 503, "not_ready"),
        (ServerError("secret internal detail"), 500, "internal_error"),
        (RuntimeError("secret bug detail"), 500, "internal_error"),
    ],
)
def test_client_errors_map_to_statuses(stub, error, status, code):
    with make_client(stub) as tc:
        stub.error = error
        r = tc.post("/v1/embeddings", json={"model": QWEN.name, "input": "x"}, headers=AUTH)
        err = assert_envelope(r, status, code, "model" if code == "not_ready" else None)
        assert "secret" not in r.text  # internal details stay in the log
        if status in (429, 503):
            assert r.headers["retry-after"]
        if isinstance(error, InvalidArgument):
            assert "900 tokens" in err["message"]  # the server's reason is the caller's business
        stub.error = None
        assert tc.post("/v1/embeddings", json={"model": QWEN.name, "input": "x"}, headers=AUTH).status_code == 200


def test_error_table_is_complete():
    statuses = {k.status for k in ErrorKind}
    assert statuses == {400, 401, 404, 405, 413, 429, 500, 503, 504}
    assert len({k.value for k in ErrorKind}) == len(ErrorKind)


def test_token_id_input_decoded_with_the_model_tokenizer(stub, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    ModelSpec.from_dict(MINILM.to_dict()).save(tmp_path)
    with make_client(stub, model_dirs=(tmp_path,), token_ids="native") as tc:
        r = tc.post("/v1/embeddings", json={"model": MINILM.name, "input": [[1, 2], [3]]}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert stub.calls[-1]["texts"] == ["hello world", "again"]
        r = tc.post("/v1/embeddings", json={"model": MINILM.name, "input": [1, 3]}, headers=AUTH)
        assert stub.calls[-1]["texts"] == ["hello again"] and len(r.json()["data"]) == 1
        for bad, where in (([99], "input[0]"), ([[1], []], "input[1]")):
            assert_envelope(tc.post("/v1/embeddings", json={"model": MINILM.name, "input": bad}, headers=AUTH),
                            400, "invalid_value", where)
        # the other model has no tokenizer configured
        assert_envelope(tc.post("/v1/embeddings", json={"model": QWEN.name, "input": [1]}, headers=AUTH), 400, "unsupported_input", "input")


def test_background_gateway_wait_ready_sends_the_key(stub):
    from tritonembed.gateway import BackgroundGateway

    settings = GatewaySettings(port=0, api_keys=(KEY,), log_level="warning")
    with BackgroundGateway(settings, client=stub) as gw:
        gw.wait_ready(timeout=10)  # /ready needs the key: wait_ready sends it
        stub.ready = False
        with pytest.raises(RuntimeError, match="503"):
            gw.wait_ready(timeout=0.5)


def test_admission_refuses_inputs_over_the_in_flight_limit(stub):
    gate, entered = threading.Event(), threading.Semaphore(0)
    answer = stub.embed_with_usage

    async def held(texts, **kwargs):  # stays in flight until the test opens the gate
        entered.release()
        while not gate.is_set():
            await asyncio.sleep(0.005)
        return await answer(texts, **kwargs)

    stub.embed_with_usage = held
    body = lambda texts: {"model": QWEN.name, "input": texts}  # noqa: E731
    with make_client(stub, max_inputs=4, max_pending_inputs=5) as tc, ThreadPoolExecutor(2) as pool:
        first = pool.submit(tc.post, "/v1/embeddings", json=body(["a", "b", "c", "d"]), headers=AUTH)
        assert entered.acquire(timeout=10)
        refused = tc.post("/v1/embeddings", json=body(["e", "f"]), headers=AUTH)  # 4 + 2 > 5
        err = assert_envelope(refused, 429, "overloaded")
        assert "4 inputs in flight" in err["message"] and "limit 5" in err["message"]
        assert refused.headers["retry-after"]
        admitted = pool.submit(tc.post, "/v1/embeddings", json=body(["g"]), headers=AUTH)  # 4 + 1 fits
        assert entered.acquire(timeout=10)
        assert "tritonembed_gateway_inputs_in_flight 5" in tc.get("/metrics", headers=AUTH).text
        gate.set()
        assert first.result(timeout=10).status_code == 200
        assert len(admitted.result(timeout=10).json()["data"]) == 1
        # everything released: the refused request now goes through
        assert tc.post("/v1/embeddings", json=body(["e", "f"]), headers=AUTH).status_code == 200
        assert "tritonembed_gateway_inputs_in_flight 0" in tc.get("/metrics", headers=AUTH).text


def test_admission_releases_on_errors(stub):
    with make_client(stub, max_inputs=4, max_pending_inputs=4) as tc:
        stub.error = Timeout("deadline")
        for _ in range(3):
            assert tc.post("/v1/embeddings", json={"model": QWEN.name, "input": ["a", "b", "c"]}, headers=AUTH).status_code == 504
        stub.error = None
        assert tc.post("/v1/embeddings", json={"model": QWEN.name, "input": ["a", "b", "c", "d"]}, headers=AUTH).status_code == 200


def test_pending_limit_must_admit_the_largest_request():
    with pytest.raises(SettingsError, match="max_pending_inputs"):
        GatewaySettings(max_inputs=16, max_pending_inputs=8)


# --- token-id modes (issue 15: LangChain's default tiktoken ids gave wrong vectors with a 200) -----
def test_token_ids_are_refused_by_default_with_the_fix_named(stub):
    with make_client(stub) as tc:
        for body in ([1, 2, 3], [[9906, 1917]]):
            err = assert_envelope(
                tc.post("/v1/embeddings", json={"model": MINILM.name, "input": body}, headers=AUTH), 400, "unsupported_input", "input"
            )
            assert "check_embedding_ctx_length=False" in err["message"] and "--token-ids tiktoken:cl100k_base" in err["message"]
        assert not stub.calls  # refused before anything reaches Triton


def test_token_ids_tiktoken_decodes_cl100k(stub):
    from tritonembed.gateway.tokens import load_cl100k

    enc = load_cl100k()
    texts = ["hello world", "敏捷的棕色狐狸跳过了懒狗。", "  spaces and\nnewlines  "]
    with make_client(stub, token_ids="tiktoken:cl100k_base") as tc:
        r = tc.post("/v1/embeddings", json={"model": MINILM.name, "input": [enc.encode(t) for t in texts]}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert stub.calls[-1]["texts"] == texts
        r = tc.post("/v1/embeddings", json={"model": QWEN.name, "input": enc.encode("one row")}, headers=AUTH)
        assert r.status_code == 200 and stub.calls[-1]["texts"] == ["one row"]
        err = assert_envelope(
            tc.post("/v1/embeddings", json={"model": MINILM.name, "input": [[1], [enc.n_vocab]]}, headers=AUTH),
            400, "invalid_value", "input[1]",
        )
        assert str(enc.n_vocab) in err["message"]


def test_token_ids_native_needs_model_dirs():
    with pytest.raises(SettingsError, match="--model-dir"):
        GatewaySettings(token_ids="native")
    with pytest.raises(SettingsError, match="token_ids"):
        GatewaySettings(token_ids="cl100k")
    assert GatewaySettings.from_env({"TRITONEMBED_TOKEN_IDS": "tiktoken:cl100k_base"}).token_ids == "tiktoken:cl100k_base"
    assert GatewaySettings().token_ids == "off"


def test_serve_passes_model_dirs_but_token_ids_stay_off(tmp_path):
    """`tritonembed serve` hands its exports to the gateway; that alone must not enable native decoding."""
    from tritonembed.gateway.tokens import TokenDecoder

    ModelSpec.from_dict(MINILM.to_dict()).save(tmp_path)
    (tmp_path / MINILM.tokenizer_file).write_text("{}")
    decoder = TokenDecoder(GatewaySettings(model_dirs=(tmp_path,)).token_ids, (tmp_path,))
    assert not decoder.supports(MINILM)


# --- Triton down or restarting --------------------------------------------------------------
def test_a_model_served_before_and_gone_now_is_503_not_ready(stub):
    with make_client(stub, models_ttl=0.0) as tc:
        assert tc.post("/v1/embeddings", json={"model": MINILM.name, "input": "x"}, headers=AUTH).status_code == 200
        served, stub.infos = stub.infos, []  # Triton restarted and is loading its models
        r = tc.post("/v1/embeddings", json={"model": MINILM.model_id, "input": "x"}, headers=AUTH)
        assert_envelope(r, 503, "not_ready", "model")
        assert r.headers["retry-after"]
        # while nothing is ready, an unknown name cannot be told apart from a loading one
        assert_envelope(tc.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=AUTH), 503, "not_ready", "model")
        stub.infos = served
        assert tc.post("/v1/embeddings", json={"model": MINILM.name, "input": "x"}, headers=AUTH).status_code == 200
        assert_envelope(tc.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=AUTH), 404, "model_not_found", "model")


def test_request_deadline_is_504(stub):
    class SlowStub(StubClient):
        async def embed_with_usage(self, texts, *, model, **kwargs):
            await asyncio.sleep(30)

    with make_client(SlowStub(), request_deadline=0.3) as tc:
        r = tc.post("/v1/embeddings", json={"model": MINILM.name, "input": "x"}, headers=AUTH)
        err = assert_envelope(r, 504, "timeout")
        assert "0.3 s" in err["message"]
        assert tc.get("/health").status_code == 200


def test_head_health_without_key(stub):
    with make_client(stub) as tc:
        r = tc.head("/health")
        assert r.status_code == 200 and r.content == b""


def test_dimensions_advice_fits_an_http_caller(stub):
    with make_client(stub) as tc:
        err = assert_envelope(
            tc.post("/v1/embeddings", json={"model": MINILM.name, "input": "x", "dimensions": 256}, headers=AUTH),
            400, "invalid_value", "dimensions",
        )
        assert f"must be {MINILM.hidden_size}" in err["message"] and "force_dimensions" not in err["message"]


def test_readme_gateway_command_parses_and_starts(monkeypatch):
    """`tritonembed gateway --triton-url 127.0.0.1:8001 --port 8080` (the README's line) used to crash on --log-level."""
    from tritonembed import cli
    from tritonembed.gateway import server

    started = []
    monkeypatch.setattr(server, "run_gateway", lambda settings: started.append(settings))
    assert cli.main(["gateway", "--triton-url", "127.0.0.1:8001", "--port", "8080"]) == 0
    assert started[0].triton_url == "127.0.0.1:8001" and started[0].port == 8080 and started[0].token_ids == "off"
    assert cli.main(["gateway", "--triton-url", "127.0.0.1:8001", "--token-ids", "tiktoken:cl100k_base"]) == 0
    assert started[1].token_ids == "tiktoken:cl100k_base"
