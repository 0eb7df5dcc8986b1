"""The spec contract: round trip, validation, derived names and templates."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tritonembed.errors import SpecError
from tritonembed.spec import (
    HEADS,
    POOLINGS,
    ModelSpec,
    OutputSpec,
    TensorSpec,
    encoder_inputs,
)


def make_spec(**changes) -> ModelSpec:
    base = dict(name="m", model_id="org/m", family="qwen3", pooling="last_token", normalize=True, hidden_size=1024,
                max_length=8192, padding_side="left", pad_token_id=151643, precision="fp32", matryoshka=True,
                min_dimensions=32, query_template="Instruct: {instruction}\nQuery:{text}",
                default_query_instruction="Find it")
    base.update(changes)
    return ModelSpec(**base)


def test_round_trip_through_json(tmp_path):
    spec = make_spec(extra={"random_weights": True})
    spec.save(tmp_path)
    assert ModelSpec.load(tmp_path) == spec
    data = json.loads((tmp_path / "tritonembed.json").read_text())
    assert [t["name"] for t in data["encoder_inputs"]] == ["input_ids", "attention_mask"]
    assert data["encoder_outputs"] == [{"name": "embedding", "dtype": "FP32", "dims": [1024], "optional": False}]


@pytest.mark.parametrize("changes, message", [
    ({"pooling": "max"}, "pooling"),
    ({"precision": "int3"}, "precision"),
    ({"padding_side": "middle"}, "padding_side"),
    ({"min_dimensions": 2048}, "min_dimensions"),
    ({"query_template": "no text here"}, "{text}"),
    ({"hidden_size": 0}, "positive"),
])
def test_invalid_specs_are_refused(changes, message):
    with pytest.raises(SpecError, match=message):
        make_spec(**changes)


def test_load_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(SpecError, match="no model spec"):
        ModelSpec.load(tmp_path)
    (tmp_path / "tritonembed.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        ModelSpec.load(tmp_path)
    data = make_spec().to_dict()
    data["schema_version"] = 99
    (tmp_path / "tritonembed.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match="schema_version"):
        ModelSpec.load(tmp_path)


def test_a_spec_declaring_other_encoder_tensors_is_refused():
    data = make_spec().to_dict()
    data["encoder_inputs"] = [dict(data["encoder_inputs"][0], name="ids"), data["encoder_inputs"][1]]
    with pytest.raises(SpecError, match="encoder inputs"):
        ModelSpec.from_dict(data)


def test_dimension_range_and_templates():
    qwen = make_spec()
    assert qwen.dimension_range == (32, 1024)
    assert qwen.format_text("hi", "Find it") == "Instruct: Find it\nQuery:hi"
    assert qwen.format_text("hi", None) == "hi"
    bert = dataclasses.replace(qwen, matryoshka=False, min_dimensions=None)
    assert bert.dimension_range == (1024, 1024)
    assert qwen.tokenizer_model_name == "m_tokenizer" and qwen.encoder_model_name == "m_encoder"


def test_tensor_specs():
    assert [t.config_dtype for t in encoder_inputs()] == ["TYPE_INT64", "TYPE_INT64"]
    assert TensorSpec("TEXT", "BYTES", (1,)).config_dtype == "TYPE_STRING"
    with pytest.raises(SpecError):
        TensorSpec("x", "FLOAT", (1,))


def test_a_schema_1_file_loads_as_an_embedder_with_its_decoder_inferred_once(tmp_path):
    data = make_spec().to_dict()
    for key in ("task", "outputs", "decoder"):
        del data[key]
    data["schema_version"] = 1
    (tmp_path / "tritonembed.json").write_text(json.dumps(data))
    spec = ModelSpec.load(tmp_path)
    assert spec.task == "embed" and spec.decoder is True and spec.schema_version == 2
    assert [o.name for o in spec.outputs] == ["EMBEDDING"]
    assert spec.encoder_outputs == (TensorSpec("embedding", "FP32", (1024,)),)


def test_outputs_are_declared_and_derive_both_interfaces():
    spec = make_spec(decoder=True)
    assert spec.outputs == (OutputSpec("embedding", (1024,)),)
    assert [t.name for t in spec.ensemble_outputs] == ["EMBEDDING", "TOKEN_COUNT"]
    assert spec.output("embedding").encoder_name == "embedding"
    with pytest.raises(SpecError, match="no 'nope' output"):
        spec.output("nope")
    with pytest.raises(SpecError, match="task"):
        make_spec(task="classify")
    with pytest.raises(SpecError, match="head"):
        OutputSpec("nope", (1,))


def test_every_declared_pooling_and_head_has_a_torch_implementation():
    from tritonembed.export import heads

    assert set(heads.POOLINGS) == set(POOLINGS)
    assert set(heads.HEADS) == set(HEADS)
