"""The gateway over real HTTP (uvicorn on a free port) in front of the real tritonserver, driven by
the official ``openai`` client and by raw HTTP for the error cases."""

from __future__ import annotations

import base64
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tritonembed.client import EmbeddingClient
from tritonembed.gateway import BackgroundGateway, GatewaySettings
from tritonembed.launcher import free_port

pytestmark = pytest.mark.integration

KEY = "sk-integration-test"
MAX_INPUTS = 64
MAX_BODY = 1 << 20
TOL = 1e-5
# What no answer may mention: Python internals and client-only options.
INTERNALS = ("Traceback", "sys.", "set_int_max_str_digits", "RecursionError", "pydantic", "force_dimensions", "File \"")
FOUR = ["The quick brown fox.", "敏捷的棕色狐狸跳过了懒狗。", "How are you today?", "Embeddings " * 30]


@pytest.fixture(scope="module")
def gateway(triton):
    settings = GatewaySettings(
        triton_url=triton.grpc_url,
        port=0,
        api_keys=(KEY,),
        max_inputs=MAX_INPUTS,
        max_request_bytes=MAX_BODY,
        model_dirs=(triton.export_dirs["qwen"], triton.export_dirs["minilm"]),
        token_ids="native",
        log_level="warning",
    )
    with BackgroundGateway(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
def oai(gateway):
    return openai.Client(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def full(triton):
    """Reference full-size embeddings straight from the client (dimensions=None)."""
    with EmbeddingClient(triton.grpc_url) as client:

        def embed(key: str, texts: list[str]) -> np.ndarray:
            return client.embed(texts, model=triton.specs[key].name)

        yield embed


def truncated(v: np.ndarray, d: int) -> np.ndarray:
    s = v[:, :d]
    return s / np.linalg.norm(s, axis=1, keepdims=True)


def qwen_tokenizer(triton):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(triton.export_dirs["qwen"] / triton.specs["qwen"].tokenizer_file))
    tok.no_padding()
    return tok


def test_seed_calls_through_the_openai_client(triton, oai, full):
    spec = triton.specs["qwen"]
    one = oai.embeddings.create(model=spec.name, input="How are you today?", encoding_format="float", dimensions=768)
    vec = np.array(one.data[0].embedding, dtype=np.float32)
    assert vec.shape == (768,) and abs(np.linalg.norm(vec) - 1) < TOL
    np.testing.assert_allclose(vec, truncated(full("qwen", ["How are you today?"]), 768)[0], atol=TOL)
    assert one.model == spec.name and one.object == "list" and one.data[0].index == 0

    many = oai.embeddings.create(model=spec.name, input=FOUR, dimensions=512)  # default: base64 on the wire
    got = np.array([d.embedding for d in many.data], dtype=np.float32)
    assert [d.index for d in many.data] == [0, 1, 2, 3]
    assert got.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=TOL)
    np.testing.assert_allclose(got, truncated(full("qwen", FOUR), 512), atol=TOL)

    as_float = oai.embeddings.create(model=spec.name, input=FOUR, dimensions=512, encoding_format="float")
    assert [d.embedding for d in as_float.data] == [d.embedding for d in many.data]  # base64 == float, exactly

    tok = qwen_tokenizer(triton)
    assert many.usage.prompt_tokens == many.usage.total_tokens == sum(len(tok.encode(t).ids) for t in FOUR)
    assert one.usage.prompt_tokens == len(tok.encode("How are you today?").ids)


