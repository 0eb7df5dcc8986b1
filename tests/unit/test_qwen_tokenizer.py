"""Tests for tritonembed.export.qwen_tokenizer: the offline Qwen3-Embedding tokenizer.

The reference is tiktoken run on the same ranks with the same regex (that is how Qwen itself
defines the tokenizer); text is NFC-normalized first because tiktoken does not normalize.
"""

from __future__ import annotations

import csv
import json
import random
import sysconfig
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from tritonembed.errors import ExportError
from tritonembed.export import qwen_tokenizer as qt

STSB_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "stsb"


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="module")
def tokenizer(cache_dir: Path) -> Any:
    return qt.build_qwen3_tokenizer(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def unpadded(tokenizer: Any) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    return tok


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return qt.load_tiktoken_ranks()


@pytest.fixture(scope="module")
def tiktoken_encoding(ranks: dict[bytes, int]) -> Any:
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding(
        name="qwen3-reference",
        pat_str=qt.QWEN2_PRETOKENIZE_REGEX,
        mergeable_ranks=ranks,
        special_tokens={content: token_id for token_id, content, _ in qt.QWEN3_ADDED_TOKENS},
    )


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any, cache_dir: Path) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITONEMBED_CACHE", str(cache_dir))  # reuse the module's cache entry
        return qt.save_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3-tokenizer"))


# --------------------------------------------------------------------------------------------
# a deterministic multilingual / code corpus
# --------------------------------------------------------------------------------------------

HANDWRITTEN = [
    "Hello, world!",
    "DON'T STOP. I'M HERE, YOU'RE THERE, WE'VE BEEN, HE'LL GO, SHE'D SAY, IT'S FINE.",
    "don't i'm you're we've he'll she'd it's They'S Don'T",
    "rock 'n' roll ''quoted'' 's 't 're",
    "The quick brown fox jumps over the lazy dog.\r\nSecond line\r\n\r\nThird\n\n\n",
    "    indented    text\t\twith\ttabs   \n   \n\t\n",
    "trailing spaces     ",
    "     leading spaces",
    "12345678901234567890 3.14159265358979 1,000,000 0x1F2E 1e-10 -42 +7 ٣٤٥ ١٢٣ 一二三 ⅫⅣ ²³",
    "今天天气很好，我们去公园散步吧。人工智能正在改变世界。",
    "日本語のテキストです。カタカナとひらがな、そして漢字。東京は日本の首都です。",
    "한국어 텍스트입니다. 서울은 대한민국의 수도입니다.",
    "مرحبا بالعالم. هذه جملة باللغة العربية.",
    "Привет, мир! Это предложение на русском языке. ЁЖИК В ТУМАНЕ.",
    "Γειά σου κόσμε. Ελληνικά κείμενα.",
    "नमस्ते दुनिया। यह हिंदी में एक वाक्य है।",
    "สวัสดีชาวโลก นี่คือภาษาไทย",
    "שלום עולם. זה משפט בעברית.",
    "Tiếng Việt có dấu: Xin chào thế giới, đường phố Hà Nội.",
    "Ça va? Naïve café, crème brûlée, Straße, Ærøskøbing, İstanbul, ǅemal.",
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇺🇸 ❤️ ✨🔥💯 🧑🏿‍💻",
    "mixed 中文English日本語한국어123abc!!!???...",
    "e\u0301 a\u0308 o\u0302 n\u0303 (NFD forms) \u212b \u2126 \ufb01 \u00bd",
    "zero\u200bwidth\u200cjoiner\u200dspace\ufeffbom \u00a0nbsp \u3000ideographic\u2003em",
    "line\u2028separator\u2029paragraph\x0bvt\x0cff\x85nel",
    "<|endoftext|> inside text and <|im_start|>user\nhi<|im_end|>",
    "<think>reasoning</think> <tool_call>{}</tool_call> <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "<|endoftext",
    "<| endoftext |>",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!(\"{:?}\", v); }",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\r\n",
    "func main() {\n\tfmt.Println(\"hello\")\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    "const add = (a, b) => a + b; // arrow function\nconsole.log(`${add(1, 2)}`);",
    "<html><body><div class=\"x\">&nbsp;&lt;tag&gt;</div></body></html>",
    "public static void main(String[] args) { System.out.println(\"Hi\"); }",
    "#!/bin/bash\nfor i in $(seq 1 10); do echo \"$i\"; done\n",
    "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
    "====================================================================================",
    "--------------------------------------------------------------------------------\n",
    "!!!!!!!!!!??????......,,,,,;;;;;;:::::''''\"\"\"\"````~~~~",
    " " * 200,
    "\n" * 50,
    "\t" * 30 + "x",
    "a" * 500,
    "ab" * 300,
    "😀" * 40,
    "",
    " ",
    "\r\n",
    "'",
    "\x00\x01\x02\x7f control chars \x1b[31mred\x1b[0m",
]

_POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    " \t\n\r\x0b\x0c\u00a0\u2003\u3000\u200b\u0085\u2028",
    "的一是不了在人有我他这个们中来上大为和国地到以说时要就出也得里后自",
    "あいうえおかきくけこアイウエオカキクケコー",
    "가나다라마바사아자차카타파하한국어",
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГД",
    "ابتثجحخدذرسشصضطظعغفقكلمنهوي",
    "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह्ािीुूेैोौं",
    "กขคงจฉชซญดตถทนบปผพฟภมยรลวศษสหอฮะาิีึืุู",
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿœšžßĀāĞğİıŁł",
    "\u0300\u0301\u0302\u0303\u0308\u0327\u030a",
    "😀😂🥲👍🏽👨‍👩‍👧🇫🇷❤️✨🔥🎉🚀💡🤖",
    "①②③ⅠⅡⅢ¼½¾²³٠١٢٣٤٥٦٧٨٩०१२",
]
_PIECES = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'VE", "'M", "'LL", "'D"]
_PIECES += ["\r\n", "  ", "\n\n", " '", "''"]


