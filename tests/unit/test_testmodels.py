"""Tests for tritonembed.export.testmodels: random-weight Qwen3 look-alikes (``tiny`` only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tritonembed.errors import ExportError
from tritonembed.export import testmodels as tm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.create_random_qwen3(tmp_path_factory.mktemp("tiny") / "model", shape="tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> Any:
    return transformers.AutoModel.from_pretrained(tiny_dir).eval()


def test_directory_layout(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert names >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config_sentence_transformers.json",
        "modules.json",
        "1_Pooling",
    }


def test_config_json(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["model_type"] == "qwen3"
    assert config[tm.RANDOM_WEIGHTS_FIELD] is True
    assert config["vocab_size"] == 151669
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["head_dim"] == 16 and config["intermediate_size"] == 128
    assert config["rope_theta"] == 1000000
    assert config["max_position_embeddings"] == 32768
    assert config["rms_norm_eps"] == 1e-6
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == 151643
    assert tm.is_random_weights(tiny_dir)


def test_is_random_weights_false_elsewhere(tmp_path: Path) -> None:
    assert not tm.is_random_weights(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}', encoding="utf-8")
    assert not tm.is_random_weights(tmp_path)
    (tmp_path / "config.json").write_text("not json", encoding="utf-8")
    assert not tm.is_random_weights(tmp_path)


def test_loads_with_automodel_and_stays_finite(tiny_dir: Path, tiny_model: Any) -> None:
    assert type(tiny_model).__name__ == "Qwen3Model"
    assert tiny_model.config.hidden_size == 64
    shape = tm.QWEN3_SHAPES["tiny"]
    assert sum(p.numel() for p in tiny_model.parameters()) == shape.parameter_count()

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["Hello, world!", "a much longer sentence " * 20], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1].item() == 151643  # EOS appended, left padding keeps it last
    with torch.no_grad():
        hidden = tiny_model(**batch).last_hidden_state
    assert hidden.shape[-1] == 64
    assert torch.isfinite(hidden).all()
    assert hidden[:, -1].abs().max() > 0


def test_same_seed_gives_identical_bytes(tmp_path: Path, tiny_dir: Path) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    again = tm.create_random_qwen3(tmp_path / "again", shape="tiny", seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert _sha256(again / "model.safetensors") == _sha256(tiny_dir / "model.safetensors")


def test_different_seed_gives_different_weights(tmp_path: Path, tiny_dir: Path) -> None:
    other = tm.create_random_qwen3(tmp_path / "other", shape="tiny", seed=1)
    assert _sha256(other / "model.safetensors") != _sha256(tiny_dir / "model.safetensors")


def test_bfloat16_weights(tmp_path: Path) -> None:
    from safetensors import safe_open

    directory = tm.create_random_qwen3(tmp_path / "bf16", shape="tiny", seed=0, dtype="bfloat16")
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((directory / "config.json").read_text(encoding="utf-8"))["torch_dtype"] == "bfloat16"


def test_sentence_transformers_files(tiny_dir: Path) -> None:
    st_config = json.loads((tiny_dir / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    assert st_config == {
        "prompts": {
            "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
            "document": "",
        },
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    pooling = json.loads((tiny_dir / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    assert pooling["pooling_mode_lasttoken"] is True and pooling["word_embedding_dimension"] == 64
    modules = json.loads((tiny_dir / "modules.json").read_text(encoding="utf-8"))
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]


def test_sentence_transformer_matches_last_token_pooling(tiny_dir: Path, tiny_model: Any) -> None:
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(tiny_dir), device="cpu")
    texts = ["hello world", "a longer sentence with more tokens in it"]
    embeddings = model.encode(texts, prompt_name="query", convert_to_tensor=True)

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    batch = tokenizer([tm.QWEN3_EMBEDDING_PROMPTS["query"] + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        last = tiny_model(**batch).last_hidden_state[:, -1]
    expected = torch.nn.functional.normalize(last, dim=-1)
    assert torch.allclose(embeddings.cpu(), expected, atol=1e-5)


EXPECTED_SHAPES = {
    # name: (hidden, layers, heads, kv heads, head_dim, intermediate, tie_word_embeddings)
    "tiny": (64, 2, 4, 2, 16, 128, True),
    "0.6B": (1024, 28, 16, 8, 128, 3072, True),
    "4B": (2560, 36, 32, 8, 128, 9728, True),
    "8B": (4096, 36, 32, 8, 128, 12288, False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_shape_configs(name: str) -> None:
    config = tm.qwen3_config(name)  # config only: no weights are created
    hidden, layers, heads, kv_heads, head_dim, intermediate, tie = EXPECTED_SHAPES[name]
    assert config.model_type == "qwen3"
    assert (config.hidden_size, config.num_hidden_layers) == (hidden, layers)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (heads, kv_heads, head_dim)
    assert config.intermediate_size == intermediate
    assert config.tie_word_embeddings is tie
    assert config.vocab_size == 151669
    assert config.rope_parameters["rope_theta"] == 1000000
    assert config.max_position_embeddings == 32768
    assert config.rms_norm_eps == 1e-6


def test_parameter_counts_match_published_sizes() -> None:
    billions = {name: tm.QWEN3_SHAPES[name].parameter_count() / 1e9 for name in ("0.6B", "4B", "8B")}
    assert 0.59 < billions["0.6B"] < 0.60
    assert 4.0 < billions["4B"] < 4.05
    assert 7.5 < billions["8B"] < 7.6


def test_unknown_shape_and_dtype(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown Qwen3 shape"):
        tm.create_random_qwen3(tmp_path, shape="70B")
    with pytest.raises(ExportError, match="unsupported dtype"):
        tm.create_random_qwen3(tmp_path, dtype="int8")
    assert not any(tmp_path.iterdir())
