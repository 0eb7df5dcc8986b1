"""The precision declarations are what the CLI, the spec, the validator, the memory model and configs read."""

from __future__ import annotations

import pytest

from tritonembed import precisions
from tritonembed.cli import build_parser
from tritonembed.errors import SpecError
from tritonembed.export.quantize import quantize_onnx
from tritonembed.model_repository.memory_model import model_shape


def test_every_precision_but_the_reference_is_quantized_with_a_floor_and_a_target():
    assert precisions.NAMES[0] == "fp32" and not precisions.precision("fp32").quantized
    for name in precisions.QUANTIZED:
        declared = precisions.precision(name)
        assert 0 < declared.min_cosine < 1 and declared.stsb_max_drop > 0 and declared.weight_bytes < 4


def test_an_unknown_precision_is_a_spec_error_naming_the_choices():
    with pytest.raises(SpecError, match="fp32, fp16, int8, int4"):
        precisions.precision("int2")


def test_the_cli_choices_and_help_come_from_the_declarations(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "m", "-o", "x", "--precision", "int2"])
    assert "{fp32,fp16,int8,int4}" in capsys.readouterr().err
    assert parser.parse_args(["export", "m", "-o", "x", "--precision", "int4"]).precision == "int4"


def test_the_quantizer_refuses_what_is_not_declared_quantized(tmp_path):
    with pytest.raises(ValueError, match="fp32 needs no quantization"):
        quantize_onnx(tmp_path / "model.onnx", tmp_path / "out.onnx", "fp32")


def test_the_memory_model_sizes_layers_from_the_declared_weight_bytes(tmp_path):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    # a graph with no attention node: the estimate from the weights' bytes and the precision's weight size
    weight = numpy_helper.from_array(np.zeros(12 * 64 * 64 // 2, np.float32), "w")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    int8, fp16 = (model_shape(tmp_path / "model.onnx", 64, p) for p in ("int8", "fp16"))
    assert int8.layers == 2 * fp16.layers and (int8.compute_bytes, fp16.compute_bytes) == (4, 2)