def test_base64_on_the_wire_is_little_endian_float32(triton, http):
    spec = triton.specs["qwen"]
    body = {"model": spec.name, "input": FOUR[:2], "dimensions": 256}
    b64 = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    flt = http.post("/v1/embeddings", json=body).json()
    for b, f in zip(b64["data"], flt["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f["embedding"], dtype=np.float32))


def test_model_aliases_and_listing(triton, oai, full):
    spec = triton.specs["qwen"]
    by_id = oai.embeddings.create(model=spec.model_id, input="alias", encoding_format="float")
    assert by_id.model == spec.model_id
    np.testing.assert_allclose(np.array(by_id.data[0].embedding), full("qwen", ["alias"])[0], atol=TOL)
    assert sorted(m.id for m in oai.models.list()) == sorted(s.name for s in triton.specs.values())
    assert oai.models.retrieve(spec.name).id == spec.name
    minilm = triton.specs["minilm"]
    res = oai.embeddings.create(model=minilm.model_id, input=["a", "b"], encoding_format="float")
    assert len(res.data[0].embedding) == minilm.hidden_size


def test_extensions_query_instruction_truncate(triton, http, full):
    spec = triton.specs["qwen"]
    with EmbeddingClient(triton.grpc_url, spec.name) as client:
        want_query = client.embed(["what is triton?"], input_type="query")
        want_custom = client.embed(["what is triton?"], instruction="Find code")
    q = http.post("/v1/embeddings", json={"model": spec.name, "input": "what is triton?", "input_type": "query"}).json()
    np.testing.assert_allclose(np.array(q["data"][0]["embedding"]), want_query[0], atol=TOL)
    c = http.post("/v1/embeddings", json={"model": spec.name, "input": "what is triton?", "instruction": "Find code"}).json()
    np.testing.assert_allclose(np.array(c["data"][0]["embedding"]), want_custom[0], atol=TOL)
    d = http.post("/v1/embeddings", json={"model": spec.name, "input": "what is triton?", "input_type": "document"}).json()
    np.testing.assert_allclose(np.array(d["data"][0]["embedding"]), full("qwen", ["what is triton?"])[0], atol=TOL)
    long_text = "token " * (spec.max_length + 20)
    cut = http.post("/v1/embeddings", json={"model": spec.name, "input": long_text}).json()
    assert cut["usage"]["prompt_tokens"] == spec.max_length


def test_token_id_input(triton, oai, full):
    spec = triton.specs["qwen"]
    tok = qwen_tokenizer(triton)
    texts = ["token ids round-trip", "数据 模型"]
    rows = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    res = oai.embeddings.create(model=spec.name, input=rows, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in res.data]), full("qwen", texts), atol=TOL)
    single = oai.embeddings.create(model=spec.name, input=rows[0], encoding_format="float")
    np.testing.assert_allclose(np.array(single.data[0].embedding), full("qwen", texts[:1])[0], atol=TOL)


