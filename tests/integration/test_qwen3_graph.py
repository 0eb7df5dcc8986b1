"""The Qwen3 graph built node by node (export/qwen3_graph.py) against the traced fused graph, and the
bounded-memory stages around it: the streamed PyTorch reference and quantizers that read one weight at a time.

Checkpoints are the random-weight ``tiny`` Qwen3 (float32 as ``random-qwen3:tiny`` resolves it, and bfloat16 as
the released checkpoints are stored).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tritonembed.errors import ExportError
from tritonembed.export.families import family_by_name
from tritonembed.export.onnx_export import build_pooled_encoder, export_onnx
from tritonembed.export.qwen3_graph import Qwen3Dims, build_qwen3_embedding_graph, supports
from tritonembed.export.resolve import resolve_model
from tritonembed.export.testmodels import create_random_qwen3
from tritonembed.export.validate import cpu_session
from tritonembed.spec import ModelSpec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {"float32": resolve_model("random-qwen3:tiny").path,
            "bfloat16": create_random_qwen3(tmp_path_factory.mktemp("ck") / "tiny-bf16", "tiny", dtype="bfloat16")}


@pytest.fixture(scope="module")
def spec(checkpoints) -> ModelSpec:
    from tritonembed.export.families import ExportOptions, read_json

    path = checkpoints["float32"]
    return family_by_name("qwen3").make_spec(path, "tiny", read_json(path / "config.json"), ExportOptions("fp32", 1024, None))


def _batches() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 151_000, size=(4, 40)).astype(np.int64)
    mixed = np.ones_like(ids)
    mixed[1, :10] = 0  # left padded
    mixed[2, 25:] = 0  # right padded
    mixed[3, :3] = 0
    mixed[3, 30:] = 0  # both
    return [(ids, mixed), (ids, np.ones_like(ids)), (ids[:1, :1], np.ones((1, 1), dtype=np.int64))]


def _run(path: Path, batches, **options) -> list[np.ndarray]:
    session = cpu_session(path, 2, **options)
    return [session.run(None, {"input_ids": ids, "attention_mask": mask})[0] for ids, mask in batches]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_built_graph_equals_the_traced_graph_bit_for_bit(checkpoints, spec, tmp_path, dtype):
    checkpoint = checkpoints[dtype]
    traced = export_onnx(build_pooled_encoder(family_by_name("qwen3").load_backbone(checkpoint), spec, "gqa"),
                         tmp_path / "traced" / "model.onnx")
    built_dir = tmp_path / "built"
    built_dir.mkdir()
    model = build_qwen3_embedding_graph(checkpoint, built_dir / "model.onnx", spec)
    onnx.checker.check_model(str(built_dir / "model.onnx"))
    batches = _batches()
    for want, got in zip(_run(traced, batches), _run(built_dir / "model.onnx", batches)):
        assert got.shape == want.shape and np.array_equal(got, want)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    # every weight is external (read back one at a time by the quantizers), 4 KiB aligned
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1
              and np.prod(t.dims) > 64]
    assert floats and all(t.data_location == onnx.TensorProto.EXTERNAL for t in floats)
    assert all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0 for t in floats)


def test_validation_form_keeps_the_checkpoints_dtype_and_gives_the_same_numbers(checkpoints, spec, tmp_path):
    checkpoint = checkpoints["bfloat16"]
    (tmp_path / "f").mkdir()
    (tmp_path / "s").mkdir()
    build_qwen3_embedding_graph(checkpoint, tmp_path / "f" / "model.onnx", spec)
    stored = build_qwen3_embedding_graph(checkpoint, tmp_path / "s" / "model.onnx", spec, weights="stored")
    types = {t.data_type for t in stored.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert types == {onnx.TensorProto.BFLOAT16}
    assert (tmp_path / "s" / "model.onnx_data").stat().st_size < 0.6 * (tmp_path / "f" / "model.onnx_data").stat().st_size
    batches = _batches()
    for want, got in zip(_run(tmp_path / "f" / "model.onnx", batches),
                         _run(tmp_path / "s" / "model.onnx", batches, low_memory=True)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _rewritten_checkpoint(source: Path, target: Path, rewrite) -> Path:
    """A copy of ``source`` (its config and weights) whose tensor dict went through ``rewrite``."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = rewrite(load_file(str(source / "model.safetensors")))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target / "model.safetensors"))
    return target


