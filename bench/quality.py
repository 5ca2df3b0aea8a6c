"""Quality stage throughput on ../shared/data/corpus: `python -m bench.quality`.

The stage runs as the engines run it, in its own process, on each corpus (gutenberg: 8 shards, 553 books,
~200M characters; mixed: 2 shards, 3,719 short documents, ~16M characters) with the real recipe's
language ID and heuristics (params.yaml) and `workers: 2`. The real recipe's classifier positives are
downloads, so here they are offline: GSM8K's questions and answers (../shared/data/sft), against the
input itself, with 200k hash buckets instead of 2M (a 50 MB model, not 0.5 GB, on this small machine).

Figures per corpus:
- docs_per_s, mb_per_s: the whole stage (read, strip, language ID, heuristics, classifier training and
  scoring, write) over the UTF-8 text it read, on 2 cores;
- per part (lid, heuristics, classifier scoring): docs/s and MB/s on 2 cores, from the CPU seconds the
  stage's workers spent in each part (metrics *_cpu_s) as if both cores ran that part alone;
- what was dropped, per reason, and the classifier's held-out precision / recall.
Results are merged into reports/bench/data.json under "quality"; other benchmarks own the other keys.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml

from bench.data import link_dataset, measure, write_params
from bench import record
from daychat.data.quality import ALL_REASONS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "reports" / "bench" / "data.json"
WORKERS = 2
OFFLINE_CLASSIFIER = {
    "classifier_positives": [f"local:{SHARED / 'sft/gsm8k/train.jsonl'}#question+answer"],
    "classifier_negatives": ["input"],
    "classifier_buckets": 200_000,
}


def main() -> None:
    if not SHARED.is_dir():
        sys.exit(f"error: {SHARED} not found; the quality benchmark needs ../shared beside the project")
    recipe = yaml.safe_load((ROOT / "params.yaml").read_text())["quality"]
    params = {**recipe, **OFFLINE_CLASSIFIER, "workers": WORKERS}
    results = {"workers": WORKERS, "params": params}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for corpus in ("gutenberg", "mixed"):
            ws = Path(tmp) / corpus
            link_dataset(sorted((SHARED / "corpus" / corpus).resolve().glob("*.parquet")), ws / "data/dedup")
            write_params(ws, quality=params)
            results[corpus] = run_stage(ws)
    record(OUT, {"quality": results})
    print(json.dumps({k: v for k, v in results.items() if k != "params"}, indent=2))


def run_stage(ws: Path) -> dict:
    run = measure([sys.executable, str(ROOT / "stages/quality.py"), "--data", "data/dedup", "--model-out",
                   "models/quality", "--out", "data/filtered", "--metrics", "metrics/quality.json"], ws)
    m = json.loads((ws / "metrics/quality.json").read_text())
    mb = m["mb_per_s"] * m["seconds"]  # UTF-8 MB of input text
    parts = {}
    for part, cpu_s, docs in (("lid", m["lid_cpu_s"], m["docs_in"]), ("heuristics", m["heuristics_cpu_s"], m["docs_in"]),
                              ("classifier_scoring", m["classifier_score_cpu_s"], m["docs_out"] + m["dropped_classifier"])):
        wall = cpu_s / WORKERS
        parts[part] = {"cpu_s": cpu_s, "docs_per_s": round(docs / wall, 1) if wall else None,
                       "mb_per_s": round(mb / wall, 2) if wall else None}
    return {
        "docs_in": m["docs_in"], "docs_out": m["docs_out"], "text_mb": round(mb, 2),
        "docs_per_s": m["docs_per_s"], "mb_per_s": m["mb_per_s"], "seconds": m["seconds"],
        "process_s": round(run["seconds"], 2), "peak_rss_mb": round(run["peak_rss_mb"], 1),
        "parts": parts,
        "classifier_train_s": m["classifier_train_s"],
        "classifier_precision": m["classifier_precision"], "classifier_recall": m["classifier_recall"],
        "classifier_holdout_docs": m["classifier_holdout_docs"],
        "dropped": {reason: m[f"dropped_{reason}"] for reason in ALL_REASONS if m[f"dropped_{reason}"]},
        "stripped_chars": m["stripped_chars"], "stripped_docs": m["stripped_docs"],
    }


if __name__ == "__main__":
    main()