def _fuzz_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.1:
                parts.append(rng.choice(_PIECES))
            else:
                pool = rng.choice(_POOLS)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    return out


def _stsb_sentences() -> list[str]:
    out: list[str] = []
    for name in ("stsb-en-dev.csv", "stsb-zh-dev.csv"):
        path = STSB_DIR / name
        if not path.is_file():
            continue
        with path.open(encoding="utf-8", newline="") as handle:
            for row in csv.reader(handle):
                out.extend(row[:2])
    return out


def _code_chunks(max_chunks: int) -> list[str]:
    """Chunks of ~40 lines from stdlib .py files and torch's C++ headers / JS, chosen deterministically."""
    roots: list[tuple[Path, str]] = [(Path(sysconfig.get_paths()["stdlib"]), "*.py")]
    purelib = Path(sysconfig.get_paths()["purelib"])
    roots += [(purelib / "torch" / "include" / "c10", "*.h"), (purelib / "torch" / "utils" / "model_dump", "*js")]
    chunks: list[str] = []
    per_root = max_chunks // len(roots)
    for root, pattern in roots:
        if not root.is_dir():
            continue
        files = sorted(
            p for p in root.rglob(pattern) if not {"site-packages", "test"} & set(p.relative_to(root).parts)
        )
        taken = 0
        for path in files[:: max(1, len(files) // 150)]:
            try:
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            except (OSError, UnicodeDecodeError):
                continue
            for start in range(0, min(len(lines), 400), 40):
                chunks.append("".join(lines[start : start + 40]))
                taken += 1
            if taken >= per_root:
                break
    return chunks


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts = HANDWRITTEN + _stsb_sentences() + _code_chunks(1500) + _fuzz_strings(3000, seed=20240607)
    assert len(texts) > 4000, f"corpus too small ({len(texts)} texts)"
    return texts


# --------------------------------------------------------------------------------------------
# tests: the tokenizer itself
# --------------------------------------------------------------------------------------------


def test_hello_world(tokenizer: Any) -> None:
    assert tokenizer.encode("Hello, world!", add_special_tokens=False).ids == [9707, 11, 1879, 0]
    assert tokenizer.encode("Hello, world!").ids == [9707, 11, 1879, 0, 151643]


def test_vocab_and_merges_shape(tokenizer: Any, ranks: dict[bytes, int]) -> None:
    assert tokenizer.get_vocab_size(with_added_tokens=False) == qt.NUM_REGULAR_TOKENS
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 151669
    model = json.loads(tokenizer.to_str())["model"]
    assert model["type"] == "BPE"
    assert len(model["merges"]) == qt.NUM_REGULAR_TOKENS - 256
    # every regular token id maps back to its rank's bytes through the byte-level table
    decoder = {v: k for k, v in qt.bytes_to_unicode().items()}
    for token, rank in list(ranks.items())[::997]:
        piece = tokenizer.id_to_token(rank)
        assert bytes(decoder[c] for c in piece) == token


def test_pipeline_matches_qwen3_layout(tokenizer: Any) -> None:
    data = json.loads(tokenizer.to_str())
    assert data["normalizer"] == {"type": "NFC"}
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split"
    assert split["pattern"] == {"Regex": qt.QWEN2_PRETOKENIZE_REGEX}
    assert split["behavior"] == "Isolated" and split["invert"] is False
    assert byte_level["type"] == "ByteLevel"
    assert byte_level["add_prefix_space"] is False and byte_level["use_regex"] is False
    assert data["decoder"] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    assert data["post_processor"]["type"] == "TemplateProcessing"
    assert data["padding"]["direction"] == "Left" and data["padding"]["pad_id"] == qt.ENDOFTEXT_ID


def test_added_tokens_ids_and_flags(tokenizer: Any) -> None:
    added = {t["id"]: t for t in json.loads(tokenizer.to_str())["added_tokens"]}
    assert sorted(added) == list(range(151643, 151669))
    for token_id, content, special in qt.QWEN3_ADDED_TOKENS:
        assert added[token_id]["content"] == content
        assert added[token_id]["special"] is special
        assert added[token_id]["normalized"] is False
    expected_special = {c for _, c, s in qt.QWEN3_ADDED_TOKENS if s}
    assert expected_special == {
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
        "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    }  # fmt: skip
    assert tokenizer.token_to_id("<tool_call>") == 151657
    assert tokenizer.token_to_id("<think>") == 151667
    assert tokenizer.token_to_id("</think>") == 151668


def test_special_tokens_in_text(tokenizer: Any) -> None:
    ids = tokenizer.encode("a<|endoftext|>b", add_special_tokens=False).ids
    assert ids == [64, 151643, 65]
    ids = tokenizer.encode("<|im_start|>user\n<think>x</think><|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 151644 and ids[-1] == 151645 and 151667 in ids and 151668 in ids
    # skip_special_tokens drops special tokens only; <think> is an added, non-special token
    assert tokenizer.decode([151643, 151667, 64, 151645], skip_special_tokens=True) == "<think>a"


def test_padding_is_left_with_endoftext(tokenizer: Any) -> None:
    short, long = tokenizer.encode_batch(["Hello", "Hello, world!"])
    assert len(short.ids) == len(long.ids) == 5
    assert short.ids == [151643, 151643, 151643, 9707, 151643]
    assert short.attention_mask == [0, 0, 0, 1, 1]
    assert long.ids[-1] == 151643 and long.attention_mask == [1] * 5


def test_matches_tiktoken_on_corpus(unpadded: Any, tiktoken_encoding: Any, corpus: list[str]) -> None:
    normalized = [unicodedata.normalize("NFC", t) for t in corpus]
    ours = [e.ids for e in unpadded.encode_batch(corpus, add_special_tokens=False)]
    mismatches = []
    total_tokens = 0
    for text, got in zip(normalized, ours):
        want = tiktoken_encoding.encode(text, allowed_special="all")
        total_tokens += len(want)
        if got != want:
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)}/{len(corpus)} texts differ, e.g. {mismatches[:3]!r}"
    assert total_tokens > 200_000  # the corpus really is large


def test_decode_round_trips_nfc_text(unpadded: Any, corpus: list[str]) -> None:
    encodings = unpadded.encode_batch(corpus[::3], add_special_tokens=False)
    for text, enc in zip(corpus[::3], encodings):
        assert unpadded.decode(enc.ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)


def test_nfc_applied(tokenizer: Any) -> None:
    nfd = unicodedata.normalize("NFD", "café Ångström")
    nfc = unicodedata.normalize("NFC", nfd)
    assert nfd != nfc
    assert tokenizer.encode(nfd).ids == tokenizer.encode(nfc).ids


def test_derive_merges_rejects_non_bpe_vocab() -> None:
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256  # no "ab" or "bc": unreachable by two-token merges
    with pytest.raises(ExportError, match="not the merge of two"):
        qt.derive_merges(ranks)


# --------------------------------------------------------------------------------------------
# tests: errors and the cache
# --------------------------------------------------------------------------------------------


def test_missing_file_raises_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not found"):
        qt.build_qwen3_tokenizer(tmp_path / "nope.tiktoken", cache_dir=tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"@@not-base64@@ 0\n", "malformed"),
        (b"IQ== zero\n", "malformed"),
        (b"IQ==\n", "expected 'base64-token rank'"),
        (b"IQ== 0\nIg== 1\n", "expected 151643"),
    ],
)
def test_corrupt_file_raises_export_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(ExportError, match=message):
        qt.build_qwen3_tokenizer(path, cache_dir=tmp_path / "cache")


