"""The Triton ensemble, started for real: correctness against the reference, batching, per-request errors."""

from __future__ import annotations

import json
import random
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tritonembed.spec import SPEC_PARAMETER_KEY, ModelSpec

pytestmark = pytest.mark.integration

# Texts no probe set or unit test uses.
TEXTS = [
    "Serving embeddings on Triton keeps GPUs busy.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "x",
    "fn main() { println!(\"{}\", 40 + 2); }",
    "Vector databases index embeddings for nearest-neighbour search. " * 5,
    "¿Dónde está la biblioteca? 📚",
]
MIN_COS = 0.99999


def _inputs(module, texts, instructions=None, truncate=None):
    arr = np.array([[t.encode("utf-8") if isinstance(t, str) else t] for t in texts], dtype=object)
    inputs = [module.InferInput("TEXT", list(arr.shape), "BYTES")]
    inputs[0].set_data_from_numpy(arr)
    if instructions is not None:
        ins = np.array([[i.encode()] for i in instructions], dtype=object)
        inputs.append(module.InferInput("INSTRUCTION", list(ins.shape), "BYTES"))
        inputs[-1].set_data_from_numpy(ins)
    if truncate is not None:
        tr = np.array([[bool(t)] for t in truncate], dtype=bool)
        inputs.append(module.InferInput("TRUNCATE", list(tr.shape), "BOOL"))
        inputs[-1].set_data_from_numpy(tr)
    return inputs


