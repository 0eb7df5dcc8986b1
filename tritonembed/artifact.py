"""The files of an exported model directory: their names and the rule for external weights, in one place.

An export directory holds ``model.onnx`` (plus ``model.onnx_data`` when the weights do not fit one protobuf),
the tokenizer files, ``tritonembed.json`` (the spec) and ``report.json``. The exporter writes these, the
quantizer rewrites the graph, the repository builder copies them and the memory model sizes them; all of
them read the layout from here.
"""

from __future__ import annotations

from pathlib import Path

#: ``model.onnx`` -> ``model.onnx_data``: one file with every external tensor.
EXTERNAL_DATA_SUFFIX = "_data"
#: protobuf's hard limit on one serialized message (a whole ONNX graph with inline weights).
PROTOBUF_LIMIT_BYTES = 2**31
#: Above this many bytes of tensors a graph is written with external data: below the limit with room for
#: the graph's nodes and attributes.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Tokenizer files copied from a checkpoint into its export, those present (one fast tokenizer is required).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def external_data_file(model_path: Path) -> Path:
    """Where the external tensors of ``model_path`` live (whether or not the file exists)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + EXTERNAL_DATA_SUFFIX)


def onnx_files(model_path: Path) -> list[Path]:
    """``model.onnx`` plus its external-data file when there is one."""
    data = external_data_file(model_path)
    return [Path(model_path)] + ([data] if data.exists() else [])


def model_bytes(model_path: Path) -> int:
    """``model.onnx`` plus its external-data file, if any, in bytes."""
    return sum(f.stat().st_size for f in onnx_files(model_path))


def needs_external_data(tensor_bytes: int) -> bool:
    """Whether a graph with ``tensor_bytes`` of weights must keep them outside the protobuf."""
    return tensor_bytes > EXTERNAL_DATA_THRESHOLD


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files present in ``directory``, in :data:`TOKENIZER_FILES` order."""
    directory = Path(directory)
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
