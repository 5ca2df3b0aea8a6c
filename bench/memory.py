"""The memory model against measured peaks: `python -m bench.memory [--quick | --scoring]`, into
reports/bench/memory.json. Training steps (GRID) and the evaluation phases (SCORING: CORE scoring, val bpb,
letter scoring, generation; `--scoring` runs only these).

Each config of GRID runs real training steps (the GPT, build_optimizers' AdamW + Muon, gradient
accumulation over 2 micro-batches, 2 optimizer steps so the optimizer state exists during the second
step's forward and backward) in a fresh process, and its measured peak is compared with
daychat.plan.memory.estimate_memory.

How the peak is measured on a CPU (torch has no max_memory_allocated there): the kernel's resident-set
high-water mark VmHWM (/proc/self/status), reset with `echo 5 > /proc/self/clear_refs` after imports and
a tiny warm-up step (so libraries, kernels and thread pools are in the baseline), minus the RSS at that
moment. For RSS to follow live tensor bytes, the child runs with MALLOC_MMAP_THRESHOLD_=65536: glibc then
serves every block of 64 KiB or more with its own mmap and unmaps it on free, instead of keeping freed
memory in its arenas (which would make the high-water mark depend on reuse order). One thread: no
per-thread scratch. Linux only. On CUDA the probe stage compares with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from bench import record

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench" / "memory.json"

# name: GPTConfig fields + rows, seq_len. Tiny to small, chosen so each peak is 50 MB - 1 GB (process
# noise is a few MB) and so that different terms dominate: wide vocab (logits), deep (activations),
# wide model (weights and optimizer), value embeddings on/off, softcap, smear and backout off, bf16
# embeddings (their weights, gradients and Adam state at 2 bytes), activation checkpointing.
GRID = {
    "d2-v8k": dict(depth=2, aspect_ratio=64, head_dim=64, vocab_size=8192, rows=4, seq_len=256),
    "d4-v4k-T512": dict(depth=4, aspect_ratio=32, head_dim=32, vocab_size=4096, rows=8, seq_len=512),
    "d6-v16k": dict(depth=6, aspect_ratio=64, head_dim=64, vocab_size=16384, rows=2, seq_len=512),
    "d8-v2k-deep": dict(depth=8, aspect_ratio=64, head_dim=64, vocab_size=2048, rows=4, seq_len=512),
    "d12-v1k-wide": dict(depth=12, aspect_ratio=64, head_dim=64, vocab_size=1024, rows=2, seq_len=256),
    "d4-v32k": dict(depth=4, aspect_ratio=64, head_dim=64, vocab_size=32768, rows=2, seq_len=256),
    "d6-noVE-nocap": dict(depth=6, aspect_ratio=64, head_dim=64, vocab_size=8192, rows=4, seq_len=512,
                          value_embeds=False, softcap=0.0, smear=False, backout=False),
    "d4-v32k-bf16emb": dict(depth=4, aspect_ratio=64, head_dim=64, vocab_size=32768, rows=2, seq_len=256,
                            embedding_dtype="bf16"),
    "d8-ckpt": dict(depth=8, aspect_ratio=64, head_dim=64, vocab_size=2048, rows=4, seq_len=512,
                    activation_checkpointing=True),
}
QUICK = ("d2-v8k", "d8-v2k-deep")  # what tests/test_memory.py measures live
STEPS, ACCUM = 2, 2

# Evaluation phases (daychat.plan.rehearse jobs, the code the stages run), at vocab 32,768 and rows of 2,048
# tokens: CORE-style scoring of more and more items under one token budget (8 rows a batch) (the peak must stay flat: the
# budget, not the item count, sets it; full-vocabulary fp32 logits for the same batches would need
# ~3 x rows x 2048 x 32768 x 4 bytes), the val bpb / SFT validation pass, letter scoring and generation.
_SCORE = dict(depth=2, aspect_ratio=256, head_dim=64, vocab_size=32768, sequence_len=2048)
SCORING = {
    "core-8-items": dict(kind="score", config=_SCORE, tokens=16384, width=2048, items=8),
    "core-32-items": dict(kind="score", config=_SCORE, tokens=16384, width=2048, items=32),
    "core-128-items": dict(kind="score", config=_SCORE, tokens=16384, width=2048, items=128),
    "val-4x2048": dict(kind="val", config=_SCORE, rows=4, seq_len=2048),
    "letters-32k": dict(kind="letters", config=_SCORE, tokens=32768, width=1024),
    "generate-2k": dict(kind="generate", config=dict(_SCORE, depth=4), prompt=1792, new_tokens=256),
    "core-d6-wide": dict(kind="score", config=dict(_SCORE, depth=6, aspect_ratio=128, vocab_size=8192),
                         tokens=32768, width=1024),
}
FLAT = ("core-8-items", "core-32-items", "core-128-items")  # the same budget: 1, 4 and 16 batches


def _rss_kib() -> tuple[int, int]:
    """(current RSS, high-water mark) of this process in KiB."""
    status = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmRSS:\s+(\d+)", status).group(1)), int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))


def _train(spec: dict, steps: int, accum: int) -> None:
    import torch

    from daychat.model import GPT, GPTConfig
    from daychat.optim import build_optimizers
    from daychat.train.loop import accumulate_gradients

    spec = dict(spec)
    rows, seq_len = spec.pop("rows"), spec.pop("seq_len")
    ckpt = spec.pop("activation_checkpointing", False)
    config = GPTConfig(sequence_len=seq_len, **spec)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.activation_checkpointing = ckpt
    model.train()
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5,
                                  weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (accum, rows, seq_len + 1), generator=g)
    for _ in range(steps):
        batches = iter([(t[:, :-1], t[:, 1:]) for t in tokens])
        accumulate_gradients(model, batches, accum)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def measure_one(spec: dict) -> dict:
    """In this (fresh) process: warm up on a tiny config, reset the high-water mark, train `spec`."""
    import torch

    torch.set_num_threads(1)
    _train(dict(depth=1, aspect_ratio=32, head_dim=32, vocab_size=256, rows=1, seq_len=32), 2, 2)
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base, _ = _rss_kib()
    _train(spec, STEPS, ACCUM)
    _, peak = _rss_kib()
    return {"measured_bytes": (peak - base) * 1024, "baseline_bytes": base * 1024}


def measure(spec: dict) -> dict:
    """Measure one config in a fresh subprocess (see the module docstring)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--one", json.dumps(spec)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {spec} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate(spec: dict):
    from daychat.model import GPTConfig
    from daychat.plan.memory import estimate_memory

    spec = dict(spec)
    rows, seq_len = spec.pop("rows"), spec.pop("seq_len")
    ckpt = spec.pop("activation_checkpointing", False)
    config = GPTConfig(sequence_len=seq_len, **spec)
    return estimate_memory(config, rows, seq_len, precision="fp32", compile=False, activation_checkpointing=ckpt,
                           device="cpu")


