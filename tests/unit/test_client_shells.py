"""The sync and async shells over a fake tritonclient: retries, concurrency, order, caching, closing.

The fake stands in for ``tritonclient.{grpc,http}[.aio]`` at the one seam the shells use
(``_transport.import_protocol``); the real transports are covered by tests/integration.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tritonembed.client import AsyncEmbeddingClient, EmbeddingClient, RetryPolicy, _transport
from tritonembed.client.core import parse_model_config
from tritonembed.client.errors import ConnectionFailed, EmbeddingError, InvalidArgument, ModelNotFound, Overloaded
from tritonembed.spec import EMBEDDING_OUTPUT_NAME, TEXT, TOKEN_COUNT

try:  # shared spec helpers; tests/ may or may not be a package
    from .test_client_core import MINILM, config_for, make_spec
except ImportError:
    from test_client_core import MINILM, config_for, make_spec

SPEC = make_spec(hidden_size=64, min_dimensions=16)
FAST = RetryPolicy(max_retries=3, initial_backoff=0.001, max_backoff=0.002)


class FakeServer:
    """State shared by every fake client: served configs, scripted failures, call log."""

    def __init__(self, configs: dict[str, dict], failures: list[Exception] | None = None, delay: float = 0.0) -> None:
        self.configs = configs
        self.failures = list(failures or [])
        self.delay = delay
        self.lock = threading.Lock()
        self.calls: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = 0

    def record(self, what: str) -> None:
        with self.lock:
            self.calls.append(what)

    def infer(self, model: str, inputs: list) -> FakeResult:
        with self.lock:
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        if model not in self.configs:
            raise InferenceServerException(f"Request for unknown model: '{model}' is not found", "StatusCode.NOT_FOUND")
        texts = next(i.data for i in inputs if i.name == TEXT.name).reshape(-1)
        limit = self.configs[model]["max_batch_size"]
        if len(texts) > limit:
            raise InferenceServerException(f"inference request batch-size must be <= {limit}", "StatusCode.INVALID_ARGUMENT")
        refused = [j for j, text in enumerate(texts) if text.startswith(b"TOO LONG")]
        if refused:  # what the Triton tokenizer model says: numbered within this request
            raise InferenceServerException(f"text {refused[0]} has 900 tokens, more than max_length 512", "StatusCode.INVALID_ARGUMENT")
        hidden = parse_model_config(model, self.configs[model]).spec.hidden_size
        rows = []
        for text in texts:
            v = np.random.default_rng(int.from_bytes(text[:8].ljust(8, b"\0"), "little") + len(text)).standard_normal(hidden)
            rows.append((v / np.linalg.norm(v)).astype(np.float32))
        counts = np.array([[len(t)] for t in texts], dtype=np.int32)
        return FakeResult({EMBEDDING_OUTPUT_NAME: np.stack(rows), TOKEN_COUNT.name: counts})


class FakeResult:
    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.outputs = outputs

    def as_numpy(self, name: str):
        return self.outputs.get(name)


class FakeInferInput:
    def __init__(self, name: str, shape: list[int], datatype: str) -> None:
        self.name, self.shape, self.datatype, self.data = name, shape, datatype, None

    def set_data_from_numpy(self, data: np.ndarray) -> None:
        assert list(data.shape) == self.shape
        self.data = data


class FakeRequestedOutput:
    def __init__(self, name: str) -> None:
        self.name = name


def fake_module(server: FakeServer, *, aio: bool) -> types.SimpleNamespace:
    class SyncClient:
        def __init__(self, url, **kwargs):
            self.url = url

        def get_model_config(self, name, headers=None, client_timeout=None, as_json=False):
            server.record(f"config:{name}")
            if name not in server.configs:
                raise InferenceServerException(f"Request for unknown model: '{name}' is not found", "StatusCode.NOT_FOUND")
            return {"config": server.configs[name]}

        def get_model_repository_index(self, headers=None, client_timeout=None, as_json=False):
            server.record("index")
            return {"models": [{"name": n, "version": "1", "state": "READY"} for n in server.configs]}

        def is_server_ready(self, headers=None, client_timeout=None):
            return True

        def is_model_ready(self, name, headers=None, client_timeout=None):
            return name in server.configs

        def infer(self, model, inputs, outputs=None, headers=None, client_timeout=None):
            server.record(f"infer:{model}")
            with server.lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                if server.delay:
                    threading.Event().wait(server.delay)
                return server.infer(model, inputs)
            finally:
                with server.lock:
                    server.in_flight -= 1

        def close(self):
            server.closed += 1

    class AsyncClient(SyncClient):
        async def get_model_config(self, *args, **kwargs):
            return SyncClient.get_model_config(self, *args, **kwargs)

        async def get_model_repository_index(self, *args, **kwargs):
            return SyncClient.get_model_repository_index(self, *args, **kwargs)

        async def is_server_ready(self, *args, **kwargs):
            return True

        async def is_model_ready(self, name, **kwargs):
            return name in server.configs

        async def infer(self, model, inputs, outputs=None, headers=None, client_timeout=None):
            server.record(f"infer:{model}")
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                await asyncio.sleep(server.delay)
                return server.infer(model, inputs)
            finally:
                server.in_flight -= 1

        async def close(self):
            server.closed += 1

    return types.SimpleNamespace(
        InferenceServerClient=AsyncClient if aio else SyncClient,
        InferInput=FakeInferInput,
        InferRequestedOutput=FakeRequestedOutput,
    )


@pytest.fixture
def server(monkeypatch):
    srv = FakeServer({SPEC.name: config_for(SPEC, max_batch_size=8)})
    monkeypatch.setattr(_transport, "import_protocol", lambda protocol, aio: fake_module(srv, aio=aio))
    return srv


def run_sync(kwargs: dict, method: str, *args, **call_kwargs):
    with EmbeddingClient("localhost:8001", **kwargs) as client:
        return getattr(client, method)(*args, **call_kwargs)


def run_async(kwargs: dict, method: str, *args, **call_kwargs):
    async def go():
        async with AsyncEmbeddingClient("localhost:8001", **kwargs) as client:
            return await getattr(client, method)(*args, **call_kwargs)

    return asyncio.run(go())


SHELLS = [pytest.param(run_sync, id="sync"), pytest.param(run_async, id="async")]
TEXTS = [f"text number {i} " + "x" * (i % 17) for i in range(500)]


@pytest.mark.parametrize("run", SHELLS)
def test_order_and_usage(server, run):
    result = run({"model": SPEC.name, "max_concurrency": 3, "retry": FAST}, "embed_with_usage", TEXTS)
    assert result.embeddings.shape == (500, 64)
    assert result.token_counts.tolist() == [len(t.encode()) for t in TEXTS]
    single = run({"model": SPEC.name}, "embed", TEXTS[123])
    np.testing.assert_array_equal(single[0], result.embeddings[123])
    assert sum(c.startswith("infer") for c in server.calls) == 63 + 1  # ceil(500 / 8) + the single
    assert server.closed >= 1


def test_sync_and_async_identical(server):
    kwargs = {"model": SPEC.name, "retry": FAST}
    a = run_sync(kwargs, "embed", TEXTS, dimensions=16)
    b = run_async(kwargs, "embed", TEXTS, dimensions=16)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("run", SHELLS)
def test_concurrency_is_bounded(server, run):
    server.delay = 0.01
    run({"model": SPEC.name, "max_concurrency": 2}, "embed", TEXTS[:80])
    assert server.max_in_flight == 2


@pytest.mark.parametrize("run", SHELLS)
def test_retries_overloaded_then_succeeds(server, run):
    server.failures = [
        InferenceServerException("Exceeds maximum queue size", "StatusCode.UNAVAILABLE"),
        InferenceServerException("failed to connect to all addresses", "StatusCode.UNAVAILABLE"),
    ]
    out = run({"model": SPEC.name, "retry": FAST, "max_concurrency": 1}, "embed", ["a", "b"])
    assert out.shape == (2, 64)
    assert server.calls.count(f"infer:{SPEC.name}") == 3


@pytest.mark.parametrize("run", SHELLS)
def test_retries_exhausted(server, run):
    server.failures = [InferenceServerException("Exceeds maximum queue size", "503")] * 10
    with pytest.raises(Overloaded):
        run({"model": SPEC.name, "retry": RetryPolicy(max_retries=2, initial_backoff=0.001)}, "embed", ["a"])
    assert server.calls.count(f"infer:{SPEC.name}") == 3


@pytest.mark.parametrize("run", SHELLS)
def test_invalid_argument_is_not_retried(server, run):
    server.failures = [InferenceServerException("text has 900 tokens, more than 512", "StatusCode.INVALID_ARGUMENT")]
    with pytest.raises(InvalidArgument, match="900 tokens"):
        run({"model": SPEC.name, "retry": FAST}, "embed", ["a"], truncate=False)
    assert server.calls.count(f"infer:{SPEC.name}") == 1


@pytest.mark.parametrize("run", SHELLS)
def test_local_validation_sends_nothing(server, run):
    for kwargs in ({"dimensions": 8}, {"dimensions": 65}, {"input_type": "nope"}):
        with pytest.raises(InvalidArgument):
            run({"model": SPEC.name}, "embed", ["a"], **kwargs)
    with pytest.raises(InvalidArgument, match="empty"):
        run({"model": SPEC.name}, "embed", ["a", ""])
    assert not [c for c in server.calls if c.startswith("infer")]


@pytest.mark.parametrize("run", SHELLS)
def test_unknown_model(server, run):
    with pytest.raises(ModelNotFound):
        run({"model": "nope"}, "embed", ["a"])


def test_spec_cached_and_default_model(server):
    with EmbeddingClient("localhost:8001", retry=FAST) as client:  # no model: the only one served
        assert client.model == SPEC.name
        assert client.spec == SPEC
        assert client.max_batch_size == 8
        client.embed(["a"])
        client.embed(["b"])
        assert client.is_ready()
        assert [m.name for m in client.models()] == [SPEC.name]
    assert server.calls.count(f"config:{SPEC.name}") == 1


def test_several_models_need_a_name(server):
    server.configs[MINILM.name] = config_for(MINILM)
    server.configs["plain_onnx_model"] = {"name": "plain_onnx_model", "max_batch_size": 8, "parameters": {}}
    with EmbeddingClient("localhost:8001") as client:
        assert sorted(m.name for m in client.models()) == sorted([SPEC.name, MINILM.name])
        with pytest.raises(InvalidArgument, match="several"):
            client.embed(["a"])
        assert client.embed(["a"], model=MINILM.name).shape == (1, 384)


def test_async_spec_requires_fetch(server):
    async def go():
        client = AsyncEmbeddingClient("localhost:8001")
        with pytest.raises(EmbeddingError, match="not fetched"):
            _ = client.spec
        info = await client.model_info()
        assert client.spec == SPEC and client.max_batch_size == 8 and info.spec == SPEC
        assert await client.is_ready()
        await client.close()
        with pytest.raises(EmbeddingError, match="closed"):
            await client.embed(["a"])

    asyncio.run(go())


def test_closed_sync_client_refuses(server):
    client = EmbeddingClient("localhost:8001", SPEC.name)
    client.embed(["a"])
    client.close()
    client.close()
    with pytest.raises(EmbeddingError, match="closed"):
        client.embed(["a", "b"])


def test_connection_refused_maps(server):
    server.failures = [ConnectionRefusedError(111, "Connection refused")] * 5
    with pytest.raises(ConnectionFailed):
        run_sync({"model": SPEC.name, "retry": RetryPolicy(max_retries=1, initial_backoff=0.001)}, "embed", ["a"])


def test_client_never_imports_torch_or_transformers():
    code = (
        "import sys\n"
        "import tritonembed.client as c\n"
        "import tritonembed.client.sync, tritonembed.client.aio, tritonembed.client.core\n"
        "c._transport.import_protocol('grpc', aio=False); c._transport.import_protocol('http', aio=True)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'sentence_transformers', 'onnxruntime'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"tritonembed.client imported {out.stdout.strip()}"


@pytest.mark.parametrize("run", SHELLS)
def test_a_failed_chunk_stops_the_rest(server, run):
    server.delay = 0.02
    server.failures = [InferenceServerException("empty text", "StatusCode.INVALID_ARGUMENT")]
    with pytest.raises(InvalidArgument):
        run({"model": SPEC.name, "max_concurrency": 2}, "embed", TEXTS[:160])  # 20 chunks
    assert server.calls.count(f"infer:{SPEC.name}") < 20


@pytest.mark.parametrize("run", SHELLS)
def test_server_errors_carry_the_callers_index(server, run):
    texts = list(TEXTS[:200])
    texts[150] = "TOO LONG " + texts[150]
    with pytest.raises(InvalidArgument) as exc:
        run({"model": SPEC.name, "retry": FAST}, "embed", texts)
    assert exc.value.message.startswith("texts[150] has 900 tokens") and exc.value.param == "texts[150]"
