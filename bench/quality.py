"""Quality stage throughput, and what its classifier learns, on three corpora: `python -m bench.quality`.

The stage runs as the engines run it, in its own process, with `workers: 2`, on each corpus:
- gutenberg (../shared/data/corpus: 8 shards, 553 books, ~200M characters) and mixed (2 shards, 3,719
  short documents: movie reviews, news, web forum text, 19 Common Crawl pages, ~16M characters), with the
  real recipe's language ID and heuristics (params.yaml's thresholds, switched on: the recipe has them
  off) and an offline classifier: positives are the
  answers of four chat models to AlpacaEval's 805 instructions (../shared/data/sft/alpaca_eval, long-form
  explanatory answers, Apache-2.0), negatives the input, 200k hash buckets instead of 2M (a 50 MB model,
  not 0.5 GB, on this small machine);
- demo: the demo recipe's own text (the download stage's `embedded` source, Python's docs and the installed
  packages' descriptions; dedup skipped: it removes ~nothing there) with the demo recipe's quality params.

Figures per corpus:
- docs_per_s, mb_per_s: the whole stage (read, strip, language ID, heuristics, classifier training and
  scoring, write) over the UTF-8 text it read, on 2 cores; per part (lid, heuristics, classifier
  scoring): docs/s and MB/s from the CPU seconds the stage's workers spent in each, as if both cores ran
  that part alone; what was dropped, per reason;
- classifier: the stage's held-out precision / recall (on windows) and the Spearman correlation of its
  score with document length (words) and with line layout (characters per line) over every document it
  scored: the goal is |Spearman| < 0.15 (issue 18). Beside it, `whole_document`: the classifier this
  stage used to train (one line per document, up to 4000 characters sampled across it), trained here on
  the same sources and seed and scored on the same documents, to show what the windows change.
Results are merged into reports/bench/data.json under "quality"; other benchmarks own the other keys.
`python -m bench.quality demo mixed` runs only those corpora and prints, without recording.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from bench.data import link_dataset, measure, write_params
from bench import quality_filters_on, record
from daychat.data import quality
from daychat.data.quality import ALL_REASONS
from daychat.data.textshards import read_manifest
from daychat.params import parse_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "reports" / "bench" / "data.json"
WORKERS = 2
OFFLINE_CLASSIFIER = {
    "classifier_positives": [f"local:{SHARED / 'sft/alpaca_eval'}/*.json#output"],
    "classifier_negatives": ["input"],
    "classifier_buckets": 200_000,
}
OLD_DOC_CHARS = 4000  # what the whole-document classifier read of each document (its classifier_doc_chars)


def main() -> None:
    if not SHARED.is_dir():
        sys.exit(f"error: {SHARED} not found; the quality benchmark needs ../shared beside the project")
    recipe = quality_filters_on(yaml.safe_load((ROOT / "params.yaml").read_text())["quality"])
    demo = yaml.safe_load((ROOT / "workflow/recipes/demo.yaml").read_text())
    # The real recipe runs no filter on ClimbMix (params.yaml says why): here they are on.
    params = {**recipe, **OFFLINE_CLASSIFIER, "classifier": True, "workers": WORKERS}
    results = {"workers": WORKERS, "params": params}
    corpora = sys.argv[1:] or ["demo", "mixed", "gutenberg"]
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for corpus in corpora:
            ws = Path(tmp) / corpus
            if corpus == "demo":
                ws.mkdir()
                write_params(ws, download=demo["download"])
                measure([sys.executable, str(ROOT / "stages/download.py"), "--out", "data/dedup", "--cache",
                         ".cache/download", "--metrics", "metrics/download.json"], ws)
                p = {**demo["quality"], "workers": WORKERS}  # the demo's section as the demo runs it
            else:
                link_dataset(sorted((SHARED / "corpus" / corpus).resolve().glob("*.parquet")), ws / "data/dedup")
                p = params
            results[corpus] = run_stage(ws, p)
            results[corpus]["classifier"].update(whole_document_classifier(ws, p))
            print(corpus, json.dumps(results[corpus]["classifier"]), flush=True)
    if not sys.argv[1:]:
        record(OUT, {"quality": results})
    print(json.dumps({k: v for k, v in results.items() if k != "params"}, indent=2))


def run_stage(ws: Path, p: dict) -> dict:
    write_params(ws, quality=p)
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
        "classifier": {"positives": p["classifier_positives"], "negatives": p["classifier_negatives"],
                       "window_words": p.get("classifier_window_words", 50), "windows": p.get("classifier_windows", 8),
                       "holdout_windows": m["classifier_holdout_docs"], "precision": _round(m["classifier_precision"]),
                       "recall": _round(m["classifier_recall"]), "spearman_length": _round(m["classifier_spearman_length"]),
                       "spearman_line_chars": _round(m["classifier_spearman_line_chars"])},
        "dropped": {reason: m[f"dropped_{reason}"] for reason in ALL_REASONS if m[f"dropped_{reason}"]},
        "stripped_chars": m["stripped_chars"], "stripped_docs": m["stripped_docs"],
    }


def whole_document_classifier(ws: Path, p: dict) -> dict:
    """Two figures beside the stage's own, on the documents it scored (the stage again, classifier off):
    - by_source: the stage's classifier's Spearman with length and layout within each `source` of the
      corpus (mixed: movie reviews, news, forum text...), weighted by documents: what is left once the
      differences between sources, which are differences of content, are taken out;
    - whole_document: the pre-window classifier, trained on the same sources and seeded sample, each
      document one line of up to OLD_DOC_CHARS characters (quality.text_sample), same fastText settings."""
    write_params(ws, quality={**p, "classifier": False})
    measure([sys.executable, str(ROOT / "stages/quality.py"), "--data", "data/dedup", "--model-out", "models/off",
             "--out", "data/survivors", "--metrics", "metrics/off.json"], ws)
    params = parse_section("quality", p)
    survivors = [ws / "data/survivors" / s.file for s in read_manifest(ws / "data/survivors")]
    ctx = quality.SourceContext([path for path, s in zip(survivors, read_manifest(ws / "data/survivors"))
                                 if s.split == "train"], ws / ".cache/download", params.seed)
    sides = []
    for specs in (params.classifier_positives, params.classifier_negatives):
        sample = quality.SeededSample(params.classifier_max_docs, params.seed)
        for spec in specs:
            for key, text in quality.read_source(quality.parse_source(spec), ctx):
                sample.offer(f"{spec}\0{key}", text or "", lambda _, t: quality.text_sample(t, OLD_DOC_CHARS))
        sides.append(sample.lines())
    model_dir = ws / "models/whole-document"
    model_dir.mkdir(parents=True)
    report = quality.train_classifier(params, *sides, model_dir)
    model = quality._fasttext().load_model(str(model_dir / report.model_file))
    tables = [pq.read_table(path, columns=["text", "source"]) for path in survivors]
    texts = [t or "" for table in tables for t in table["text"].to_pylist()]
    origin = np.array([s or "" for table in tables for s in table["source"].to_pylist()])
    words = np.array([len(t.split()) for t in texts])
    line_chars = np.array([quality.mean_line_chars(t) for t in texts])
    old = quality.hq_scores(model, [quality.text_sample(t, OLD_DOC_CHARS) for t in texts])
    stage = quality.Scorer(ws / "models/quality" / json.loads((ws / "models/quality/meta.json").read_text())["model"],
                           params.classifier_window_words, params.classifier_windows)
    new = stage.score_texts(texts)[0]
    by_source = {}
    for name in sorted(set(origin)):
        mask = origin == name
        by_source[name] = {"docs": int(mask.sum()), "spearman_length": _round(quality.spearman(new[mask], words[mask])),
                           "spearman_line_chars": _round(quality.spearman(new[mask], line_chars[mask]))}
    within = {}
    for stat in ("spearman_length", "spearman_line_chars"):
        pairs = [(v["docs"], v[stat]) for v in by_source.values() if v[stat] is not None]
        within[stat] = _round(sum(n * r for n, r in pairs) / sum(n for n, _ in pairs)) if pairs else None
    return {"within_sources": within, "by_source": by_source,
            "whole_document": {"holdout_docs": report.holdout_docs, "precision": _round(report.precision),
                               "recall": _round(report.recall),
                               "spearman_length": _round(quality.spearman(old, words)),
                               "spearman_line_chars": _round(quality.spearman(old, line_chars))}}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


if __name__ == "__main__":
    main()