def _bad_requests(triton) -> list[tuple[str, dict]]:
    """(name, request kwargs for httpx, expected status, code[, param]) for every documented error."""
    qwen, minilm = triton.specs["qwen"], triton.specs["minilm"]
    q = qwen.name
    long_text = "token " * (qwen.max_length + 50)
    many = [f"text {i}" for i in range(MAX_INPUTS)]
    long_at_50 = many[:50] + [long_text] + many[51:]
    blank_at_40 = many[:40] + ["\u200b"] + many[41:]
    return [
        # issue 15: the caller's index (in message and param), whatever chunk the server saw it in
        ("too long at 50 of 64, truncate off", {"json": {"model": q, "input": long_at_50, "truncate": False}},
         400, "invalid_value", "input[50]"),
        ("zero-width only at 40 of 64", {"json": {"model": q, "input": blank_at_40}}, 400, "invalid_value", "input[40]"),
        ("control characters only", {"json": {"model": q, "input": ["ok", "\x00\x01\x02"]}}, 400, "invalid_value", "input[1]"),
        ("separators only", {"json": {"model": q, "input": ["\u3000\u2028\u00a0"]}}, 400, "invalid_value", "input[0]"),
        ("instruction on a model without one", {"json": {"model": minilm.name, "input": "x", "instruction": "I" * 100_000}},
         400, "invalid_value", "instruction"),
        ("100k-deep JSON", {"content": b"[" * 100_000}, 400, "invalid_json"),
        ("5,000-digit integer", {"content": b'{"model": "%s", "input": "x", "dimensions": %s}' % (q.encode(), b"9" * 5000)},
         400, "invalid_json"),
        ("not UTF-8", {"content": b'{"model": "\xff\xfe"}'}, 400, "invalid_json"),
        ("invalid json", {"content": b'{"model": '}, 400, "invalid_json"),
        ("not an object", {"json": ["x"]}, 400, "invalid_value"),
        ("missing model", {"json": {"input": "x"}}, 400, "invalid_value"),
        ("missing input", {"json": {"model": q}}, 400, "invalid_value"),
        ("empty string", {"json": {"model": q, "input": ""}}, 400, "invalid_value"),
        ("empty list", {"json": {"model": q, "input": []}}, 400, "invalid_value"),
        ("empty item", {"json": {"model": q, "input": ["ok", ""]}}, 400, "invalid_value"),
        ("whitespace only (server)", {"json": {"model": q, "input": ["ok", "   "]}}, 400, "invalid_value"),
        ("mixed types", {"json": {"model": q, "input": ["ok", 7]}}, 400, "invalid_value"),
        ("lone surrogate", {"content": b'{"model": "%s", "input": "bad \\udcff"}' % q.encode()}, 400, "invalid_value"),
        ("dimensions below range", {"json": {"model": q, "input": "x", "dimensions": qwen.dimension_range[0] - 1}}, 400, "invalid_value"),
        ("dimensions above hidden", {"json": {"model": q, "input": "x", "dimensions": qwen.hidden_size + 1}},
         400, "invalid_value"),
        ("dimensions zero", {"json": {"model": q, "input": "x", "dimensions": 0}}, 400, "invalid_value"),
        ("dimensions as string", {"json": {"model": q, "input": "x", "dimensions": "768"}}, 400, "invalid_value"),
        ("dimensions on non-Matryoshka", {"json": {"model": minilm.name, "input": "x", "dimensions": 256}}, 400, "invalid_value"),
        ("encoding format", {"json": {"model": q, "input": "x", "encoding_format": "int8"}}, 400, "invalid_value"),
        ("input_type", {"json": {"model": q, "input": "x", "input_type": "passage"}}, 400, "invalid_value"),
        ("instruction with document", {"json": {"model": q, "input": "x", "input_type": "document", "instruction": "I"}},
         400, "invalid_value"),
        ("too long, truncate off", {"json": {"model": q, "input": ["ok", long_text], "truncate": False}}, 400, "invalid_value"),
        ("truncate not bool", {"json": {"model": q, "input": "x", "truncate": "no"}}, 400, "invalid_value"),
        ("unknown field", {"json": {"model": q, "input": "x", "temperature": 0}}, 400, "invalid_value"),
        ("too many inputs", {"json": {"model": q, "input": ["x"] * (MAX_INPUTS + 1)}}, 400, "too_many_inputs"),
        ("token id outside vocab", {"json": {"model": q, "input": [10**9]}}, 400, "invalid_value"),
        ("negative token id", {"json": {"model": q, "input": [[1, -1]]}}, 400, "invalid_value"),
        ("unknown model", {"json": {"model": "text-embedding-3-small", "input": "x"}}, 404, "model_not_found"),
        ("body too large", {"content": b'{"model": "%s", "input": "%s"}' % (q.encode(), b"x" * MAX_BODY)}, 413, "request_too_large"),
        ("no api key", {"json": {"model": q, "input": "x"}, "headers": {"Authorization": ""}}, 401, "invalid_api_key"),
        ("wrong api key", {"json": {"model": q, "input": "x"}, "headers": {"Authorization": "Bearer sk-wrong"}}, 401, "invalid_api_key"),
        ("unknown route", {"url": "/v1/embedding", "json": {"model": q, "input": "x"}}, 404, "not_found"),
        ("wrong method", {"method": "GET", "url": "/v1/embeddings"}, 405, "method_not_allowed"),
    ]


def test_bad_requests_get_documented_status_and_envelope(triton, http):
    cases = _bad_requests(triton)
    assert len(cases) >= 20
    good = {"model": triton.specs["qwen"].name, "input": ["a valid request"]}
    failures = []
    for name, kwargs, status, code, *param in cases:
        kwargs = dict(kwargs)
        method, url = kwargs.pop("method", "POST"), kwargs.pop("url", "/v1/embeddings")
        if "content" in kwargs:
            kwargs.setdefault("headers", {})["Content-Type"] = "application/json"
        response = http.request(method, url, **kwargs)
        try:
            body = response.json()
            error = body["error"]
            ok = (
                response.status_code == status
                and set(body) == {"error"}
                and set(error) == {"message", "type", "param", "code"}
                and error["code"] == code
                and error["message"]
                and (not param or error["param"] == param[0])
                and (not param or not param[0].startswith("input[") or param[0] in error["message"])
                and not [word for word in INTERNALS if word in response.text]
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            failures.append(f"{name}: {response.status_code} {response.text[:300]}")
        after = http.post("/v1/embeddings", json=good)
        if after.status_code != 200:
            failures.append(f"valid request after {name!r}: {after.status_code} {after.text[:200]}")
    assert not failures, "\n".join(failures)


def test_errors_through_the_openai_client(triton, gateway, oai):
    spec = triton.specs["qwen"]
    with pytest.raises(openai.NotFoundError) as exc:
        oai.embeddings.create(model="nope", input="x")
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        oai.embeddings.create(model=spec.name, input="x", dimensions=spec.hidden_size + 1)
    assert exc.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError, match=r"\d+ tokens"):
        oai.embeddings.create(model=spec.name, input="token " * (spec.max_length + 5), extra_body={"truncate": False})
    bad_key = openai.Client(base_url=f"{gateway.url}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.embeddings.create(model=spec.name, input="x")
    assert oai.embeddings.create(model=spec.name, input="fine").data


def test_concurrent_requests(triton, oai, full):
    spec = triton.specs["qwen"]
    texts = [f"concurrent request {i} " + "pad " * i for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: oai.embeddings.create(model=spec.name, input=[t], encoding_format="float"), texts))
    got = np.array([r.data[0].embedding for r in results])
    np.testing.assert_allclose(got, full("qwen", texts), atol=TOL)


