"""Tokenizer: exact round trips of any Unicode, special tokens, tiktoken compatibility, training edge
cases, and the stage end to end (compression on ../shared/data/corpus/mixed validation)."""

import json
import random
import shutil
from pathlib import Path

import pytest
import tiktoken
import yaml
from tiktoken.load import load_tiktoken_bpe

from conftest import run_stage
from daychat.data.textshards import ShardInfo, ShardWriter, verify_parquet, write_manifest
from daychat.errors import UserError
from daychat.tokenizer import SPECIAL_TOKENS, TIKTOKEN_FILE, INFO_FILE, TextStream, Tokenizer

MIXED = Path(__file__).resolve().parents[1].parent / "shared/data/corpus/mixed"

SAMPLES = [
    "",
    "Hello, world! The year 2024 had 366 days; 3.14159 is pi.",
    "emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",  # skin tone, ZWJ family, flag, variation selector
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0363\u036b",  # decomposed accents, Devanagari, stacked marks
    "nul \x00 inside \x00\x00 and control \x07\x1b[0m",
    "newlines: unix\nwindows\r\nold mac\rmixed\n\r\n\n  trailing  \t\n",
    "rtl: مرحبا بالعالم שלום עולם",
    "math: ∀x∈ℝ, x² ≥ 0 ⇒ √(x²) = |x|; 𝔼[X] = ∑ p·x",
    "a document quoting <|bos|> and <|assistant_start|> as plain text",
    " " * 37 + "x" + "\n" * 5,
    "\U0010FFFF\U000E0001\uFEFF\u200B end of planes, tags, BOM, zero width",
]


