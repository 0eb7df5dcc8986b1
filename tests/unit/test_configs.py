"""Generated config.pbtxt files parse as Triton ModelConfig and agree with the spec and each other."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tests.unit.test_spec import make_spec
from tritonembed.model_repository.configs import (
    ServingOptions,
    encoder_config,
    ensemble_config,
    pbtxt_string,
    tokenizer_config,
)
from tritonembed.spec import SPEC_PARAMETER_KEY, ModelSpec, encoder_inputs, ensemble_inputs

DTYPES = {v: k for k, v in model_config_pb2.DataType.items()}


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def io(tensors):
    return [(t.name, DTYPES[t.data_type].replace("TYPE_", ""), list(t.dims), getattr(t, "optional", False))
            for t in tensors]


def spec_io(tensors):
    return [(t.name, "STRING" if t.dtype == "BYTES" else t.dtype, list(t.dims), t.optional) for t in tensors]


@pytest.fixture
def spec() -> ModelSpec:
    return make_spec(name="Qwen3-Embedding-4B", hidden_size=2560)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_configs_agree_with_the_spec(spec, profile):
    options = ServingOptions(profile=profile, encoder_max_batch=64 if profile == "gpu" else 256)
    assert options.gpu_backend == "python"  # the default: one planner for both profiles
    ens, tok, enc = parse(ensemble_config(spec, options)), parse(tokenizer_config(spec, options)), parse(encoder_config(spec, options))
    assert ens.platform == "ensemble" and ens.name == spec.name
    assert io(ens.input) == spec_io(ensemble_inputs())
    assert io(ens.output) == spec_io(spec.ensemble_outputs)
    assert io(tok.input) == spec_io(ensemble_inputs())
    assert io(enc.input)[:2] == [(t.name, t.dtype, list(t.dims), False) for t in encoder_inputs()]
    assert io(enc.output) == [("embedding", "FP32", [2560], False)]
    # every composing model batches at least as much as the ensemble accepts
    assert 0 < ens.max_batch_size <= min(tok.max_batch_size, enc.max_batch_size)
    # the ensemble wires tokenizer outputs to encoder inputs, and the encoder's output to EMBEDDING
    step_tok, step_enc = ens.ensemble_scheduling.step
    assert step_tok.model_name == spec.tokenizer_model_name and step_enc.model_name == spec.encoder_model_name
    assert {v for v in step_tok.output_map.values()} >= set(step_enc.input_map.values())
    assert step_enc.output_map["embedding"] == "EMBEDDING"
    assert set(step_tok.input_map) == {t.name for t in ensemble_inputs()}
    # the published spec round-trips
    assert ModelSpec.from_json(ens.parameters[SPEC_PARAMETER_KEY].string_value) == spec
    # no queue policy by default: Triton 2.51's batcher stalls idle models for 500 ms when one is set
    for cfg in (tok, enc):
        assert not cfg.dynamic_batching.HasField("default_queue_policy")


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_a_bounded_queue_rejects_overload(spec, profile):
    options = ServingOptions(profile=profile, encoder_max_batch=64, max_queue_size=32)
    for cfg in (parse(tokenizer_config(spec, options)), parse(encoder_config(spec, options))):
        policy = cfg.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == 32 and policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT


def test_negative_queue_size_is_refused():
    with pytest.raises(ValueError, match="max_queue_size"):
        ServingOptions(max_queue_size=-1)


def test_cpu_encoder_is_a_ragged_python_model(spec):
    enc = parse(encoder_config(spec, ServingOptions(profile="cpu", intra_op_threads=3, max_tokens_per_batch=4096)))
    assert enc.backend == "python"
    assert all(i.allow_ragged_batch for i in enc.input)
    assert enc.parameters["intra_op_threads"].string_value == "3"
    assert enc.parameters["max_tokens_per_batch"].string_value == "4096"
    assert enc.parameters["microbatch_workers"].string_value == "2"
    assert enc.parameters["intra_op_spinning"].string_value == "during_run"
    assert enc.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    spinning = parse(encoder_config(spec, ServingOptions(profile="cpu", intra_op_spinning="always")))
    assert spinning.parameters["intra_op_spinning"].string_value == "always"
    with pytest.raises(ValueError, match="intra_op_spinning"):
        ServingOptions(intra_op_spinning="sometimes")


def test_gpu_encoder_is_the_python_model_on_cuda_with_a_memory_budget(spec):
    enc = parse(encoder_config(spec, ServingOptions(profile="gpu", encoder_max_batch=64, memory_grant="20",
                                                    memory_threshold=0.8, memory_limit_file="/run/limit")))
    assert enc.backend == "python" and all(i.allow_ragged_batch for i in enc.input)
    assert enc.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    params = {k: v.string_value for k, v in enc.parameters.items()}
    assert params["execution_provider"] == "cuda" and params["microbatch_workers"] == "1"
    assert params["max_tokens_per_batch"] == str(ServingOptions.gpu_max_tokens_per_batch)
    assert params["memory_grant"] == "20" and params["memory_threshold"] == "0.8"
    assert params["memory_limit_file"] == "/run/limit"
    # the same code path on the CPU execution provider (what tests can run without a GPU)
    on_cpu = parse(encoder_config(spec, ServingOptions(profile="gpu", encoder_max_batch=64, execution_provider="cpu")))
    assert on_cpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert on_cpu.parameters["execution_provider"].string_value == "cpu"
    assert on_cpu.parameters["microbatch_workers"].string_value == "1"


def test_serving_options_check_the_gpu_knobs():
    for bad in ({"gpu_backend": "tensorrt-llm"}, {"execution_provider": "rocm"}, {"memory_threshold": 0},
                {"memory_threshold": 1.5}, {"memory_grant": "lots"}, {"memory_grant": "-2"},
                {"profile": "cpu", "execution_provider": "cuda"}):
        with pytest.raises(ValueError):
            ServingOptions(**bad)
    assert ServingOptions(profile="gpu").provider == "cuda" and ServingOptions().provider == "cpu"


def test_gpu_onnxruntime_backend_option_keeps_warmup_tensorrt_and_an_arena_cap(spec):
    with pytest.raises(ValueError, match="needs a memory grant"):  # unbounded otherwise
        ServingOptions(profile="gpu", gpu_backend="onnxruntime", memory_grant="0.8")
    enc = parse(encoder_config(spec, ServingOptions(profile="gpu", encoder_max_batch=64, gpu_backend="onnxruntime",
                                                    gpu_mem_limit_bytes=8 * 1024**3)))
    assert enc.backend == "onnxruntime" and enc.default_model_filename == "model.onnx"
    assert enc.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(enc.dynamic_batching.preferred_batch_size) == [8, 16, 32, 64]
    assert [w.batch_size for w in enc.model_warmup] == [1, 32]
    assert not enc.optimization.execution_accelerators.gpu_execution_accelerator
    assert enc.parameters["gpu_mem_limit"].string_value == str(8 * 1024**3)
    trt = parse(encoder_config(spec, ServingOptions(profile="gpu", encoder_max_batch=64, tensorrt=True,
                                                    gpu_backend="onnxruntime", memory_grant="2")))
    [accel] = trt.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP32"
    assert trt.parameters["gpu_mem_limit"].string_value == str(2 * 1024**3)


def test_pbtxt_string_escapes_templates():
    value = 'Instruct: {instruction}\nQuery:"{text}" \\ 你好\r'
    parsed = parse(f"name: {pbtxt_string('x')}\nparameters {{ key: \"k\" value: {{ string_value: {pbtxt_string(value)} }} }}")
    assert parsed.parameters["k"].string_value == value


def test_options_are_checked():
    with pytest.raises(ValueError):
        ServingOptions(profile="tpu")
    with pytest.raises(ValueError):
        ServingOptions(max_texts_per_request=512, encoder_max_batch=64)


def test_cpu_encoder_refuses_an_unknown_spinning_mode_at_load(tmp_path):
    """A hand-edited config.pbtxt with a bad value fails the model load instead of running with a guess."""
    import json

    from tritonembed.model_repository.encoder_model import TritonPythonModel

    args = {"model_repository": str(tmp_path), "model_version": "1", "model_name": "m_encoder",
            "model_config": json.dumps({"parameters": {"intra_op_spinning": {"string_value": "sometimes"}}})}
    with pytest.raises(ValueError, match="intra_op_spinning"):
        TritonPythonModel().initialize(args)
