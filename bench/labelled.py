"""The quality stage's filters against people's judgement: `python -m bench.labelled`.

The pages: DCLM's 499 Common Crawl pages, each labelled high (1) or low (0) quality by the majority of
its annotators (272 high, 227 low; mlfoundations/dclm, data/majority_data.jsonl, MIT licence; the DCLM
paper, arXiv:2406.11794, describes the labelling). They are not in ../shared: the first run downloads
them from GitHub at a pinned commit into .cache/labelled/ (git-ignored) and checks their sha256; on a
machine without GitHub, `python -m bench.labelled --pages PATH` copies them from a local copy (checked
the same way), e.g. one taken from a clone of the DCLM repository.

What it measures, every figure on the same pages:
- the quality stage's filters with params.yaml's thresholds, switched on (boilerplate stripping, length,
  language ID, the Gopher/C4 heuristics; params.yaml has them off): the share of pages it drops, how many of its drops people called low
  quality (precision), the share of high-quality pages it drops and of low-quality pages it catches, per
  drop reason; and what line stripping did (pages stripped, characters removed, by label);
- each heuristic statistic (daychat/data/heuristics.py STATISTICS) as a ranking: ROC AUC against the
  labels (0.5 = no signal; below 0.5, lower values are the high-quality side);
- the combined score fitted on these labels (bench.heuristics's sign-constrained logistic fit): AUC on
  pages it was not fitted on (two folds by a hash of the page, each scored by the fit on the other) and
  what a cut-off chosen on the other fold drops; the weights, bias and cut-off fitted on all pages are
  printed as params.yaml keys (params.yaml has them: its `score_params` figures are then in-sample);
- with `--constructed`, the score as bench.heuristics fits it on constructed junk pages (params.yaml's
  before these labels), on these pages: the reason params.yaml's weights come from here;
- word count alone, the baseline every ranking should beat;
- with `--classifier`, the quality classifier as bench.quality trains it offline (AlpacaEval answers
  against the mixed corpus, 50-word windows): its AUC on the pages and the Spearman of its score with
  their length. (The real recipe's classifier trains on sources this machine cannot download.)

These labels say whether a filter agrees with people, not whether it trains a better model: DCLM found
agreement with them a weak guide to which filter helps downstream. The downstream measurement is the
filter ablation (`make ablate-filters-web` scores its models on the high-quality pages).
Results: reports/bench/labelled.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from bench import quality_filters_on, record
from bench.heuristics import SIGNS, round4, auc, cut_off, fit_logistic, score_rows, statistics_rows
from daychat.data.heuristics import STATISTICS
from daychat.data.quality import DocumentFilter, Tally, _unit_hash, spearman
from daychat.errors import UserError
from daychat.io import write_text
from daychat.params import parse_section

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench" / "labelled.json"
COMMIT = "361714bdd60bb9b7f4b2d8354cebbf0dec0c329e"
PAGES_URL = f"https://raw.githubusercontent.com/mlfoundations/dclm/{COMMIT}/data/majority_data.jsonl"
PAGES_SHA256 = "edd55bddc5bd4786b3cc07db4813bf99b79726a3759e8b6ac550e2e692b66ce7"
CACHE = ROOT / ".cache" / "labelled" / "majority_data.jsonl"
HIGH_DROP_BUDGET = 0.05  # a score's cut-off may drop at most 5% of the high-quality pages it was fitted on
SEED = 0


# ----------------------------------------------------------------------------------------------------
# The pages


def pages_file(copy_from: str | Path | None = None, cache: Path = CACHE) -> Path:
    """The labelled pages, verified: from the cache, else copied from `copy_from`, else downloaded."""
    if cache.is_file() and _sha256(cache.read_bytes()) == PAGES_SHA256:
        return cache
    where = str(copy_from) if copy_from else PAGES_URL
    try:
        if copy_from:
            data = Path(copy_from).read_bytes()
        else:
            with urllib.request.urlopen(PAGES_URL, timeout=60) as response:
                data = response.read()
    except OSError as exc:
        hint = "" if copy_from else ("; without GitHub, pass a copy of DCLM's data/majority_data.jsonl: --pages PATH "
                                     "(make: PAGES=PATH)")
        raise UserError(f"cannot read the labelled pages from {where}: {exc}{hint}") from None
    if _sha256(data) != PAGES_SHA256:
        raise UserError(f"{where} is not DCLM's data/majority_data.jsonl at commit {COMMIT[:7]} "
                        f"(sha256 {_sha256(data)[:12]}..., expected {PAGES_SHA256[:12]}...)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text(cache, data.decode("utf-8"))
    return cache


def read_pages(path: Path) -> list[tuple[str, int]]:
    """(text, label) per page; label 1 = high quality."""
    pages = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row.get("text"), str) or row.get("label") not in (0, 1):
                raise UserError(f"{path}:{n}: expected {{\"text\": str, \"label\": 0 or 1}}")
            pages.append((row["text"], int(row["label"])))
    return pages


def write_split(pages: list[tuple[str, int]], label: int, path: Path) -> int:
    """The pages with `label` as a jsonl of {"text": ...} (a held-out text for pretrain.eval_text); how many."""
    chosen = [text for text, lab in pages if lab == label]
    write_text(path, "".join(json.dumps({"text": text}) + "\n" for text in chosen))
    return len(chosen)


# ----------------------------------------------------------------------------------------------------
# Measures


def filter_agreement(pages: list[tuple[str, int]], p) -> tuple[dict, list[str]]:
    """The quality stage's per-document part (strip, length, language ID, heuristics) on every page, against
    the labels; and each page's text as the stage would keep it (stripped), for the statistics."""
    judge = DocumentFilter(p)
    labels = np.array([label for _, label in pages])
    reasons, kept_texts, stripped = [], [], Counter()
    stripped_chars = Counter()
    for text, label in pages:
        tally = Tally()
        kept, drop = judge.judge(text, tally)
        reasons.append(drop.reason if drop else "")
        kept_texts.append(kept if drop is None or drop.reason != "boilerplate" else text)
        stripped[label] += tally.stripped_docs
        stripped_chars[label] += tally.stripped_chars
    dropped = np.array([bool(r) for r in reasons])
    by_reason = {}
    for reason in sorted(set(reasons) - {""}):
        mask = np.array([r == reason for r in reasons])
        by_reason[reason] = {"high": int((mask & (labels == 1)).sum()), "low": int((mask & (labels == 0)).sum())}
    chars = {label: sum(len(t) for t, lab in pages if lab == label) for label in (0, 1)}
    return {
        **drop_figures(dropped, labels),
        "by_reason": by_reason,
        "stripping": {"high_pages_stripped": stripped[1], "low_pages_stripped": stripped[0],
                      "high_chars_stripped": round4(stripped_chars[1] / max(chars[1], 1)),
                      "low_chars_stripped": round4(stripped_chars[0] / max(chars[0], 1))},
    }, kept_texts


