"""probe stage (on demand): measured training speed and memory over a depth x seq_len x micro-batch grid.

    python stages/probe.py --out reports/probe.md --metrics reports/metrics/probe.json

Reads params.yaml's `probe` section. Every config trains a few steps on random tokens in a fresh process
(daychat.plan.probe); an out-of-memory config is recorded as OOM and the next one runs. Configs the memory
model puts far above the card (probe.skip_above x its memory) are not run and say so. Writes a markdown
table (reports/probe.md) and flat metrics: per config `<dD_TT_bB>/tok_per_s`, `step_s`, `mfu`,
`peak_mem_gib`, `estimate_gib`, `estimate_error`, `oom`, `tokens_<budget_h>h`, plus the fastest config.
"""

from __future__ import annotations

import argparse
import itertools

from daychat.cli import progress, run, status
from daychat.io import write_metrics, write_text
from daychat.model.gpt import GPTConfig
from daychat.params import load_section
from daychat.plan.memory import GiB, estimate_memory
from daychat.plan.preflight import available_bytes
from daychat.plan.probe import run_one
from daychat.train.metrics import device_name, pick_device

NAME = "probe"


def main() -> None:
    args = parse_args()
    p = load_section(NAME)
    device = pick_device(p.device, "probe.device")
    budget = available_bytes(device, p.memory_gib)
    precision = p.precision if p.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    grid = list(itertools.product(p.depths, p.seq_lens, p.device_batches))
    status(NAME, f"{len(grid)} configs on {device_name(device)}, {precision}"
                 + (" + compile" if p.compile and device.type == "cuda" else "")
                 + (" + activation checkpointing" if p.activation_checkpointing else "")
                 + (f"; memory {budget / GiB:.1f} GiB" if budget else "; memory unknown (CPU): nothing skipped"))

    rows = []
    for depth, seq_len, batch in progress(grid, desc="probe", unit="config"):
        key = f"d{depth}_T{seq_len}_b{batch}"
        config = GPTConfig(vocab_size=p.vocab_size, sequence_len=seq_len, depth=depth, aspect_ratio=p.aspect_ratio,
                           head_dim=p.head_dim)
        est = estimate_memory(config, batch, seq_len, precision=precision, compile=p.compile,
                              activation_checkpointing=p.activation_checkpointing, device=device.type)
        row = {"key": key, "depth": depth, "seq_len": seq_len, "device_batch": batch,
               "estimate_gib": est.allocated_bytes / GiB}
        if budget and p.skip_above and est.total_bytes > p.skip_above * budget:
            row.update(oom=True, skipped=True)
        else:
            spec = {"depth": depth, "seq_len": seq_len, "device_batch": batch, "accum": p.accum, "steps": p.steps,
                    "warmup_steps": p.warmup_steps, "vocab_size": p.vocab_size, "aspect_ratio": p.aspect_ratio,
                    "head_dim": p.head_dim, "device": device.type, "precision": p.precision, "compile": p.compile,
                    "activation_checkpointing": p.activation_checkpointing, "threads": p.threads}
            row.update(run_one(spec, p.timeout_s))
        if row.get("tok_per_s"):
            row["tokens_budget"] = row["tok_per_s"] * p.budget_h * 3600
        rows.append(row)
        status(NAME, describe(row))

    write_text(args.out, markdown(rows, p, device_name(device), precision))
    write_metrics(args.metrics, flat_metrics(rows, p.budget_h, device_name(device)))
    ran = [r for r in rows if r.get("tok_per_s")]
    if ran:
        best = max(ran, key=lambda r: r["tok_per_s"])
        status(NAME, f"fastest: {best['key']} at {best['tok_per_s']:,.0f} tok/s; table in {args.out}")


def describe(row: dict) -> str:
    if row.get("skipped"):
        return f"{row['key']}: skipped, estimated {row['estimate_gib']:.1f} GiB"
    if row.get("oom"):
        return f"{row['key']}: out of memory (estimated {row['estimate_gib']:.1f} GiB)"
    if row.get("error"):
        return f"{row['key']}: failed: {row['error']}"
    return (f"{row['key']}: {row['tok_per_s']:,.0f} tok/s, {row['step_s']:.3f} s/step, peak {row['peak_mem_gib']:.2f} GiB "
            f"(estimated {row['estimate_gib']:.2f}, {row['estimate_error']:+.0%})")


def markdown(rows: list[dict], p, device: str, precision: str) -> str:
    def num(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) and value is not None else "-"

    lines = ["# Probe: training throughput and peak memory", "",
             f"{device}, {precision}" + (", torch.compile" if p.compile and "CPU" not in device else "")
             + (", activation checkpointing" if p.activation_checkpointing else "")
             + f"; vocab {p.vocab_size}, aspect ratio {p.aspect_ratio}, head_dim {p.head_dim}; {p.accum} micro-batches "
             f"a step, {p.steps} timed steps after {p.warmup_steps} untimed. Estimates: daychat.plan.memory "
             f"(allocated bytes, without the CUDA context).", "",
             f"| depth | seq_len | micro-batch | tok/s | step s | MFU | peak GiB | estimate GiB | error | OOM "
             f"| tokens in {p.budget_h:g} h |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        oom = "skipped (estimate)" if r.get("skipped") else ("yes" if r.get("oom") else ("error" if r.get("error") else "no"))
        lines.append(f"| {r['depth']} | {r['seq_len']} | {r['device_batch']} | {num(r.get('tok_per_s'), ',.0f')} "
                     f"| {num(r.get('step_s'), '.3f')} | {num(r.get('mfu'), '.1%')} | {num(r.get('peak_mem_gib'), '.2f')} "
                     f"| {num(r.get('estimate_gib'), '.2f')} | {num(r.get('estimate_error'), '+.1%')} | {oom} "
                     f"| {num(r.get('tokens_budget'), '.3g')} |")
    return "\n".join(lines) + "\n"


def flat_metrics(rows: list[dict], budget_h: float, device: str) -> dict:
    metrics: dict = {"device": device, "configs": len(rows), "oom": sum(bool(r.get("oom")) for r in rows)}
    for r in rows:
        k = r["key"]
        metrics[f"{k}/oom"] = bool(r.get("oom"))
        metrics[f"{k}/estimate_gib"] = r["estimate_gib"]
        for name in ("tok_per_s", "step_s", "mfu", "peak_mem_gib", "estimate_error"):
            if r.get(name) is not None:
                metrics[f"{k}/{name}"] = r[name]
        if r.get("tokens_budget"):
            metrics[f"{k}/tokens_{budget_h:g}h"] = r["tokens_budget"]
    ran = [r for r in rows if r.get("tok_per_s")]
    if ran:
        best = max(ran, key=lambda r: r["tok_per_s"])
        metrics.update({"best/config": best["key"], "best/tok_per_s": best["tok_per_s"],
                        "best/peak_mem_gib": best["peak_mem_gib"], f"best/tokens_{budget_h:g}h": best["tokens_budget"]})
    return metrics


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown table to write")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
