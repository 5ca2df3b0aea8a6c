"""report stage: one markdown page with PNG plots of everything the run produced, and what is missing.

    python stages/report.py --metrics-dir reports/metrics --curves reports/pretrain/plots/metrics \
        --base models/base --out reports/report --md reports/report.md --metrics reports/metrics/report.json

Reads params.yaml's `report` section (sample prompts, the time budget). Every input is optional: a stage
that has not run is listed under "missing stages" and its section says so, so the report of a half-run
workspace is still a report. Optional detail inputs: --core-tasks (core_eval's per-task details), --sft
(the SFT model folder), --dropped (the quality stage's audit sample), --dvc-lock (DVC's output hashes),
--ablation (the quality filters' downstream ablation results, daychat/data/filter_ablation.py; not a DVC
dependency, since `make ablate` writes it outside the pipeline: rerun the report after it), --benchmarks
(Snakemake's per-job benchmarks, default benchmarks/: job time and peak RSS in the budget table where current).
Writes, each as a whole: the PNGs in --out, the markdown at --md, and flat metrics (stages done/missing,
plots, budget used) at --metrics. Ends with where the report is and the headline numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from daychat.cli import run, status
from daychat.io import atomic_dir, write_metrics
from daychat.params import load_section
from daychat.report import ReportInputs, collect, render, sample_models

NAME = "report"


def main() -> None:
    args = parse_args()
    p = load_section(NAME)
    inputs = ReportInputs(
        metrics_dir=Path(args.metrics_dir), curves=_opt(args.curves), sft_curves=_opt(args.sft_curves), core_tasks=_opt(args.core_tasks),
        models={name: Path(path) for name, path in (("base", args.base), ("sft", args.sft)) if path},
        dropped=_opt(args.dropped), ablation=_opt(args.ablation), params_file=Path(args.params), dvc_yaml=Path(args.dvc_yaml),
        dvc_lock=_opt(args.dvc_lock), benchmarks=_opt(args.benchmarks))
    collected = collect(inputs)
    status(NAME, f"{len(collected.metrics)} stages ran, {len(collected.missing)} missing"
                 + (f" ({', '.join(collected.missing)})" if collected.missing else ""))
    samples = {}
    if collected.models and p.prompts:
        status(NAME, f"sampling {len(p.prompts)} prompts from {', '.join(collected.models)}")
        samples = sample_models(collected.models, p)

    out, md = Path(args.out), Path(args.md)
    # The PNGs are drawn into a temporary folder that replaces --out as a whole; the markdown links to --out.
    with atomic_dir(out) as tmp:
        summary = render(collected, samples, p, tmp, md, link_dir=out)
    write_metrics(args.metrics, summary)

    head = [f"val bpb {summary['val_bpb']:.4f}" if summary["val_bpb"] is not None else None,
            f"CORE {summary['core']:.4f}" if summary["core"] is not None else None,
            f"{summary['budget_used_h']:.2f} h of {p.budget_h:g} h budget ({summary['budget_share']:.1%})"
            if summary["budget_share"] is not None else None]
    status(NAME, "; ".join(h for h in head if h) or "no headline numbers yet")
    status(NAME, f"report: {md.resolve()} ({summary['plots']} plots in {out}/)")


def _opt(path: str | None) -> Path | None:
    return Path(path) if path else None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics-dir", required=True, help="folder of the stages' flat metrics (reports/metrics)")
    parser.add_argument("--curves", help="pretrain's dvclive folder of TSV curves (reports/pretrain/plots/metrics)")
    parser.add_argument("--sft-curves", help="sft's dvclive folder of TSV curves (reports/sft/plots/metrics)")
    parser.add_argument("--core-tasks", help="core_eval's per-task details (reports/core/tasks.json)")
    parser.add_argument("--base", help="base model folder to sample from (models/base)")
    parser.add_argument("--sft", help="SFT model folder to sample from (models/sft)")
    parser.add_argument("--dropped", help="the quality stage's audit sample (data/filtered/dropped.parquet)")
    parser.add_argument("--ablation", help="the quality filters' downstream ablation results (reports/ablate-filters/results.json), "
                                           "when they exist; without them each filter's effect reads \"not measured\"")
    parser.add_argument("--params", default="params.yaml", help="params file recorded in the header")
    parser.add_argument("--dvc-yaml", default="dvc.yaml", help="the pipeline, for the list of expected stages")
    parser.add_argument("--dvc-lock", help="DVC's lock file, to list its output hashes (current under dvc repro only)")
    parser.add_argument("--benchmarks", default="benchmarks",
                        help="Snakemake's benchmark of each stage (the Snakefile's benchmark:, <dir>/<stage>.tsv): wall "
                             "time and peak RSS in the budget table, when present and current")
    parser.add_argument("--out", required=True, help="folder of PNG plots to write (reports/report)")
    parser.add_argument("--md", required=True, help="markdown report to write (reports/report.md)")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write (reports/metrics/report.json)")
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
