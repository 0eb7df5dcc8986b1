"""The reranker's serving tokenization against the Qwen3-Reranker model card's ``process_inputs``."""

from __future__ import annotations

import json

import pytest

from tritonembed.errors import InputError, SpecError
from tritonembed.export.families import Qwen3RerankerFamily
from tritonembed.model_repository.rerank_tokenization import PairRequest, PairTokenizer, tokenize_pair_requests
from tritonembed.spec import ModelSpec, OutputSpec

FAMILY = Qwen3RerankerFamily


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tritonembed.export.qwen_tokenizer import save_qwen3_tokenizer

    directory = save_qwen3_tokenizer(tmp_path_factory.mktemp("tok"))
    data = json.loads((directory / "tokenizer.json").read_text())
    data["post_processor"] = None  # the released rerankers' tokenizer appends nothing
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return directory


def reranker_spec(max_length: int) -> ModelSpec:
    return ModelSpec(name="r", model_id="r", family="qwen3-reranker", pooling="last_token", normalize=False,
                     hidden_size=64, max_length=max_length, padding_side="left", pad_token_id=151643,
                     precision="fp32", task="rerank", outputs=(OutputSpec("yes_no_logit", (1,)),), decoder=True,
                     pair_prefix=FAMILY.PREFIX, pair_template=FAMILY.BODY, pair_suffix=FAMILY.SUFFIX,
                     default_query_instruction=FAMILY.DEFAULT_INSTRUCTION)


def official_ids(tokenizer_dir, pairs, instruction, max_length):
    """The model card's process_inputs (without the padding step)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), padding_side="left")
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
              "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)
    instruction = instruction or "Given a web search query, retrieve relevant passages that answer the query"
    texts = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    inputs = tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
    return [prefix_tokens + ids + suffix_tokens for ids in inputs["input_ids"]]


PAIRS = [("What is the capital of China?", "The capital of China is Beijing."),
         ("中国的首都是哪里？", "北京是中华人民共和国的首都。"),
         ("{query} in a query", "and {document} in a document"),
         ("long", "lorem ipsum dolor 12 " * 3000)]


@pytest.mark.parametrize("instruction", [None, "Find the passage that answers the question"])
@pytest.mark.parametrize("max_length", [8192, 300])
def test_ids_equal_the_official_process_inputs(tokenizer_dir, instruction, max_length):
    ours = PairTokenizer(tokenizer_dir / "tokenizer.json", reranker_spec(max_length))
    got = ours.encode_pairs([q for q, _ in PAIRS], [d for _, d in PAIRS], [instruction] * len(PAIRS))
    assert got.ids == official_ids(tokenizer_dir, PAIRS, instruction, max_length)
    assert got.truncated == [False, False, False, True] and len(got.ids[-1]) == max_length


def test_requests_are_refused_row_by_row(tokenizer_dir):
    ours = PairTokenizer(tokenizer_dir / "tokenizer.json", reranker_spec(256))
    results = tokenize_pair_requests(ours, [
        PairRequest([b"q", b"q"], [b"doc", b"other doc"]),
        PairRequest([b"q"], [b"   "]),
        PairRequest([b"q"], [b"doc", b"two"]),
        PairRequest([b"q"], ["word " * 400], truncate=[False]),
        PairRequest([b"q"], [b"\xff"]),
    ], pad_to_buckets=False)
    assert results[0].input_ids.shape[0] == 2 and results[0].token_counts[:, 0].tolist() == [
        len(x) for x in ours.encode_pairs(["q", "q"], ["doc", "other doc"]).ids]
    assert isinstance(results[1], InputError) and "input[0] is empty" in str(results[1])
    assert isinstance(results[2], InputError) and "DOCUMENT has 2 rows" in str(results[2])
    assert isinstance(results[3], InputError) and "truncation is disabled" in str(results[3])
    assert isinstance(results[4], InputError) and "UTF-8" in str(results[4])


def test_an_embedder_spec_or_no_room_for_a_body_is_refused(tokenizer_dir):
    with pytest.raises(SpecError, match="not a reranker"):
        PairTokenizer(tokenizer_dir / "tokenizer.json", ModelSpec(
            name="e", model_id="e", family="qwen3", pooling="last_token", normalize=True, hidden_size=64,
            max_length=64, padding_side="left", pad_token_id=0, precision="fp32"))
    with pytest.raises(SpecError, match="no room"):
        PairTokenizer(tokenizer_dir / "tokenizer.json", reranker_spec(40))
    with pytest.raises(SpecError, match="pair_template"):
        ModelSpec(name="r", model_id="r", family="qwen3-reranker", pooling="last_token", normalize=False,
                  hidden_size=64, max_length=64, padding_side="left", pad_token_id=0, precision="fp32", task="rerank")
