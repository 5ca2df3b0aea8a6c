"""bench.labelled: the human-labelled pages are fetched verified, read strictly, and the quality stage's
filters and score are measured against their labels."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from bench import labelled
from daychat.data.heuristics import strip_gutenberg
from daychat.errors import UserError
from workflow import ablate

ROOT = labelled.ROOT
def prose(shared: Path, n: int) -> list[str]:
    """n excerpts of 80-400 words from Gutenberg's validation shard, headers cut (high quality here)."""
    rng = random.Random(0)
    books = [strip_gutenberg(row["text"])[0].split() for row in
             pq.read_table(shared / "corpus/gutenberg/shard_00007.parquet", columns=["text"]).to_pylist()[:n]]
    out = []
    for words in books:
        k = rng.randint(80, 400)
        start = rng.randrange(len(words) - k)
        out.append(" ".join(words[start:start + k]))
    return out


def listing(rng: random.Random, words: list[str], lines: int) -> str:
    """A page of product lines (low quality)."""
    return "\n".join(f"{rng.choice(words).title()} {rng.choice(words)} - ${rng.randint(5, 99)}.99 - "
                     f"{rng.choice(['In stock', 'Sale', 'Free shipping'])}" for _ in range(lines))


def pages_jsonl(tmp_path, shared: Path, n: int = 30):
    rng = random.Random(0)
    high = prose(shared, n)
    words = [w.strip(".,;:!?\"'").lower() for w in " ".join(high).split() if len(w) > 5]
    rows = [{"text": text, "label": 1} for text in high]
    rows += [{"text": listing(rng, words, rng.randint(15, 60)), "label": 0} for _ in range(n)]
    rows += [{"text": "A short note about the weather.", "label": 0}]  # too short for the length filter
    path = tmp_path / "pages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pages_are_copied_verified_and_cached(tmp_path, monkeypatch, shared_data):
    src = pages_jsonl(tmp_path, shared_data)
    monkeypatch.setattr(labelled, "PAGES_SHA256", hashlib.sha256(src.read_bytes()).hexdigest())
    cache = tmp_path / "cache" / "majority_data.jsonl"
    assert labelled.pages_file(src, cache=cache) == cache and cache.read_bytes() == src.read_bytes()
    src.unlink()
    assert labelled.pages_file(None, cache=cache) == cache  # from the cache: nothing is fetched again
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "x", "label": 1}\n')
    cache.unlink()
    with pytest.raises(UserError, match=r"other.jsonl is not DCLM's data/majority_data.jsonl at commit 361714b"):
        labelled.pages_file(other, cache=cache)
    with pytest.raises(UserError, match=r"cannot read the labelled pages from .*missing.jsonl"):
        labelled.pages_file(tmp_path / "missing.jsonl", cache=cache)
    assert not cache.exists()  # nothing half-written where the next run would take it as the pages


def test_a_malformed_page_is_named_by_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": "no label"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected"):
        labelled.read_pages(bad)


def test_filters_and_score_are_measured_against_the_labels(tmp_path, shared_data):
    pages = labelled.read_pages(pages_jsonl(tmp_path, shared_data))
    recipe = yaml.safe_load((ROOT / "params.yaml").read_text())["quality"]
    results = labelled.measure(pages, recipe)
    filters = results["filters"]
    assert filters["by_reason"]["too_short"] == {"high": 0, "low": 1}
    assert filters["high_dropped"] == 0.0 and filters["precision"] == 1.0  # only listings and the stub are dropped
    assert results["statistics_auc"]["stop_word_ratio"] > 0.9  # prose has the stop words, listings not
    assert results["score_params"]["auc"] > 0.9 and results["score_params"]["low_caught"] > 0.9
    fitted = results["score_fitted_here"]
    assert fitted["auc_out_of_fold"] > 0.9 and fitted["high_dropped_out_of_fold"] <= 0.2
    assert fitted["weights"]["stop_word_ratio"] >= 0 and fitted["weights"]["symbol_ratio"] <= 0  # signs kept
    high = tmp_path / "high.jsonl"
    assert labelled.write_split(pages, 1, high) == 30
    assert all(json.loads(line)["text"] for line in high.read_text().splitlines())


def test_the_ablation_reruns_when_its_held_out_text_changes(tmp_path, monkeypatch):
    """A run's name and recorded `code` cover the config's data/base settings and the files they name: a
    held-out text rewritten in place is a new measurement, not one to reuse."""
    held = tmp_path / "held.jsonl"
    held.write_text('{"text": "one"}\n')
    cfg = {"recipe": "ci", "base": {"pretrain.eval_text": str(held)}, "setup": "make the held-out text"}
    first = ablate.setup_hash(cfg, "code")
    assert ablate.setup_hash(cfg, "code") == first and ablate.setup_hash(cfg, "other code") != first
    held.write_text('{"text": "two"}\n')
    assert ablate.setup_hash(cfg, "code") != first
    held.unlink()
    with pytest.raises(SystemExit, match=r"pretrain.eval_text: .*held.jsonl not found; make it with `make the held-out text`"):
        ablate.setup_hash(cfg, "code")
