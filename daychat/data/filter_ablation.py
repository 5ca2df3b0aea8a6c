"""The quality stage's downstream ablation: which data variants, which comparisons, and how to read the
results file the ablation harness writes.

Each filter earns its place only if tiny models trained on equal token budgets from the data it leaves
do better on the same held-out text than models trained without it (issue 18). Five variants, each an
override of the `quality` params section (everything else as the recipe has it):

    dedup_only            nothing after dedup: no language ID, no heuristics, no classifier
    heuristics            language ID + the heuristics, no classifier
    heuristics_score      the same + the combined heuristic score (`score` added to quality.heuristics)
    heuristics_classifier the recipe as it is
    random_drop           language ID + heuristics, then a seeded random drop of as many documents as the
                          classifier drops (classifier_keep: random; the same classifier_top_fraction)

    overrides("random_drop")   # ["quality.classifier_keep=random"]: `dvc exp run -S` arguments
    read_results(path)         # the harness's results, or None when there are none (yet)
    effects(results)           # {comparison: Effect} for the report

What the harness must do with them (issue 17's `make ablate`): train each variant with 3+ seeds at the same
token budget (variants that keep less text repeat it more), and score every model on the same text that
no variant trained on (the config's pretrain.eval_text), never a variant's own validation split (the
filters change it).

The results file (JSON; `make ablate-filters` writes the harness's list of runs, reports/ablate-filters/results.json):

    {"metric": "eval_bpb", "lower_is_better": true,
     "variants": {"dedup_only": {"values": [1.91, 1.92, 1.90]}, "heuristics": {"values": [...]}, ...}}

`values` are per seed, in seed order (the same seeds for every variant: differences are paired by seed).
A variant may carry `mean` and `ci95` instead of `values`; its differences then have no interval. The
file may also be the harness's own list of runs (issue 17's workflow/ablate.py writes
reports/<ablation>/results.json: one record per run with `variant`, `seed`, `scale`, `budget` and its
`metrics`): the short-budget runs of the scale with the most of these variants are read, by
HELDOUT_METRIC when every one of them has it, else by val_bpb.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daychat.sections import QualityParams

VARIANTS: dict[str, dict[str, Any]] = {
    "dedup_only": {"quality.lid": False, "quality.heuristics": [], "quality.strip_gutenberg": False,
                   "quality.classifier": False},
    "heuristics": {"quality.classifier": False},
    "heuristics_score": {"quality.classifier": False, "quality.heuristics": [*QualityParams().heuristics, "score"]},
    "heuristics_classifier": {},
    "random_drop": {"quality.classifier": True, "quality.classifier_keep": "random"},
}

# What each filter's effect is measured as: (with it, without it). The classifier is compared twice: with
# the heuristics alone (does it help at all?) and with a blind drop of the same size (does it help more
# than throwing away as much text at random, i.e. is it the choice of documents, not the smaller set?).
COMPARISONS: dict[str, tuple[str, str]] = {
    "language ID + heuristics": ("heuristics", "dedup_only"),
    "heuristic score": ("heuristics_score", "heuristics"),
    "classifier": ("heuristics_classifier", "heuristics"),
    "classifier vs a random drop of the same size": ("heuristics_classifier", "random_drop"),
}

# The comparison that measures each drop reason of the quality stage's metrics (dropped_<reason>).
CLASSIFIER_REASONS = ("classifier",)
SCORE_REASONS = ("score",)
FILTER_OF_REASON = "language ID + heuristics"  # every other reason: language ID, stripping and heuristics

# The held-out text every variant's models are scored on is the ablation config's `pretrain.eval_text`:
# never trained on by any variant, and not filtered by any of them (workflow/ablate-filters.yaml: the
# pages people labelled high quality among DCLM's 499 Common Crawl pages, bench/labelled.py).

DEFAULT_RESULTS = "reports/ablate-filters/results.json"
HELDOUT_METRIC = "heldout_bpb"  # the pretrain metric on a fixed held-out text (pretrain.eval_text, issue 17)


def overrides(variant: str) -> list[str]:
    """The variant as `dvc exp run -S` arguments (YAML values: false, [], random)."""
    return [f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"
            for key, value in VARIANTS[variant].items()]


@dataclass
class Effect:
    metric: str
    lower_is_better: bool
    diff: float  # with - without: below 0 is better when lower_is_better
    ci95: tuple[float, float] | None  # paired by seed, t interval; None without per-seed values
    seeds: int

    def helps(self) -> bool | None:
        """True/False when the interval excludes 0, None when it does not (or there is no interval)."""
        if self.ci95 is None or self.ci95[0] <= 0.0 <= self.ci95[1]:
            return None
        return (self.diff < 0) == self.lower_is_better

    def text(self) -> str:
        interval = f" [{self.ci95[0]:+.4f}, {self.ci95[1]:+.4f}]" if self.ci95 else ""
        verdict = {True: "helps", False: "hurts", None: "within noise"}[self.helps()]
        return f"{self.metric} {self.diff:+.4f}{interval} over {self.seeds} seeds: {verdict}"


def read_results(path: str | Path | None) -> dict | None:
    """The results in the format above (from either file layout), or None when the file does not exist
    or does not read as one of them."""
    if not path or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return None
    if isinstance(data, list):
        return _from_runs(data)
    return data if isinstance(data, dict) and isinstance(data.get("variants"), dict) else None


def _from_runs(runs: list) -> dict | None:
    """The format above from a list of run records (see the module docstring)."""
    # The harness names variants with '-' (they become git refs): heuristics-classifier is heuristics_classifier.
    runs = [{**r, "variant": str(r.get("variant", "")).replace("-", "_")} for r in runs if isinstance(r, dict)]
    runs = [r for r in runs if r["variant"] in VARIANTS and isinstance(r.get("metrics"), dict)
            and r.get("budget", "short") == "short"]
    if runs and runs[-1].get("code"):  # the harness appends: runs of older code (kept by it) are not these
        runs = [r for r in runs if r.get("code") == runs[-1]["code"]]
    by_scale: dict[Any, list[dict]] = {}
    for r in runs:
        by_scale.setdefault(r.get("scale"), []).append(r)
    if not by_scale:
        return None
    chosen = max(by_scale.values(), key=lambda rs: (len({r["variant"] for r in rs}), len(rs)))
    metric = HELDOUT_METRIC if all(HELDOUT_METRIC in r["metrics"] for r in chosen) else "val_bpb"
    values: dict[str, dict[Any, float]] = {}
    for r in chosen:
        if metric in r["metrics"]:
            values.setdefault(r["variant"], {})[r.get("seed")] = float(r["metrics"][metric])
    seeds = sorted(set.intersection(*(set(v) for v in values.values())), key=str) if values else []
    return {"metric": metric, "lower_is_better": True,
            "variants": {name: {"values": [v[s] for s in seeds]} for name, v in values.items()}}


def effects(results: dict | None) -> dict[str, Effect]:
    """Every comparison both of whose variants are in the results."""
    if not results:
        return {}
    metric = str(results.get("metric", "eval_bpb"))
    lower = bool(results.get("lower_is_better", True))
    variants = results["variants"]
    out = {}
    for name, (with_, without) in COMPARISONS.items():
        a, b = variants.get(with_), variants.get(without)
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue
        va, vb = a.get("values"), b.get("values")
        if isinstance(va, list) and isinstance(vb, list) and va and len(va) == len(vb):
            diffs = [float(x) - float(y) for x, y in zip(va, vb)]
            out[name] = Effect(metric, lower, sum(diffs) / len(diffs), _t_interval(diffs), len(diffs))
        elif "mean" in a and "mean" in b:
            out[name] = Effect(metric, lower, float(a["mean"]) - float(b["mean"]), None,
                               min(int(a.get("seeds", 0)), int(b.get("seeds", 0))))
    return out


def effect_of_reason(reason: str, measured: dict[str, Effect]) -> str:
    """The report's cell for one drop reason: its filter's downstream effect, or "not measured"."""
    name = ("classifier" if reason in CLASSIFIER_REASONS else "heuristic score" if reason in SCORE_REASONS
            else FILTER_OF_REASON)
    effect = measured.get(name)
    if effect is None:
        return "not measured"
    text = effect.text()
    if name == "classifier" and "classifier vs a random drop of the same size" in measured:
        text += f"; vs a random drop: {measured['classifier vs a random drop of the same size'].text()}"
    return text


# Student's t quantile for a two-sided 95% interval, by degrees of freedom (1-10; beyond: the normal's)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _t_interval(values: list[float]) -> tuple[float, float] | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    return mean - half, mean + half


if __name__ == "__main__":  # python -m daychat.data.filter_ablation: the variants as `dvc exp run` arguments
    for name in VARIANTS:
        print(f"{name:22s} {' '.join(f'-S {o}' for o in overrides(name)) or '(the recipe as it is)'}")
