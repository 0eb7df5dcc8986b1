"""Reading a checkpoint one tensor (or a chunk of rows) at a time: export/checkpoint_tensors.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tritonembed.errors import ExportError
from tritonembed.export import checkpoint_tensors
from tritonembed.export.checkpoint_tensors import CheckpointTensors


@pytest.fixture
def checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(1001, 24, generator=generator).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(40, 24, generator=generator).to(torch.bfloat16),
        "norm.weight": torch.randn(24, generator=generator),
        "scalar": torch.tensor(3.0),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def test_tensors_read_by_bare_name_in_their_dtype_and_as_float32(checkpoint):
    path, tensors = checkpoint
    reader = CheckpointTensors(path)
    table = tensors["model.embed_tokens.weight"]
    assert "embed_tokens.weight" in reader and reader.dtype("embed_tokens.weight") == "bfloat16"
    assert torch.equal(reader.stored("embed_tokens.weight"), table)
    up = reader.float32("layers.0.mlp.up_proj.weight", transpose=True)
    assert up.shape == (24, 40) and up.flags["C_CONTIGUOUS"]
    assert torch.equal(torch.from_numpy(up), tensors["model.layers.0.mlp.up_proj.weight"].float().t())
    assert reader.as_stored("embed_tokens.weight").dtype.name == "int16"  # bfloat16 as its raw words


def test_row_chunks_and_copy_into_cover_every_row_once(checkpoint, monkeypatch):
    path, tensors = checkpoint
    reader = CheckpointTensors(path)
    table = tensors["model.embed_tokens.weight"]
    chunks = list(reader.row_chunks("embed_tokens.weight", chunk_bytes=24 * 2 * 100))  # 100 rows each
    assert [first for first, _ in chunks] == list(range(0, 1001, 100))
    assert torch.equal(torch.cat([rows for _, rows in chunks]), table)
    monkeypatch.setattr(checkpoint_tensors, "CHUNK_BYTES", 24 * 2 * 7)
    into = torch.empty(1001, 24, dtype=torch.float32)
    reader.copy_into("embed_tokens.weight", into)
    assert torch.equal(into, table.float())
    scalar = torch.empty(())
    reader.copy_into("scalar", scalar)
    assert scalar.item() == 3.0


def test_missing_short_or_foreign_files_are_export_errors(checkpoint, tmp_path_factory):
    path, _ = checkpoint
    reader = CheckpointTensors(path)
    with pytest.raises(ExportError, match="no tensor 'lm_head.weight'"):
        reader.stored("lm_head.weight")
    with pytest.raises(ExportError, match="in the checkpoint"):
        reader.copy_into("norm.weight", torch.empty(25))
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ExportError, match="no \\*.safetensors"):
        CheckpointTensors(empty)
    (empty / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ExportError, match="corrupt safetensors header"):
        CheckpointTensors(empty)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])  # the last tensor cut short
    with pytest.raises(ExportError, match="shorter than its tensor"):
        for name in ("embed_tokens.weight", "layers.0.mlp.up_proj.weight", "norm.weight", "scalar"):
            CheckpointTensors(path).stored(name)