def compare(name: str, spec: dict, measured: int | None = None) -> dict:
    measured = measure(spec)["measured_bytes"] if measured is None else measured
    est = estimate(spec)
    return {"config": spec, "measured_bytes": measured, "measured_mib": measured / 2 ** 20,
            "estimated_mib": est.total_bytes / 2 ** 20,
            "error": est.total_bytes / measured - 1, "phase": est.phase,
            "breakdown_mib": {k: v / 2 ** 20 for k, v in est.breakdown.items()}}


def compare_scoring(name: str, spec: dict) -> dict:
    """One evaluation job (daychat.plan.rehearse) measured in a fresh process, against its CPU estimate."""
    from daychat.plan.memory import GiB
    from daychat.plan.rehearse import Job, _run, cpu_estimate

    job = Job(stage="bench", phases=[name], device="cpu", threads=1, precision="fp32", compile=False, **spec)
    measured = _run(job, timeout_s=1800)
    if "error" in measured:
        raise RuntimeError(f"measuring {name} failed: {measured['error']}")
    est = cpu_estimate(job)[0]
    peak = measured[name]["peak_bytes"]
    # what the scoring before daychat.eval.scoring held for the same items: batches of up to 32 sequences,
    # their full-vocabulary fp32 logits, softcap and log-softmax (~3 x rows x T x V x 4 bytes)
    full_logits = 3 * min(job.items or 32, 32) * job.width * job.config["vocab_size"] * 4
    return {"config": spec, "measured_bytes": peak, "measured_mib": peak / 2 ** 20,
            "estimated_mib": est.total_bytes / 2 ** 20, "error": est.total_bytes / peak - 1, "phase": est.name,
            "seconds": measured[name]["seconds"], "full_logits_gib": full_logits / GiB if job.kind == "score" else None,
            "breakdown_mib": {k: v / 2 ** 20 for k, v in {**est.static, **est.dynamic}.items()}}


