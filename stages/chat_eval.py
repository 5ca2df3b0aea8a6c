"""chat_eval stage: ChatCORE of the SFT model (ARC-Easy, ARC-Challenge, MMLU by letter; GSM8K by generation).

    python stages/chat_eval.py --model models/sft --cache .cache/chat_eval --out reports/chat_eval --metrics reports/metrics/chat_eval.json

Reads params.yaml's `chat_eval` section (data source, tasks, max_items, seed, batch size, generation
settings, device). Writes reports/chat_eval/summary.json (label, score, per task: accuracy, centered,
baseline, n, skipped with reasons, seconds, items/s; the data files read), reports/chat_eval/<task>.jsonl
(one line per item: gold and predicted answer, correct; GSM8K with the reply), skipped.jsonl (the items left
out and why), and flat metrics: `chatcore` (the public test splits, every item, all four tasks) or
`chatcore_subset` (anything else), `label` saying which, per task acc_<task>, centered_<task>,
baseline_<task>, n_<task>, skipped_<task>, and items, choice_items_per_s, gsm8k_items_per_s, batch_tokens,
seconds.

Memory: before the model is loaded, letter scoring (the weights and a batch of prompts, sized by tokens:
chat_eval.batch_tokens, 0 = from the memory model) and GSM8K's generation (the weights, a KV cache for the
whole context, the prefill) are checked against the card (daychat.plan.preflight).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from daychat.cli import progress, run, status
from daychat.chat.format import render_prompt
from daychat.eval.chat import TASKS, choice_conversation, evaluate, label, load_tasks, resolve, select
from daychat.io import atomic_dir, write_json, write_metrics
from daychat.params import load_section
from daychat.plan.memory import generation_phase, model_bytes
from daychat.plan.preflight import check_phase, scoring_batch, summary
from daychat.provenance import reproducible
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import TOKENIZER_DIR, load_model_folder, read_model_config
from daychat.train.metrics import device_name, pick_device

NAME = "chat_eval"
# Vocabulary columns a letter-scoring batch reads at most: the union of its items' labels (A-J, 1-4).
LABEL_COLUMNS = 16


def main() -> None:
    t0 = time.perf_counter()
    args = parse_args()
    p = load_section(NAME)
    device = pick_device(p.device, "chat_eval.device")
    root = resolve(p.source, args.cache, path=p.path, url=p.url, tasks=p.tasks, retries=p.retries,
                   timeout_s=p.timeout_s)
    tasks = load_tasks(root, p.tasks)
    name = label(p.source, p.max_items, p.tasks)
    tokenizer = Tokenizer.load(Path(args.model) / TOKENIZER_DIR)
    batch_tokens = preflight_memory(p, read_model_config(args.model), tasks, tokenizer, device)  # before loading
    model, _meta = load_model_folder(args.model, device)
    generate = None
    if any(t.kind == "generate" for t in tasks):
        from daychat.chat.engine import Engine  # only GSM8K needs it

        generate = Engine(model, tokenizer).generate
    total = sum(len(select(t.items, p.max_items, p.seed)) for t in tasks)
    skipped = {t.name: t.skipped for t in tasks if t.skipped}
    status(NAME, f"{name}: {total:,} items of {', '.join(t.name for t in tasks)} from {root} on {device}"
                 + (f"; skipped bad items {skipped}" if skipped else ""))

    bar = progress(total=total, desc="chat_eval", unit="item")

    def row(task: str, r: dict) -> None:
        bar.write(f"{task:<14} n={r['n']:>6} acc={r['accuracy']:.4f} centered={r['centered']:+.4f} "
                  f"baseline={r['baseline']:.4f} skipped={r['skipped']} {r['items_per_s']:.1f} items/s")

    with bar:
        result = evaluate(tasks, model=model, tokenizer=tokenizer, generate=generate, max_items=p.max_items,
                          seed=p.seed, device=device, batch_tokens=batch_tokens,
                          max_seq_len=model.config.sequence_len, max_new_tokens=p.max_new_tokens,
                          temperature=p.temperature, top_k=p.top_k, tick=bar.update, on_task=row)
    status(NAME, f"{name}: {result['chatcore']:.4f}")

    full = p.source == "url" and p.max_items == 0 and set(p.tasks) == set(TASKS)
    with atomic_dir(args.out) as tmp:
        # the per-task speeds are in the metrics file only: an artifact carries no timings (same work, same bytes)
        write_json(tmp / "summary.json", reproducible({"label": name, "chatcore": result["chatcore"],
                                                       "source": p.source, "data": str(root),
                                                       "max_items": p.max_items, "seed": p.seed,
                                                       "tasks": result["tasks"]}))
        for task, items in result["results"].items():
            (tmp / f"{task}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items),
                                               encoding="utf-8")
        (tmp / "skipped.jsonl").write_text("".join(json.dumps({"task": t.name, **s}) + "\n"
                                                   for t in tasks for s in t.skipped_items), encoding="utf-8")

    metrics = {"chatcore" if full else "chatcore_subset": result["chatcore"], "label": name}
    for task, r in result["tasks"].items():
        metrics.update({f"acc_{task}": r["accuracy"], f"centered_{task}": r["centered"],
                        f"baseline_{task}": r["baseline"], f"n_{task}": r["n"], f"skipped_{task}": r["skipped"]})
    choice = [r for r in result["tasks"].values() if r["kind"] == "choice"]
    if choice:
        metrics["choice_items_per_s"] = sum(r["n"] for r in choice) / max(sum(r["seconds"] for r in choice), 1e-9)
    if "gsm8k" in result["tasks"]:
        metrics["gsm8k_items_per_s"] = result["tasks"]["gsm8k"]["items_per_s"]
    metrics.update(items=sum(r["n"] for r in result["tasks"].values()), batch_tokens=batch_tokens,
                   seconds=time.perf_counter() - t0)
    write_metrics(args.metrics, metrics)


def preflight_memory(p, config, tasks, tokenizer, device) -> int:
    """Check the letter-scoring and generation phases against the card before the model is loaded (one line
    naming the knob if one cannot fit) and return the letter-scoring batch in tokens."""
    card, static = device_name(device), model_bytes(config)
    choice = [item for t in tasks if t.kind == "choice" for item in select(t.items, p.max_items, p.seed)]
    longest = max((len(render_prompt(choice_conversation(item), tokenizer)) for item in choice), default=1)
    tokens, phase = scoring_batch(NAME, "letter scoring", config, device, memory_gib=p.memory_gib,
                                  margin=p.memory_margin, card=card, static=static,
                                  longest=min(longest, config.sequence_len), batch_tokens=p.batch_tokens,
                                  columns=LABEL_COLUMNS, knob="chat_eval.batch_tokens",
                                  fix="the model alone is too large for this card: evaluate it on a larger card, "
                                      "or set chat_eval.device: cpu")
    phases = [phase]
    if any(t.kind == "generate" for t in tasks):
        precision = "bf16" if device.type == "cuda" else "fp32"
        gen = generation_phase(config, config.sequence_len, static=static, precision=precision, device=device.type)
        check_phase(NAME, gen, device, memory_gib=p.memory_gib, margin=p.memory_margin, card=card,
                    fix="the model and its KV cache do not fit this card: set chat_eval.device: cpu, or drop "
                        "gsm8k from chat_eval.tasks")
        phases.append(gen)
    status(NAME, summary(phases, device, memory_gib=p.memory_gib, card=card, section=NAME))
    return tokens


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (sft stage output)")
    parser.add_argument("--cache", required=True, help="folder for downloaded / converted eval data")
    parser.add_argument("--out", required=True, help="folder to write summary.json and per-item results into")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