def test_causal_lm_checkpoint_names_are_found(checkpoints, spec, tmp_path):
    """Qwen3ForCausalLM checkpoints prefix every tensor with ``model.``; the graph is the same."""
    source = checkpoints["float32"]
    prefixed = _rewritten_checkpoint(source, tmp_path / "prefixed",
                                     lambda tensors: {f"model.{k}": v for k, v in tensors.items()})
    for name, path in (("plain", source), ("prefixed", prefixed)):
        (tmp_path / name).mkdir(exist_ok=True)
        build_qwen3_embedding_graph(path, tmp_path / name / "model.onnx", spec)
    batches = _batches()
    for a, b in zip(_run(tmp_path / "plain" / "model.onnx", batches), _run(tmp_path / "prefixed" / "model.onnx", batches)):
        assert np.array_equal(a, b)


def test_a_missing_weight_or_an_unsupported_config_is_a_clear_error(checkpoints, spec, tmp_path):
    source = checkpoints["float32"]
    missing = "layers.1.mlp.down_proj.weight"
    broken = _rewritten_checkpoint(source, tmp_path / "broken",
                                   lambda tensors: {k: v for k, v in tensors.items() if k != missing})
    with pytest.raises(ExportError, match="layers.1.mlp.down_proj.weight"):
        build_qwen3_embedding_graph(broken, tmp_path / "model.onnx", spec)

    config = json.loads((source / "config.json").read_text())
    with pytest.raises(ExportError, match="sliding-window"):
        Qwen3Dims.from_config({**config, "use_sliding_window": True, "sliding_window": 4096})
    with pytest.raises(ExportError, match="scaled RoPE"):
        Qwen3Dims.from_config({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ExportError, match="attention biases"):
        Qwen3Dims.from_config({**config, "attention_bias": True})
    (broken / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    from tritonembed.export.pipeline import builds_graph

    assert builds_graph(source, family_by_name("qwen3"), spec, True)
    assert not builds_graph(broken, family_by_name("qwen3"), spec, True)  # traced instead
    assert not builds_graph(source, family_by_name("qwen3"), spec, False)  # --no-static-shapes: as traced
    reranker = family_by_name("qwen3-reranker")
    assert supports(spec) and not supports(reranker.make_spec(source, "r", config, _options()))


def _options():
    from tritonembed.export.families import ExportOptions

    return ExportOptions("fp32", 1024, None)


def test_streamed_reference_is_the_loaded_model_bit_for_bit(checkpoints):
    import torch
    from transformers import AutoModel

    from tritonembed.export.streamed_model import streamed_qwen3_backbone

    ids = torch.tensor(_batches()[0][0])
    mask = torch.tensor(_batches()[0][1])
    for checkpoint in checkpoints.values():
        loaded = AutoModel.from_pretrained(str(checkpoint), attn_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad(), streamed_qwen3_backbone(checkpoint) as streamed:
            got = streamed(input_ids=ids, attention_mask=mask).last_hidden_state
            assert all(p.device.type == "meta" for p in streamed.parameters())  # nothing kept after the run
            want = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(got, want)


@pytest.mark.parametrize("precision", ["int4", "fp16", "int8"])
def test_quantizing_a_graph_with_external_weights_gives_the_same_model(checkpoints, spec, tmp_path, precision):
    """The quantizers read an external-data graph's weights one at a time; the result equals quantizing the
    same graph held in memory (inline weights), tensor for tensor and output for output."""
    from tritonembed.export.quantize import quantize_onnx

    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    build_qwen3_embedding_graph(checkpoints["bfloat16"], external, spec)
    inline = tmp_path / "inline" / "model.onnx"
    inline.parent.mkdir()
    onnx.save(onnx.load(str(external)), str(inline))
    assert not (inline.parent / "model.onnx_data").exists()
    a = quantize_onnx(external, tmp_path / "qa" / "model.onnx", precision)
    b = quantize_onnx(inline, tmp_path / "qb" / "model.onnx", precision)
    ma, mb = onnx.load(str(a.model_path)), onnx.load(str(b.model_path))
    assert [n.op_type for n in ma.graph.node] == [n.op_type for n in mb.graph.node]
    inits_b = {t.name: t for t in mb.graph.initializer}
    assert {t.name for t in ma.graph.initializer} == set(inits_b)
    for t in ma.graph.initializer:
        assert onnx.numpy_helper.to_array(t).tobytes() == onnx.numpy_helper.to_array(inits_b[t.name]).tobytes(), t.name
    batches = _batches()
    for x, y in zip(_run(a.model_path, batches), _run(b.model_path, batches)):
        assert np.array_equal(x, y)