def table(results: dict[str, dict]) -> str:
    rows = ["| config | measured MiB | estimated MiB | error | peak phase |", "|---|---:|---:|---:|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['measured_mib']:.1f} | {r['estimated_mib']:.1f} | {r['error']:+.1%} | {r['phase']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"configs (default: all of {', '.join(GRID)})")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--reestimate", action="store_true",
                        help=f"keep the measurements in {OUT.name}, recompute the estimates (after a model change)")
    parser.add_argument("--scoring", action="store_true", help=f"the evaluation phases ({', '.join(SCORING)}) only")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one JSON spec in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return
    if args.scoring or not (args.names or args.quick or args.reestimate):
        scoring = {}
        for name, spec in SCORING.items():
            scoring[name] = r = compare_scoring(name, spec)
            print(f"{name}: measured {r['measured_mib']:.1f} MiB, estimated {r['estimated_mib']:.1f} MiB "
                  f"({r['error']:+.1%}, {r['seconds']:.1f} s)", flush=True)
        peaks = [scoring[n]["measured_mib"] for n in FLAT]
        record(OUT, {f"cpu/scoring/{name}": r for name, r in scoring.items()})
        record(OUT, {"cpu/scoring/summary": {
            "configs": len(scoring), "max_abs_error": max(abs(r["error"]) for r in scoring.values()),
            "table": table(scoring), "flat_items": list(FLAT), "flat_peaks_mib": peaks,
            "flat_spread": max(peaks) / min(peaks) - 1,
            "method": "daychat.plan.rehearse jobs in fresh processes: VmHWM - RSS before the model, "
                      "MALLOC_MMAP_THRESHOLD_=65536, 1 thread, fp32 eager"}})
        print(table(scoring))
        print(f"CORE scoring under one 16,384-token budget: {', '.join(f'{p:.0f}' for p in peaks)} MiB for "
              f"{', '.join(n.split('-')[1] for n in FLAT)} items")
        if args.scoring:
            return
    names = args.names or (list(QUICK) if args.quick else list(GRID))
    recorded = json.loads(OUT.read_text()) if args.reestimate else {}
    results = {}
    for name in names:
        old = recorded.get(f"cpu/{name}")
        if args.reestimate and not old:
            continue
        measured = round(old["measured_mib"] * 2 ** 20) if old else None
        results[name] = compare(name, old["config"] if old else GRID[name], measured)
        r = results[name]
        print(f"{name}: measured {r['measured_mib']:.1f} MiB, estimated {r['estimated_mib']:.1f} MiB "
              f"({r['error']:+.1%}, {r['phase']})", flush=True)
    print(table(results))
    worst = max(abs(r["error"]) for r in results.values())
    record(OUT, {f"cpu/{name}": r for name, r in results.items()})
    record(OUT, {"cpu/summary": {"configs": len(results), "max_abs_error": worst, "table": table(results),
                                 "method": "VmHWM - RSS after warm-up, MALLOC_MMAP_THRESHOLD_=65536, 1 thread, "
                                           f"fp32 eager, {STEPS} steps x {ACCUM} micro-batches"}})


if __name__ == "__main__":
    main()