def drop_figures(dropped: np.ndarray, labels: np.ndarray) -> dict:
    """What dropping `dropped` does against the labels."""
    n_drop = int(dropped.sum())
    return {"dropped": round4(dropped.mean()),
            "precision": round4((dropped & (labels == 0)).sum() / n_drop) if n_drop else None,
            "high_dropped": round4(dropped[labels == 1].mean()), "low_caught": round4(dropped[labels == 0].mean())}


def score_agreement(stats: np.ndarray, labels: np.ndarray, weights: dict[str, float], bias: float,
                    min_score: float) -> dict:
    scores = score_rows(stats, weights, bias)
    return {"auc": round4(auc(scores, labels)), "min_score": min_score, **drop_figures(scores < min_score, labels)}


def fitted_score(stats: np.ndarray, labels: np.ndarray, keys: list[str]) -> dict:
    """The sign-constrained logistic score fitted on these labels: out-of-fold AUC and drops (two folds by a
    hash of the page; each fold's cut-off drops at most HIGH_DROP_BUDGET of its fitting half's high pages),
    and the weights, bias and cut-off fitted on every page."""
    used = [STATISTICS.index(name) for name in SIGNS]
    fold = np.array([_unit_hash(key, SEED) < 0.5 for key in keys])
    scores = np.zeros(len(labels))
    dropped = np.zeros(len(labels), bool)
    for held in (fold, ~fold):
        fit = ~held
        weights, bias = fit_logistic(stats[fit][:, used], labels[fit], list(SIGNS.values()))
        named = dict(zip(SIGNS, weights.values()))
        s = score_rows(stats, named, bias)
        scores[held] = s[held]
        dropped[held] = s[held] < cut_off(s[fit & (labels == 1)], HIGH_DROP_BUDGET)
    weights, bias = fit_logistic(stats[:, used], labels, list(SIGNS.values()))
    named = dict(zip(SIGNS, weights.values()))
    everywhere = score_rows(stats, named, bias)
    return {"auc_out_of_fold": round4(auc(scores, labels)), **{f"{k}_out_of_fold": v for k, v in drop_figures(dropped, labels).items()},
            "weights": {k: round(v, 4) for k, v in named.items()}, "bias": round(bias, 4),
            "min_score": cut_off(everywhere[labels == 1], HIGH_DROP_BUDGET)}


