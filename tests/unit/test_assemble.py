"""build_repository on an existing folder: emptied in place (it may be a mount point), then filled."""

from __future__ import annotations

import os
from pathlib import Path

from tests.unit.test_spec import make_spec
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions


def _fake_export(directory: Path) -> Path:
    directory.mkdir()
    spec = make_spec()
    spec.save(directory)
    (directory / spec.onnx_file).write_bytes(b"onnx")
    (directory / spec.tokenizer_file).write_text("{}")
    return directory


def test_an_existing_repository_is_emptied_in_place_not_replaced(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    (repository / "old_model" / "1").mkdir(parents=True)
    (repository / "stray.txt").write_text("left by an earlier repository")
    (repository / "link").symlink_to(tmp_path)
    handle = os.open(repository, os.O_RDONLY)  # a deleted folder keeps no links, even if its inode is reused
    try:
        specs = build_repository(repository, [_fake_export(tmp_path / "export")], ServingOptions())
        assert os.fstat(handle).st_nlink > 0  # the same folder, never removed: a mount point survives
    finally:
        os.close(handle)
    assert sorted(p.name for p in repository.iterdir()) == sorted(
        [specs[0].name, specs[0].tokenizer_model_name, specs[0].encoder_model_name])
    assert tmp_path.exists()  # the symlink was removed, not followed
