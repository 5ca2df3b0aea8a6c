"""core_eval stage: the CORE metric of the base model, exactly as DCLM/nanochat compute it.

    python stages/core_eval.py --model models/base --cache .cache/eval_bundle --out reports/core --metrics reports/metrics/core.json

Reads params.yaml's `core_eval` section (the bundle source, max_per_task, batch size, device). Writes
reports/core/tasks.json (per task: accuracy, centered, n, shots, type, baseline, seconds; and the label)
and flat metrics: `core` (the public bundle in full) or `core_subset` (anything else: a local bundle, the
demo subset, or max_per_task > 0), `label` saying which, per task acc_<task>, centered_<task>, n_<task>,
and examples, examples_per_s, seconds. Prints a table of the tasks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from daychat.cli import run, status
from daychat.eval.bundle import label as bundle_label, load_bundle, resolve
from daychat.eval.core import evaluate_core, model_fn
from daychat.io import atomic_dir, write_json, write_metrics
from daychat.params import load_section
from daychat.provenance import reproducible
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import TOKENIZER_DIR, load_model_folder
from daychat.train.metrics import pick_device

NAME = "core_eval"


def main() -> None:
    t0 = time.perf_counter()
    args = parse_args()
    p = load_section(NAME)
    device = pick_device(p.device, "core_eval.device")
    root = resolve(p.source, args.cache, path=p.path, url=p.url, sha256=p.sha256, retries=p.retries, timeout_s=p.timeout_s)
    tasks = load_bundle(root)
    name = bundle_label(p.source, p.max_per_task)
    model, _meta = load_model_folder(args.model, device)
    tokenizer = Tokenizer.load(Path(args.model) / TOKENIZER_DIR)
    status(NAME, f"{name}: {len(tasks)} tasks from {root}, max_per_task={p.max_per_task or 'all'}, on {device}")
    print(f"{'task':<34} {'type':<18} {'shots':>5} {'n':>6} {'acc':>7} {'centered':>9} {'s':>6}", flush=True)

    def row(label: str, r: dict) -> None:
        print(f"{label:<34} {r['type']:<18} {r['shots']:>5} {r['n']:>6} {r['accuracy']:>7.4f} "
              f"{r['centered']:>9.4f} {r['seconds']:>6.1f}", flush=True)

    result = evaluate_core(model_fn(model), tokenizer, tasks, p.max_per_task, device, p.batch_size,
                           max_seq_len=model.config.sequence_len, on_task=row)
    status(NAME, f"{name}: {result['core']:.4f} over {result['examples']:,} items "
                 f"({result['examples_per_s']:.1f} items/s)")

    full = p.source == "url" and p.max_per_task == 0
    with atomic_dir(args.out) as tmp:
        # the per-task seconds are in the metrics file only: an artifact carries no timings (same work, same bytes)
        write_json(tmp / "tasks.json", reproducible({"label": name, "core": result["core"], "source": p.source,
                                                     "bundle": str(root), "max_per_task": p.max_per_task,
                                                     "tasks": result["tasks"]}))
    metrics = {"core" if full else "core_subset": result["core"], "label": name}
    for task, r in result["tasks"].items():
        metrics.update({f"acc_{task}": r["accuracy"], f"centered_{task}": r["centered"], f"n_{task}": r["n"]})
    metrics.update(examples=result["examples"], examples_per_s=result["examples_per_s"],
                   seconds=time.perf_counter() - t0)
    write_metrics(args.metrics, metrics)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (pretrain stage output)")
    parser.add_argument("--cache", required=True, help="folder for the downloaded / unpacked eval bundle")
    parser.add_argument("--out", required=True, help="folder to write tasks.json into")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