def classifier_agreement(pages: list[tuple[str, int]]) -> dict:
    """bench.quality's offline classifier (trained on the mixed corpus by the quality stage) on the pages."""
    from bench.data import link_dataset
    from bench.quality import OFFLINE_CLASSIFIER, SHARED, WORKERS, run_stage
    from daychat.data import quality

    recipe = quality_filters_on(yaml.safe_load((ROOT / "params.yaml").read_text())["quality"])
    p = {**recipe, **OFFLINE_CLASSIFIER, "classifier": True, "workers": WORKERS}
    with tempfile.TemporaryDirectory(prefix="bench-labelled-") as tmp:
        ws = Path(tmp)
        link_dataset(sorted((SHARED / "corpus/mixed").resolve().glob("*.parquet")), ws / "data/dedup")
        stage = run_stage(ws, p)
        params = parse_section("quality", p)
        meta = json.loads((ws / "models/quality/meta.json").read_text())
        scorer = quality.Scorer(ws / "models/quality" / meta["model"], params.classifier_window_words, params.classifier_windows)
        scores = scorer.score_texts([text for text, _ in pages])[0]
    labels = np.array([label for _, label in pages])
    words = np.array([len(text.split()) for text, _ in pages])
    return {"trained_on": "AlpacaEval answers (positives) against the mixed corpus (negatives), by the quality stage",
            "holdout_precision": stage["classifier"]["precision"], "holdout_recall": stage["classifier"]["recall"],
            "auc": round4(auc(scores, labels)), "spearman_length": round4(spearman(scores, words))}


# ----------------------------------------------------------------------------------------------------


def measure(pages: list[tuple[str, int]], recipe: dict, *, constructed: bool = False, classifier: bool = False) -> dict:
    p = parse_section("quality", quality_filters_on(recipe))
    labels = np.array([label for _, label in pages])
    keys = [hashlib.sha1(text.encode()).hexdigest() for text, _ in pages]
    filters, kept_texts = filter_agreement(pages, p)
    stats = statistics_rows(kept_texts)
    words = np.array([len(text.split()) for text in kept_texts])
    results = {
        "pages": {"high": int(labels.sum()), "low": int((1 - labels).sum()), "source": PAGES_URL},
        "filters": filters,
        "statistics_auc": {name: round4(auc(stats[:, i], labels)) for i, name in enumerate(STATISTICS)},
        "word_count_auc": round4(auc(words.astype(np.float64), labels)),
        "score_params": score_agreement(stats, labels, p.score_weights, p.score_bias, p.min_score),
        "score_fitted_here": fitted_score(stats, labels, keys),
    }
    if constructed:
        from bench.heuristics import constructed_documents, constructed_fit

        fit = constructed_fit(p, constructed_documents())["score"]
        results["score_constructed"] = score_agreement(stats, labels, fit["weights"], fit["bias"], fit["min_score"])
    if classifier:
        results["classifier"] = classifier_agreement(pages)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.labelled", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", help="a local copy of DCLM's data/majority_data.jsonl (checked by sha256)")
    parser.add_argument("--constructed", action="store_true", help="also fit bench.heuristics's score on constructed junk (~1 min)")
    parser.add_argument("--classifier", action="store_true", help="also train and measure the offline classifier (~3 min)")
    parser.add_argument("--write-high", type=Path, metavar="PATH",
                        help="write the high-quality pages as a jsonl held-out text to PATH, and stop")
    args = parser.parse_args(argv)
    try:
        pages = read_pages(pages_file(args.pages))
    except UserError as exc:
        sys.exit(f"error: {exc}")
    if args.write_high:
        n = write_split(pages, 1, args.write_high)
        print(f"{n} high-quality pages -> {args.write_high}")
        return
    recipe = yaml.safe_load((ROOT / "params.yaml").read_text())["quality"]
    results = measure(pages, recipe, constructed=args.constructed, classifier=args.classifier)
    record(OUT, {"labelled": results})
    print(json.dumps(results, indent=2))
    fitted = results["score_fitted_here"]
    print("\n# the score fitted on the labelled pages, as params.yaml's quality keys:")
    print(yaml.safe_dump({"score_weights": {k: v for k, v in fitted["weights"].items() if v}, "score_bias": fitted["bias"],
                          "min_score": fitted["min_score"]}, sort_keys=False, default_flow_style=None))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


if __name__ == "__main__":
    main()