def test_health_ready_metrics(triton, gateway, http):
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok"}  # no key
    ready = http.get("/ready")
    assert ready.status_code == 200 and sorted(ready.json()["models"]) == sorted(s.name for s in triton.specs.values())

    assert httpx.head(f"{gateway.url}/health").status_code == 200

    def tokens() -> int:
        text = http.get("/metrics").text
        m = re.search(rf'tritonembed_gateway_tokens_total{{model="{triton.specs["qwen"].name}"}} (\d+)', text)
        return int(m.group(1)) if m else 0

    before = tokens()
    usage = http.post("/v1/embeddings", json={"model": triton.specs["qwen"].name, "input": FOUR}).json()["usage"]
    assert tokens() - before == usage["prompt_tokens"]
    text = http.get("/metrics").text
    for family in ("requests_total", "errors_total", "request_duration_seconds", "requests_in_flight", "tokens_total"):
        assert f"# TYPE tritonembed_gateway_{family} " in text


def test_gateway_over_triton_http(triton, full):
    settings = GatewaySettings(triton_url=f"http://{triton.http_url}", port=0, log_level="warning")
    with BackgroundGateway(settings) as gw:
        res = httpx.post(f"{gw.url}/v1/embeddings", json={"model": triton.specs["qwen"].name, "input": FOUR[:2]}, timeout=60)
        assert res.status_code == 200, res.text
        np.testing.assert_allclose(np.array([d["embedding"] for d in res.json()["data"]]), full("qwen", FOUR[:2]), atol=TOL)


def test_triton_unreachable_is_503():
    settings = GatewaySettings(triton_url=f"127.0.0.1:{free_port()}", port=0, log_level="error", request_timeout=5)
    with BackgroundGateway(settings) as gw:
        assert httpx.get(f"{gw.url}/health").status_code == 200
        ready = httpx.get(f"{gw.url}/ready", timeout=30)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        res = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "m", "input": "x"}, timeout=30)
        assert res.status_code == 503 and res.json()["error"]["code"] == "backend_unavailable"
        assert res.headers["retry-after"]
        json.dumps(res.json())


def test_overload_is_refused_by_the_gateway_and_the_rest_answered(triton, full):
    """Triton's queue is unbounded by default; the gateway's admission limit refuses the excess with 429."""
    spec = triton.specs["minilm"]
    settings = GatewaySettings(triton_url=triton.grpc_url, port=0, max_inputs=16, max_pending_inputs=16,
                               log_level="error")
    texts = [f"overload {i}: " + "a fairly long sentence about nothing in particular " * 4 for i in range(16)]
    with BackgroundGateway(settings) as gw:
        client = openai.Client(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)

        def call(_):
            try:
                return client.embeddings.create(model=spec.name, input=texts, encoding_format="float")
            except openai.RateLimitError as exc:
                return exc

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(24)))
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        answered = [r for r in results if not isinstance(r, openai.RateLimitError)]
        assert refused, "24 concurrent requests of 16 inputs against a limit of 16 must be refused in part"
        assert answered, "the requests that got in must be answered"
        for exc in refused:
            assert exc.code == "overloaded" and "limit 16" in exc.message
            assert exc.response.headers["retry-after"]
        expected = full("minilm", texts)
        for got in answered:
            np.testing.assert_allclose(np.array([d.embedding for d in got.data]), expected, atol=TOL)
        # nothing is left held: a full-size request is admitted again
        assert len(client.embeddings.create(model=spec.name, input=texts).data) == 16