def embed(client, module, model, texts, **kw):
    result = client.infer(model, _inputs(module, texts, **kw))
    return result.as_numpy("EMBEDDING"), result.as_numpy("TOKEN_COUNT")


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def grpc(triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(triton):
    client = httpclient.InferenceServerClient(triton.http_url, concurrency=8)
    yield client
    client.close()


@pytest.mark.parametrize("key", ["minilm", "qwen"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_embeddings_match_reference(triton, reference, grpc, http, key, protocol):
    client, module = (grpc, grpcclient) if protocol == "grpc" else (http, httpclient)
    spec = triton.specs[key]
    got, counts = embed(client, module, spec.name, TEXTS)
    want = reference(key, TEXTS)
    assert got.shape == (len(TEXTS), spec.hidden_size)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosines(got, want).min() >= MIN_COS
    assert np.abs(got - want).max() < 1e-4
    assert counts.shape == (len(TEXTS), 1) and (counts > 0).all()


def test_qwen_queries_use_the_instruction_template(triton, reference, grpc):
    spec = triton.specs["qwen"]
    task = "Given a question, retrieve passages that answer it"
    got, counts = embed(grpc, grpcclient, spec.name, TEXTS[:3], instructions=[task] * 3)
    want = reference("qwen", TEXTS[:3], instruction=task)
    assert cosines(got, want).min() >= MIN_COS
    as_document, doc_counts = embed(grpc, grpcclient, spec.name, TEXTS[:3])
    assert cosines(got, as_document).max() < 0.9999, "query and document embeddings must differ"
    assert (counts > doc_counts).all(), "the instruction's tokens count as prompt tokens"


def test_token_counts_are_the_tokenizers(triton, grpc):
    from tokenizers import Tokenizer

    spec = triton.specs["qwen"]
    tok = Tokenizer.from_file(str(triton.export_dirs["qwen"] / "tokenizer.json"))
    _, counts = embed(grpc, grpcclient, spec.name, TEXTS)
    assert counts.ravel().tolist() == [len(tok.encode(t).ids) for t in TEXTS]
    assert all(tok.encode(t).ids[-1] == 151643 for t in TEXTS), "Qwen3 appends <|endoftext|>"


def test_published_spec_is_the_exported_one(triton, grpc):
    for key, spec in triton.specs.items():
        config = grpc.get_model_config(spec.name, as_json=True)["config"]
        published = ModelSpec.from_json(config["parameters"][SPEC_PARAMETER_KEY]["string_value"])
        assert published == ModelSpec.load(triton.export_dirs[key])


def _random_text(rng: random.Random, words: int) -> str:
    vocab = ["alpha", "beta", "gamma", "delta", "数据", "模型", "search", "vector", "🙂", "x=1;", "the", "of"]
    return " ".join(rng.choice(vocab) for _ in range(words))


@pytest.mark.parametrize("key", ["qwen", "minilm"])  # MiniLM (< 256 MB) runs big executes on the micro-batch pool
def test_concurrent_mixed_length_load_is_batch_invariant(triton, grpc, key):
    """>= 32 concurrent requests of 1-50 texts, 1-512 tokens: each answer equals the text sent alone."""
    spec = triton.specs[key]
    rng = random.Random(7)
    requests = [[_random_text(rng, rng.choice([1, 3, 10, 40, 120, 300])) for _ in range(rng.randint(1, 50))]
                for _ in range(36)]
    stats_before = grpc.get_inference_statistics(spec.encoder_model_name, as_json=True)["model_stats"][0]

    # tritonclient's HTTP client is gevent-based and not thread-safe; its gRPC client is.
    with ThreadPoolExecutor(36) as pool:
        answers = list(pool.map(lambda texts: embed(grpc, grpcclient, spec.name, texts)[0], requests))

    stats_after = grpc.get_inference_statistics(spec.encoder_model_name, as_json=True)["model_stats"][0]
    executions = int(stats_after.get("execution_count", 0)) - int(stats_before.get("execution_count", 0))
    inferences = int(stats_after.get("inference_count", 0)) - int(stats_before.get("inference_count", 0))
    assert inferences == sum(len(r) for r in requests)
    assert inferences / executions > 1.0, f"no batching: {inferences} rows in {executions} executions"

    # Every text alone (in a few sequential requests of one text each) must give the same vector.
    sample = [(i, j) for i, r in enumerate(requests) for j in range(len(r))]
    rng.shuffle(sample)
    for i, j in sample[:60]:
        alone, _ = embed(grpc, grpcclient, spec.name, [requests[i][j]])
        assert np.abs(alone[0] - answers[i][j]).max() <= 1e-5, (i, j)
    for i, texts in enumerate(requests):
        assert answers[i].shape == (len(texts), spec.hidden_size)


def test_bad_requests_fail_alone_while_others_succeed(triton, grpc):
    spec = triton.specs["qwen"]
    long_text = "token " * (spec.max_length + 100)
    bad = {
        "empty": ([""], {}, "empty"),
        "whitespace": (["   "], {}, "empty"),
        "bad_utf8": ([b"ok", b"\xff\xfe\xfd"], {}, "UTF-8"),
        "too_long": (["fine", long_text], {"truncate": [True, False]}, f"limit is {spec.max_length}"),
    }
    good_texts = ["a good request", "another one"]

    def call(item):
        texts, kw = item
        try:
            return embed(grpc, grpcclient, spec.name, texts, **kw)
        except InferenceServerException as exc:
            return exc

    jobs = [(v[0], v[1]) for v in bad.values()] + [(good_texts, {})] * 8
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs))
    for (name, (_, _, needle)), result in zip(bad.items(), results):
        assert isinstance(result, InferenceServerException), name
        assert needle in result.message(), (name, result.message())
    good_ref, _ = embed(grpc, grpcclient, spec.name, good_texts)
    for result in results[len(bad):]:
        assert not isinstance(result, Exception), result
        assert np.abs(result[0] - good_ref).max() <= 1e-5

    # too_long names the real token count; truncation on by default cuts instead.
    assert re.search(r"input\[1\] has \d+ tokens", results[3].message())
    got, counts = embed(grpc, grpcclient, spec.name, [long_text])
    assert counts[0, 0] == spec.max_length and np.isfinite(got).all()
    # too many texts per request: refused by Triton itself, with the limit in the message.
    config = grpc.get_model_config(spec.name, as_json=True)["config"]
    too_many = ["t"] * (int(config["max_batch_size"]) + 1)
    with pytest.raises(InferenceServerException, match="batch"):
        embed(grpc, grpcclient, spec.name, too_many)
    assert grpc.is_server_live() and grpc.is_model_ready(spec.name)


def test_metrics_report_padding_and_batches(triton, grpc):
    spec = triton.specs["minilm"]
    embed(grpc, grpcclient, spec.name, TEXTS)

    def total(name):
        pattern = rf'^{name}{{model="{re.escape(spec.encoder_model_name)}"}} ([0-9.e+]+)$'
        return float(re.search(pattern, text, re.M).group(1))

    deadline = time.monotonic() + 5  # counters are published from a thread, a few ms after the response
    while True:
        with urllib.request.urlopen(triton.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        if total("tritonembed_encoder_rows") >= len(TEXTS) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    real, padded = total("tritonembed_encoder_real_tokens"), total("tritonembed_encoder_padded_tokens")
    assert 0 < real <= padded
    assert total("tritonembed_encoder_rows") >= len(TEXTS)
    assert total("tritonembed_encoder_batches") >= 1
    assert "nv_inference_request_success" in text
    json.dumps({"real": real, "padded": padded})
