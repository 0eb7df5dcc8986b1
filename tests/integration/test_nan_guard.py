"""No NaN vector in a 200: a real fp16 export made to overflow on one token, through the encoder and tritonserver.

The exported fp16 graph of ``random-qwen3:tiny`` gets one token's row of the embedding table set to fp16
infinity -- what an overflowed fp16 activation becomes -- so any text with that token comes out non-finite
from ONNX Runtime, as Qwen3-Embedding-8B does in fp16 for texts starting with "import" (QwenLM/Qwen3-Embedding
#164). That input gets a clear error naming it; the other inputs of the batch get their correct vectors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonembed.export.pipeline import export_model
from tritonembed.launcher import TritonServer
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions
from tritonembed.model_repository.stages import EncoderRowError, encode_requests
from tritonembed.model_repository.tokenization import SpecTokenizer, pad_batch
from tritonembed.spec import ModelSpec

pytestmark = pytest.mark.integration

NAME = "Qwen3-Embedding-overflow"
OVERFLOWING = "import numpy as np"
GOOD = ["hello world", "a quiet afternoon by the river"]


@pytest.fixture(scope="module")
def overflowing_export(tmp_path_factory) -> Path:
    import onnx
    from onnx import numpy_helper

    root = tmp_path_factory.mktemp("nan-guard")
    export_model("random-qwen3:tiny", root / "fp16", precision="fp16", name=NAME, max_length=128, run_stsb=False)
    spec = ModelSpec.load(root / "fp16")
    tokenizer = SpecTokenizer(root / "fp16" / spec.tokenizer_file, spec)
    token = tokenizer.encode(tokenizer.format([OVERFLOWING])).ids[0][0]
    assert all(token not in ids for ids in tokenizer.encode(tokenizer.format(GOOD)).ids)
    patched = root / "patched"
    shutil.copytree(root / "fp16", patched)
    model = onnx.load(str(patched / spec.onnx_file))
    [table] = [i for i in model.graph.initializer if "embed_tokens" in i.name]
    weights = numpy_helper.to_array(table).copy()
    assert weights.dtype == np.float16
    weights[token] = np.inf
    table.CopyFrom(numpy_helper.from_array(weights, table.name))
    onnx.save(model, str(patched / spec.onnx_file))
    return patched


@pytest.fixture(scope="module")
def session_and_tokens(overflowing_export):
    import onnxruntime as ort

    spec = ModelSpec.load(overflowing_export)
    tokenizer = SpecTokenizer(overflowing_export / spec.tokenizer_file, spec)
    session = ort.InferenceSession(str(overflowing_export / spec.onnx_file), providers=["CPUExecutionProvider"])

    def run(ids, mask):
        return session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]

    def padded(texts):
        return pad_batch([np.array(x) for x in tokenizer.encode(tokenizer.format(texts)).ids], spec.pad_token_id,
                         spec.padding_side)

    return spec, run, padded


def test_the_patched_graph_really_overflows(session_and_tokens):
    _, run, padded = session_and_tokens
    raw = run(*padded([GOOD[0], OVERFLOWING]))
    assert np.isfinite(raw[0]).all() and not np.isfinite(raw[1]).all()


def test_encode_requests_fails_only_the_overflowing_input_of_a_batch(session_and_tokens):
    spec, run, padded = session_and_tokens
    requests = [padded([GOOD[0], OVERFLOWING]), padded(GOOD)]
    outputs, stats = encode_requests(run, requests, pad_id=spec.pad_token_id, padding_side=spec.padding_side,
                                     max_tokens=4096, max_rows=64, normalized=spec.normalize)
    assert isinstance(outputs[0], EncoderRowError)
    assert "input[1] produced a non-finite embedding" in str(outputs[0])
    np.testing.assert_allclose(outputs[1], run(*padded(GOOD)), atol=1e-3)  # same rows, fp16 graph
    assert stats.nonfinite_rows == 1


@pytest.fixture(scope="module")
def server(overflowing_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("nan-guard-triton")
    build_repository(root / "models", [overflowing_export], ServingOptions(profile="cpu", intra_op_threads=1))
    with TritonServer(root / "models", log_file=root / "tritonserver.log") as triton:
        yield triton


def infer(server, texts):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        arr = np.array([[t.encode()] for t in texts], dtype=object)
        inp = grpcclient.InferInput("TEXT", list(arr.shape), "BYTES")
        inp.set_data_from_numpy(arr)
        return client.infer(NAME, [inp]).as_numpy("EMBEDDING")
    finally:
        client.close()


def test_served_overflow_is_a_clear_error_and_never_a_nan_vector(server, session_and_tokens):
    _, run, padded = session_and_tokens
    with pytest.raises(InferenceServerException) as err:
        infer(server, [GOOD[0], OVERFLOWING])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input[1] produced a non-finite embedding" in err.value.message()
    good = infer(server, GOOD)
    assert np.isfinite(good).all()
    expected = run(*padded(GOOD))
    cos = (good * expected).sum(1) / (np.linalg.norm(good, axis=1) * np.linalg.norm(expected, axis=1))
    assert cos.min() >= 0.9999


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nan-guard-fp32") / "fp32"
    export_model("random-qwen3:tiny", out, precision="fp32", name=NAME, max_length=128, run_stsb=False)
    return out


@pytest.fixture(scope="module")
def server_with_fallback(overflowing_export, fp32_export, tmp_path_factory):
    """The same overflowing fp16 encoder, with the fp32 export of the same checkpoint as its fallback session."""
    root = tmp_path_factory.mktemp("nan-guard-fallback-triton")
    options = ServingOptions(profile="cpu", intra_op_threads=1, fallback_onnx_file="model.fp32.onnx")
    build_repository(root / "models", [overflowing_export], options)
    shutil.copy2(fp32_export / "model.onnx", root / "models" / f"{NAME}_encoder" / "1" / "model.fp32.onnx")
    with TritonServer(root / "models", log_file=root / "tritonserver.log") as triton:
        yield triton


def test_with_a_higher_precision_fallback_the_overflowing_input_gets_its_correct_vector(
        server_with_fallback, fp32_export, session_and_tokens):
    from tritonembed.export.families import family_by_name
    from tritonembed.export.resolve import resolve_model

    spec, run, padded = session_and_tokens
    got = infer(server_with_fallback, [GOOD[0], OVERFLOWING])
    assert np.isfinite(got).all()
    reference = family_by_name(spec.family).reference_embed(
        resolve_model("random-qwen3:tiny").path, [spec.format_text(OVERFLOWING, None)], spec)[0]
    assert float(got[1] @ reference / np.linalg.norm(got[1]) / np.linalg.norm(reference)) >= 0.99999
    fp16_good = run(*padded([GOOD[0]]))[0]  # the row that did not overflow stays the fp16 session's
    np.testing.assert_allclose(got[0], fp16_good, atol=1e-3)
