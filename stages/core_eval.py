"""core_eval stage: the CORE metric of the base model, exactly as DCLM/nanochat compute it.

    python stages/core_eval.py --model models/base --cache .cache/eval_bundle --out reports/core --metrics reports/metrics/core.json

Reads params.yaml's `core_eval` section (the bundle source, max_per_task, batch size, device). Writes
reports/core/tasks.json (per task: accuracy, centered, n, shots, type, baseline, seconds; and the label)
and flat metrics: `core` (the public bundle in full) or `core_subset` (anything else: a local bundle, the
demo subset, or max_per_task > 0), `label` saying which, per task acc_<task>, centered_<task>, n_<task>,
and examples, examples_per_s, cropped (items cut to the model's positions: 0 with the real bundle, whose
longest prompts are scored uncropped as the reference scores them), longest_tokens, batch_tokens, seconds.
Prints a table of the tasks.

Memory: before the model is loaded, the CORE phase (the model's weights and a scoring batch) is checked
against the card (daychat.plan.preflight.scoring_batch) and the batch is sized by tokens from the memory
model (core_eval.batch_tokens 0) or checked as set.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from daychat.cli import run, status
from daychat.eval.bundle import label as bundle_label, load_bundle, resolve
from daychat.eval.core import evaluate_core, longest_prompt_bound
from daychat.io import atomic_dir, write_json, write_metrics
from daychat.model.gpt import ROTARY_HEADROOM
from daychat.params import load_section
from daychat.plan.memory import model_bytes
from daychat.plan.preflight import scoring_batch, summary
from daychat.provenance import reproducible
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import TOKENIZER_DIR, load_model_folder, read_model_config
from daychat.train.metrics import device_name, pick_device

NAME = "core_eval"


def main() -> None:
    t0 = time.perf_counter()
    args = parse_args()
    p = load_section(NAME)
    device = pick_device(p.device, "core_eval.device")
    root = resolve(p.source, args.cache, path=p.path, url=p.url, sha256=p.sha256, retries=p.retries, timeout_s=p.timeout_s)
    tasks = load_bundle(root)
    name = bundle_label(p.source, p.max_per_task)
    batch_tokens = preflight_memory(p, read_model_config(args.model), tasks, device)  # before the model loads
    model, _meta = load_model_folder(args.model, device)
    tokenizer = Tokenizer.load(Path(args.model) / TOKENIZER_DIR)
    status(NAME, f"{name}: {len(tasks)} tasks from {root}, max_per_task={p.max_per_task or 'all'}, on {device}, "
                 f"{batch_tokens:,} tokens a batch")
    print(f"{'task':<34} {'type':<18} {'shots':>5} {'n':>6} {'acc':>7} {'centered':>9} {'s':>6}", flush=True)

    def row(label: str, r: dict) -> None:
        print(f"{label:<34} {r['type']:<18} {r['shots']:>5} {r['n']:>6} {r['accuracy']:>7.4f} "
              f"{r['centered']:>9.4f} {r['seconds']:>6.1f}", flush=True)

    result = evaluate_core(model, tokenizer, tasks, p.max_per_task, device, batch_tokens,
                           max_seq_len=model.max_positions, on_task=row)
    longest = max(r["longest"] for r in result["tasks"].values())
    status(NAME, f"{name}: {result['core']:.4f} over {result['examples']:,} items "
                 f"({result['examples_per_s']:.1f} items/s); longest prompt {longest:,} tokens, scored uncropped"
                 + (f" except {result['cropped']} items cut to the model's {model.max_positions:,} positions"
                    if result["cropped"] else ""))

    full = p.source == "url" and p.max_per_task == 0
    with atomic_dir(args.out) as tmp:
        # the per-task seconds are in the metrics file only: an artifact carries no timings (same work, same bytes)
        write_json(tmp / "tasks.json", reproducible({"label": name, "core": result["core"], "source": p.source,
                                                     "bundle": str(root), "max_per_task": p.max_per_task,
                                                     "tasks": result["tasks"]}))
    metrics = {"core" if full else "core_subset": result["core"], "label": name}
    for task, r in result["tasks"].items():
        metrics.update({f"acc_{task}": r["accuracy"], f"centered_{task}": r["centered"], f"n_{task}": r["n"]})
    metrics.update(examples=result["examples"], examples_per_s=result["examples_per_s"], cropped=result["cropped"],
                   longest_tokens=longest, batch_tokens=batch_tokens, seconds=time.perf_counter() - t0)
    write_metrics(args.metrics, metrics)


def preflight_memory(p, config, tasks, device) -> int:
    """The scoring batch (tokens) for this card, after checking that the CORE phase fits it beside the
    model's weights: one line naming the knob if not, before anything is allocated."""
    longest = min(longest_prompt_bound(tasks, p.max_per_task), ROTARY_HEADROOM * config.sequence_len)
    tokens, phase = scoring_batch(NAME, "CORE scoring", config, device, memory_gib=p.memory_gib,
                                  margin=p.memory_margin, card=device_name(device), static=model_bytes(config),
                                  longest=longest, batch_tokens=p.batch_tokens, knob="core_eval.batch_tokens",
                                  fix="the model alone is too large for this card: evaluate it on a larger card, "
                                      "or set core_eval.device: cpu")
    status(NAME, summary([phase], device, memory_gib=p.memory_gib, card=device_name(device), section=NAME))
    return tokens


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (pretrain stage output)")
    parser.add_argument("--cache", required=True, help="folder for the downloaded / unpacked eval bundle")
    parser.add_argument("--out", required=True, help="folder to write tasks.json into")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