def corpus_docs(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-like documents with numbers, punctuation and some non-ASCII."""
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog data model token train learn byte pair merge "
             "café naïve 東京 ünïcödé 42 1999 3.5 -- ... ! ? (see) [ref] {x}").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus_docs(), vocab_size=600)


def write_dataset(folder: Path, train: list[str], val: list[str]) -> Path:
    """A text dataset (manifest + parquet shards) holding `train` and `val` documents."""
    infos = []
    for i, (split, docs) in enumerate((("train", train), ("val", val))):
        with ShardWriter(folder / f"shard_{i:05d}.parquet", split, origin="test") as writer:
            for j, text in enumerate(docs):
                writer.write(f"{split}-{j}", text, "test")
        infos.append(writer.info)
    write_manifest(folder, infos)
    return folder


def link_corpus(src: Path, folder: Path) -> Path:
    """A text dataset over the parquet files of `src` (the last one is val), without copying them."""
    folder.mkdir(parents=True)
    files = sorted(src.glob("*.parquet"))
    infos = []
    for i, path in enumerate(files):
        (folder / path.name).symlink_to(path)
        rows, chars = verify_parquet(path)
        infos.append(ShardInfo(file=path.name, split="val" if i == len(files) - 1 else "train",
                               rows=rows, chars=chars, origin=str(path)))
    write_manifest(folder, infos)
    return folder


# ----------------------------------------------------------------------------------------------------
# Encoding


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids
    assert max(ids, default=0) < tok.bos_id  # ordinary text never yields a special id


def test_round_trip_random_codepoints(tok):
    rng = random.Random(1234)
    # Every code point but the surrogates, which are not characters (they have no UTF-8 form).
    points = [c for c in (rng.randrange(0x110000) for _ in range(5000)) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(map(chr, points))
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, text[::-1]], num_threads=2) == [tok.encode(text), tok.encode(text[::-1])]


def test_surrogates_are_replaced_not_fatal(tok):
    lone = "a\ud800b\udfffc"
    expected = "a\ufffdb\ufffdc"
    assert tok.decode(tok.encode(lone)) == expected
    assert tok.encode_array(lone).tolist() == tok.encode(expected)
    assert tok.encode_batch([lone]) == [tok.encode(expected)]
    # A pair spelled as two code points is joined into the character it encodes.
    assert tok.decode(tok.encode("\ud83d\ude00")) == "😀"


def test_special_tokens_are_single_ids_after_the_ranks(tok):
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(tok.vocab_size - len(SPECIAL_TOKENS), tok.vocab_size))
    assert tok.bos_id == tok.encode_special("<|bos|>")
    for name, i in zip(SPECIAL_TOKENS, ids):
        assert tok.decode([i]) == name
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|eos|>")


def test_special_token_text_is_ordinary_text(tok):
    text = "<|bos|>hello<|user_start|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    assert tok.encode(text, prepend_bos=True) == [tok.bos_id, *ids]
    assert tok.encode_batch([text], prepend_bos=True) == [[tok.bos_id, *ids]]


def test_token_bytes_sum_to_utf8_length(tok):
    lengths = tok.token_bytes()
    assert lengths.shape == (tok.vocab_size,)
    assert (lengths[tok.bos_id:] == 0).all() and (lengths[:256] == 1).all()
    for text in SAMPLES:
        ids = tok.encode(text, prepend_bos=True)
        assert lengths[ids].sum() == len(text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_load_and_plain_tiktoken_agree(tok, tmp_path):
    tok.save(tmp_path)
    info = json.loads((tmp_path / INFO_FILE).read_text())
    assert info["vocab_size"] == tok.vocab_size and info["bos_id"] == tok.bos_id
    # Plain tiktoken, as any other tool would load it; the hash sidesteps tiktoken's path-keyed cache.
    ranks = load_tiktoken_bpe(str(tmp_path / TIKTOKEN_FILE), expected_hash=info["tiktoken_sha256"])
    enc = tiktoken.Encoding("plain", pat_str=info["pattern"], mergeable_ranks=ranks,
                            special_tokens=info["special_tokens"])
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == tok.vocab_size == enc.n_vocab
    assert loaded.info == tok.info
    for text in SAMPLES:
        assert enc.encode_ordinary(text) == loaded.encode(text) == tok.encode(text)
    assert enc.encode("<|bos|>", allowed_special="all") == [tok.bos_id]


def test_load_reports_missing_and_damaged_files(tok, tmp_path):
    with pytest.raises(UserError, match="not a trained tokenizer"):
        Tokenizer.load(tmp_path / "nowhere")
    tok.save(tmp_path)
    with open(tmp_path / TIKTOKEN_FILE, "ab") as f:
        f.write(b"not-base64!! x\n")
    with pytest.raises(UserError, match="damaged tokenizer"):
        Tokenizer.load(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Training


def test_vocab_running_out_of_pairs_is_reported():
    tok = Tokenizer.train(["ab ab ab abc"] * 10, vocab_size=2000)
    assert tok.vocab_size < 2000
    assert tok.info["vocab_size_requested"] == 2000
    assert tok.decode(tok.encode("abc ab")) == "abc ab"


def test_training_refuses_bad_input_before_rustbpe():
    with pytest.raises(UserError, match="no training text"):
        Tokenizer.train(iter([]), vocab_size=600)
    with pytest.raises(UserError, match="vocab_size must be >= 265"):
        Tokenizer.train(["hello"], vocab_size=264)  # rustbpe would abort the process here
    with pytest.raises(UserError, match="tokenizer.pattern is not a valid regex"):
        Tokenizer.train(["hello"], vocab_size=600, pattern="(unclosed")


def test_raw_regex_pattern(tok):
    words = Tokenizer.train(corpus_docs(50), vocab_size=400, pattern=r"\s+|\w+|[^\s\w]+")
    assert words.pattern == r"\s+|\w+|[^\s\w]+"
    assert words.decode(words.encode(SAMPLES[1])) == SAMPLES[1]


def test_text_stream_caps_documents_and_total(tmp_path):
    data = write_dataset(tmp_path / "raw", ["a" * 100, "", "b" * 100, "c" * 100], ["v"])
    stream = TextStream([data / "shard_00000.parquet"], max_chars=150, doc_cap=60)
    assert list(stream) == ["a" * 60, "b" * 60, "c" * 30]
    assert (stream.chars, stream.docs) == (150, 3)


# ----------------------------------------------------------------------------------------------------
# The stage


def workspace(tmp_path: Path, data: Path, **tokenizer_params) -> Path:
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    shutil.move(data, ws / "data" / "raw")
    params = {"vocab_size": 600, "max_chars": 10_000_000, "doc_cap": 10_000, "pattern": "gpt4",
              "eval_chars": 1_000_000, **tokenizer_params}
    (ws / "params.yaml").write_text(yaml.safe_dump({"tokenizer": params}))
    return ws


STAGE_ARGS = ["--data", "data/raw", "--out", "models/tokenizer", "--metrics", "reports/metrics/tokenizer.json"]


def test_stage_reports_compression_on_mixed_validation(tmp_path):
    assert MIXED.is_dir(), f"{MIXED} is missing: tests need ../shared beside the project"
    ws = workspace(tmp_path, link_corpus(MIXED, tmp_path / "raw"), vocab_size=4096, max_chars=6_000_000)
    result = run_stage("tokenizer", STAGE_ARGS, ws)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((ws / "reports/metrics/tokenizer.json").read_text())
    assert set(metrics) == {"vocab_size", "vocab_size_requested", "bytes_per_token", "train_chars", "train_docs",
                            "train_seconds", "seconds"}
    assert metrics["vocab_size"] == metrics["vocab_size_requested"] == 4096
    assert metrics["train_chars"] == 6_000_000
    assert metrics["bytes_per_token"] > 2
    assert "bytes/token" in result.stdout
    tok = Tokenizer.load(ws / "models/tokenizer")
    assert tok.vocab_size == 4096 and tok.info["train_chars"] == 6_000_000
    assert sorted(p.name for p in (ws / "models/tokenizer").iterdir()) == [INFO_FILE, TIKTOKEN_FILE]


def test_stage_warns_when_the_vocab_runs_out(tmp_path):
    ws = workspace(tmp_path, write_dataset(tmp_path / "raw", ["tiny corpus, tiny corpus"] * 3, ["tiny"]),
                   vocab_size=5000)
    result = run_stage("tokenizer", STAGE_ARGS, ws)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((ws / "reports/metrics/tokenizer.json").read_text())
    assert metrics["vocab_size"] < metrics["vocab_size_requested"] == 5000
    assert "warning: the training text ran out of pairs" in result.stdout


def test_stage_errors_are_one_line(tmp_path):
    ws = workspace(tmp_path, write_dataset(tmp_path / "raw", [""], ["val"]))
    result = run_stage("tokenizer", STAGE_ARGS, ws)  # the train split holds only an empty document
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: [tokenizer] no training text")
    shutil.rmtree(ws / "data/raw")
    result = run_stage("tokenizer", STAGE_ARGS, ws)
    assert result.returncode == 2
    assert "manifest.json not found" in result.stderr
    assert not (ws / "models").exists()
