"""Token shards: BOS-delimited documents that decode back to the text, offsets, dtype choice, the
memory-mapped reader's checks, and the stage end to end as the engines run it."""

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_stage
from daychat.data.textshards import ShardWriter, read_manifest, write_manifest
from daychat.data.tokens import (META, TokenShards, encode_shard, gather_parts, plan_workers, pretokenize,
                                 pretokenize_part, token_dtype)
from daychat.errors import UserError
from daychat.tokenizer import Tokenizer


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta 12 345 über naïve 東京 😀 <|bos|> , . !".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 60))) for _ in range(n)]
    docs[0] = ""  # an empty document still gets its BOS
    return docs


SHARDS = [("train", make_docs(300, 1)), ("train", make_docs(50, 2)), ("val", make_docs(40, 3))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("raw")
    infos = []
    for i, (split, docs) in enumerate(SHARDS):
        with ShardWriter(folder / f"shard_{i:05d}.parquet", split) as writer:
            for j, text in enumerate(docs):
                writer.write(f"{i}-{j}", text, "test")
        infos.append(writer.info)
    write_manifest(folder, infos)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    Tokenizer.train((doc for _, docs in SHARDS for doc in docs), vocab_size=400).save(folder)
    return folder


@pytest.fixture(scope="module")
def tokens(dataset, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens")
    pretokenize(dataset, tokenizer, out, workers=1, batch_docs=16)  # several batches per shard
    return out


def test_documents_start_with_bos_and_decode_back(tokens, tokenizer):
    tok = Tokenizer.load(tokenizer)
    for split, expected in (("train", SHARDS[0][1] + SHARDS[1][1]), ("val", SHARDS[2][1])):
        shards = TokenShards(tokens, split)
        docs = list(shards.documents())
        assert len(docs) == shards.docs == len(expected)
        for doc, text in zip(docs, expected):
            assert doc[0] == tok.bos_id and tok.bos_id not in doc[1:]
            assert tok.decode(doc[1:]) == text
            assert doc[1:].tolist() == tok.encode(text)


def test_offsets_point_at_every_bos(tokens):
    shards = TokenShards(tokens, "train")
    for shard, starts in zip(shards.shards, shards.doc_starts):
        assert starts.dtype == np.int64 and starts[0] == 0
        assert (np.flatnonzero(np.asarray(shard) == shards.bos_id) == starts).all()


def test_meta_matches_the_files(tokens, tokenizer, dataset):
    meta = json.loads((tokens / META).read_text())
    assert meta["format"] == "daychat.tokens/1"
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == Tokenizer.load(tokenizer).vocab_size
    assert meta["tokenizer_sha256"] == json.loads((tokenizer / "tokenizer.json").read_text())["tiktoken_sha256"]
    assert [(s["split"], s["source"], s["docs"]) for s in meta["shards"]] == [
        ("train", "shard_00000.parquet", 300), ("train", "shard_00001.parquet", 50), ("val", "shard_00002.parquet", 40)]
    for s in meta["shards"]:
        assert (tokens / s["file"]).stat().st_size == 2 * s["tokens"]
        texts = SHARDS[int(s["source"][6:11])][1]
        assert s["text_bytes"] == sum(len(t.encode()) for t in texts)
    shards = TokenShards(tokens, "val")
    assert shards.tokens == meta["shards"][2]["tokens"] and len(shards) == 1


def test_dtype_choice():
    assert token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    assert token_dtype(1000, "uint32") == np.dtype("<u4")
    with pytest.raises(UserError, match="pretokenize.dtype uint16 cannot hold a vocab of 100000"):
        token_dtype(100_000, "uint16")


def test_forced_uint32_in_worker_processes_matches_uint16(dataset, tokenizer, tokens, tmp_path):
    meta = pretokenize(dataset, tokenizer, tmp_path, dtype="uint32", workers=2, batch_docs=7)
    assert meta["dtype"] == "uint32"
    wide, narrow = TokenShards(tmp_path, "train"), TokenShards(tokens, "train")
    assert wide.dtype == np.dtype("<u4")
    for a, b in zip(wide.shards, narrow.shards):
        assert np.array_equal(a, b)


def test_threads_encode_the_same(dataset, tokenizer, tokens, tmp_path):
    tok = Tokenizer.load(tokenizer)
    chars = []
    result = encode_shard(tok, dataset / "shard_00000.parquet", tmp_path / "s.bin", tmp_path / "s.idx.npy",
                          np.dtype("<u2"), batch_docs=32, threads=2, on_batch=chars.append)
    expected = TokenShards(tokens, "train")
    assert result == (expected.infos[0].tokens, 300, expected.infos[0].text_bytes)
    assert np.array_equal(np.fromfile(tmp_path / "s.bin", dtype="<u2"), expected.shards[0])
    assert np.array_equal(np.load(tmp_path / "s.idx.npy"), expected.doc_starts[0])
    assert sum(chars) == sum(map(len, SHARDS[0][1])) and len(chars) == 10  # 300 docs in batches of 32


def test_plan_workers():
    assert plan_workers(2, 8) == (2, 1)  # processes over shards
    assert plan_workers(4, 1) == (1, 4)  # one shard: threads in one process
    assert plan_workers(4, 3) == (3, 1)


def test_reader_detects_truncated_and_missing_files(tokens, tmp_path):
    broken = tmp_path / "tokens"
    shutil.copytree(tokens, broken)
    with open(broken / "train/shard_00001.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)
    with pytest.raises(UserError, match=r"train/shard_00001.bin holds .* tokens, meta.json says"):
        TokenShards(broken, "train")
    TokenShards(broken, "val")  # the other split is untouched
    (broken / "val/shard_00002.idx.npy").unlink()
    with pytest.raises(UserError, match="shard_00002.idx.npy is missing or unreadable"):
        TokenShards(broken, "val")
    with pytest.raises(UserError, match="not a finished token dataset"):
        TokenShards(tmp_path / "nowhere")


def test_a_corrupt_shard_stops_the_pool_with_its_name(dataset, tokenizer, tmp_path):
    broken = tmp_path / "raw"
    shutil.copytree(dataset, broken)
    (broken / "shard_00001.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(UserError, match="shard_00001.parquet is not a readable parquet shard"):
        pretokenize(broken, tokenizer, tmp_path / "tokens", workers=2)


# ----------------------------------------------------------------------------------------------------
# The stage


STAGE_ARGS = ["--data", "data/raw", "--tokenizer", "models/tokenizer", "--out", "data/tokens",
              "--metrics", "reports/metrics/pretokenize.json"]


@pytest.fixture
def workspace(tmp_path, dataset, tokenizer) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(dataset, ws / "data/raw")
    shutil.copytree(tokenizer, ws / "models/tokenizer")
    (ws / "params.yaml").write_text(yaml.safe_dump({"pretokenize": {"dtype": "auto", "workers": 2, "batch_docs": 64}}))
    return ws


def test_stage_writes_shards_and_metrics(workspace, tokens):
    result = run_stage("pretokenize", STAGE_ARGS, workspace)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((workspace / "reports/metrics/pretokenize.json").read_text())
    assert set(metrics) == {"train_tokens", "val_tokens", "train_docs", "val_docs", "dtype", "tokens_per_s",
                            "mb_per_s", "seconds"}
    assert (metrics["train_docs"], metrics["val_docs"], metrics["dtype"]) == (350, 40, "uint16")
    expected = TokenShards(tokens, "train")  # written in-process above: processes must agree byte for byte
    written = TokenShards(workspace / "data/tokens", "train")
    assert metrics["train_tokens"] == written.tokens == expected.tokens
    for a, b in zip(written.shards, expected.shards):
        assert np.array_equal(a, b)
    assert metrics["val_tokens"] == TokenShards(workspace / "data/tokens", "val").tokens
    assert metrics["mb_per_s"] > 0 and metrics["tokens_per_s"] > 0


def test_stage_missing_input_is_one_error_line(workspace):
    shutil.rmtree(workspace / "data/raw")
    result = run_stage("pretokenize", STAGE_ARGS, workspace)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: [pretokenize] ") and "data/raw/manifest.json not found" in result.stderr
    assert not (workspace / "data/tokens").exists()



# ----------------------------------------------------------------------------------------------------
# Per shard: one job per shard, then a gather (what `snakemake --config per_shard=true` runs)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_parts_then_gather_is_byte_identical_to_the_full_run(dataset, tokenizer, tokens, tmp_path):
    parts = tmp_path / "parts"
    names = [s.name for s in read_manifest(dataset)]
    assert names == ["shard_00000", "shard_00001", "shard_00002"]
    for name in names:
        part = pretokenize_part(dataset, tokenizer, name, parts / name, workers=2, batch_docs=16)
        assert part["finished"] >= part["started"] and part["shard"]["source"] == f"{name}.parquet"
    meta, found = gather_parts(dataset, tokenizer, parts, tmp_path / "gathered")
    assert len(found) == 3 and meta == json.loads((tokens / META).read_text())
    assert file_hashes(tmp_path / "gathered") == file_hashes(tokens)
    with pytest.raises(UserError, match="shard 'shard_00009' is not listed in .*manifest.json"):
        pretokenize_part(dataset, tokenizer, "shard_00009", parts / "x")
    # a part made with another dtype is refused, a missing one is named
    pretokenize_part(dataset, tokenizer, "shard_00001", parts / "shard_00001", dtype="uint32")
    with pytest.raises(UserError, match=r"shard_00001/part.json was made from other inputs"):
        gather_parts(dataset, tokenizer, parts, tmp_path / "again")
    shutil.rmtree(parts / "shard_00001")
    with pytest.raises(UserError, match="shard shard_00001 of .* has no finished part"):
        gather_parts(dataset, tokenizer, parts, tmp_path / "again2")


def test_stage_per_shard_flags_write_what_the_plain_stage_writes(workspace):
    plain = run_stage("pretokenize", STAGE_ARGS, workspace)
    assert plain.returncode == 0, plain.stderr
    shutil.move(workspace / "data/tokens", workspace / "plain")
    metrics = json.loads((workspace / "reports/metrics/pretokenize.json").read_text())
    gather = run_stage("pretokenize", [*STAGE_ARGS, "--gather", "--parts", ".cache/parts"], workspace)
    assert gather.returncode == 2 and "shard shard_00000 of data/raw has no finished part" in gather.stderr
    for name in ("shard_00000", "shard_00001", "shard_00002"):
        result = run_stage("pretokenize", [*STAGE_ARGS, "--shard", name, "--parts", ".cache/parts"], workspace)
        assert result.returncode == 0, result.stderr
    assert not (workspace / "data/tokens").exists()  # a shard job writes its part only
    gather = run_stage("pretokenize", [*STAGE_ARGS, "--gather", "--parts", ".cache/parts"], workspace)
    assert gather.returncode == 0, gather.stderr
    assert file_hashes(workspace / "data/tokens") == file_hashes(workspace / "plain")
    gathered = json.loads((workspace / "reports/metrics/pretokenize.json").read_text())
    volatile = {"tokens_per_s", "mb_per_s", "seconds"}
    assert {k: v for k, v in gathered.items() if k not in volatile} == {k: v for k, v in metrics.items() if k not in volatile}
    assert set(gathered) == set(metrics) and gathered["seconds"] > 0
