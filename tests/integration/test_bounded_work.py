"""Multi-megabyte texts through the real tritonserver: cut before tokenizing, refused alone with truncation off."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tritonembed.model_repository.tokenization import SpecTokenizer

from .test_serving import embed

pytestmark = pytest.mark.integration

# Words that are one token each for both tokenizers, so a prefix ending at a word keeps its ids.
WORDS = "the cat sat on a mat and then it ran to see her dog".split()
HUGE_CHARS = 6_000_000


@pytest.fixture(scope="module")
def http(triton):
    client = httpclient.InferenceServerClient(triton.http_url, network_timeout=300.0, connection_timeout=300.0)
    yield client
    client.close()


def _huge_text(seed: int) -> str:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(HUGE_CHARS // 3)]
    return " ".join(words)[:HUGE_CHARS]


@pytest.mark.parametrize("key", ["minilm", "qwen"])
def test_multi_megabyte_text_gives_the_vector_of_the_text_cut_by_the_tokenizer(triton, http, key):
    spec = triton.specs[key]
    tokenizer = SpecTokenizer(triton.export_dirs[key] / spec.tokenizer_file, spec)
    huge = _huge_text(1)
    # The characters the tokenizer keeps when truncating: up to the end of its last content token.
    head = tokenizer.tokenizer.encode(huge[:100_000])
    end = max(stop for _, stop in head.offsets)
    cut = huge[:end]
    assert tokenizer.tokenizer.encode(cut).ids == head.ids and len(head.ids) == spec.max_length

    vectors, counts = embed(http, httpclient, spec.name, [huge, "a short text"])
    expected, expected_counts = embed(http, httpclient, spec.name, [cut, "a short text"])
    assert counts.ravel().tolist() == expected_counts.ravel().tolist()
    assert counts[0, 0] == spec.max_length
    assert np.abs(vectors - expected).max() <= 1e-5


def test_too_long_with_truncation_off_fails_for_that_request_only(triton, http):
    spec = triton.specs["minilm"]
    huge = _huge_text(2)

    def call(job):
        texts, truncate = job
        client = httpclient.InferenceServerClient(triton.http_url, network_timeout=300.0)  # one per thread
        try:
            return embed(client, httpclient, spec.name, texts, truncate=truncate)
        except InferenceServerException as exc:
            return exc
        finally:
            client.close()

    small = (["a small request beside a huge one"], [True])
    jobs = [(["fine", huge], [True, False])] + [small] * 6
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs))
    refused = results[0]
    assert isinstance(refused, InferenceServerException), refused
    message = refused.message()
    assert f"input[1] has more than {spec.max_length} tokens" in message, message
    assert "truncation is disabled" in message and "input[0]" not in message
    reference, _ = embed(http, httpclient, spec.name, small[0])
    for result in results[1:]:
        assert not isinstance(result, Exception), result
        assert np.abs(result[0] - reference).max() <= 1e-5
    # the same text with truncation on is embedded, cut to the model's limit
    _, counts = embed(http, httpclient, spec.name, ["fine", huge], truncate=[True, True])
    assert counts.ravel().tolist()[1] == spec.max_length
