"""A Qwen3 export with ``--max-length 32768`` served by a real tritonserver: real texts of about 2k, 8k, 16k
and 31k tokens give transformers SDPA's embedding, and the server's memory stays bounded at 31k tokens.

The tiny random-weight Qwen3 (the real graph at a cost a 2-core CPU affords). Texts go in as text through
the whole ensemble (tokenizer model, encoder model with its micro-batch planner, ONNX Runtime).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tritonembed.benchmarks.system import RssSampler, tree_rss_bytes
from tritonembed.export.pipeline import export_model
from tritonembed.export.probes import long_probe_text
from tritonembed.export.resolve import resolve_model
from tritonembed.launcher import TritonServer
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions
from tritonembed.model_repository.tokenization import SpecTokenizer
from tritonembed.spec import ModelSpec

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

MODEL = "random-qwen3:tiny"
LENGTHS = (2048, 8192, 16384, 31000)
GIB = 2**30


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("long") / "qwen-tiny-32k"
    export_model(MODEL, out, precision="fp32", max_length=32768, run_stsb=False)
    return out


@pytest.fixture(scope="module")
def server(export_dir: Path, tmp_path_factory) -> Iterator[tuple[TritonServer, ModelSpec]]:
    root = tmp_path_factory.mktemp("long-triton")
    specs = build_repository(root / "models", [export_dir], ServingOptions(profile="cpu", intra_op_threads=2))
    triton = TritonServer(root / "models", log_file=root / "tritonserver.log")
    with triton:
        yield triton, specs[0]


@pytest.fixture(scope="module")
def texts(export_dir: Path) -> dict[int, str]:
    spec = ModelSpec.load(export_dir)
    tokenizer = SpecTokenizer(export_dir / spec.tokenizer_file, spec)
    return {n: long_probe_text(tokenizer.count_untruncated, n) for n in LENGTHS}


def sdpa_reference(text: str) -> tuple[np.ndarray, int]:
    """The model card's usage with ``attn_implementation="sdpa"``: one text, so no padding; its token count."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(resolve_model(MODEL).path)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(hidden, dim=1).numpy(), int(batch["input_ids"].shape[1])


def embed(triton: TritonServer, model: str, text: str) -> tuple[np.ndarray, int]:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        data = np.array([[text.encode("utf-8")]], dtype=object)
        inputs = [grpcclient.InferInput("TEXT", list(data.shape), "BYTES")]
        inputs[0].set_data_from_numpy(data)
        result = client.infer(model, inputs, client_timeout=600)
        return result.as_numpy("EMBEDDING"), int(result.as_numpy("TOKEN_COUNT")[0, 0])
    finally:
        client.close()


@pytest.mark.parametrize("tokens", LENGTHS)
def test_served_long_text_matches_transformers_sdpa(server, texts, tokens):
    triton, spec = server
    want, reference_tokens = sdpa_reference(texts[tokens])
    idle = tree_rss_bytes(triton.process.pid)
    assert idle > 0.1 * GIB, "the sampler must see the server and its model stubs"
    started = time.perf_counter()
    with RssSampler(triton.process.pid, interval=0.1) as sampler:
        got, counted = embed(triton, spec.name, texts[tokens])
    seconds = time.perf_counter() - started
    assert counted == reference_tokens and tokens - 64 <= counted <= tokens, (counted, reference_tokens)
    cos = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
    log.info("%d tokens: cosine to SDPA %.7f, served in %.2f s, server peak RSS %.3f GiB above idle (%.3f GiB)",
             counted, cos, seconds, (sampler.peak_bytes - idle) / GIB, idle / GIB)
    assert cos >= 0.9999, cos
    # the whole server (tritonserver and its Python-backend stubs) above what it held before this request
    assert (sampler.peak_bytes - idle) / GIB < 2.0, (sampler.peak_bytes - idle) / GIB