def test_truncated_real_file_raises(tmp_path: Path) -> None:
    real = qt.default_tiktoken_path().read_bytes()
    path = tmp_path / "truncated.tiktoken"
    path.write_bytes(real[: len(real) // 2])
    with pytest.raises(ExportError):
        qt.build_qwen3_tokenizer(path, use_cache=False)


def test_cache_is_written_and_reused(tokenizer: Any, cache_dir: Path) -> None:
    files = list(cache_dir.glob(f"qwen3-tokenizer-v{qt.BUILDER_VERSION}-*.json"))
    assert len(files) == 1
    again = qt.build_qwen3_tokenizer(cache_dir=cache_dir)
    assert again.to_str() == tokenizer.to_str()


def test_corrupt_cache_is_rebuilt(tmp_path: Path, tokenizer: Any, cache_dir: Path) -> None:
    (entry,) = cache_dir.glob("qwen3-tokenizer-*.json")
    bad = tmp_path / entry.name
    bad.write_text("{not json", encoding="utf-8")
    rebuilt = qt.build_qwen3_tokenizer(cache_dir=tmp_path)
    assert rebuilt.encode("Hello, world!").ids == [9707, 11, 1879, 0, 151643]
    assert bad.read_text(encoding="utf-8") == entry.read_text(encoding="utf-8")


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITONEMBED_CACHE", str(tmp_path / "x"))
    assert qt.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TRITONEMBED_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert qt.default_cache_dir() == tmp_path / "xdg" / "tritonembed"


# --------------------------------------------------------------------------------------------
# tests: the saved directory and transformers
# --------------------------------------------------------------------------------------------


def test_saved_files(saved_dir: Path) -> None:
    assert {p.name for p in saved_dir.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["padding_side"] == "left"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["eos_token"] == "<|im_end|>"
    assert config["model_max_length"] == 32768
    assert config["added_tokens_decoder"]["151667"]["special"] is False
    assert config["added_tokens_decoder"]["151656"]["special"] is True


def test_save_rejects_bad_max_length(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="model_max_length"):
        qt.save_qwen3_tokenizer(tmp_path, model_max_length=0)


def test_autotokenizer_loads_saved_dir(saved_dir: Path, unpadded: Any, corpus: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(saved_dir)
    assert tok.is_fast
    assert tok.padding_side == "left"
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert len(tok) == 151669
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0, 151643]

    batch = tok(["Hello", "Hello, world!"], padding=True)
    assert batch["input_ids"][0] == [151643, 151643, 151643, 9707, 151643]
    assert batch["attention_mask"][0] == [0, 0, 0, 1, 1]
    assert batch["input_ids"][1] == [9707, 11, 1879, 0, 151643]

    # the transformers tokenizer agrees with ours (EOS appended) on a slice of the corpus
    sample = corpus[::7]
    got = tok(sample)["input_ids"]
    want = [e.ids for e in unpadded.encode_batch(sample)]
    assert got == want
    assert tok.decode([151643, 151667, 64], skip_special_tokens=True) == "<think>a"
