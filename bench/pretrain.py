"""Pretraining throughput: `python -m bench.pretrain [NAME ...]`, results merged into reports/bench/pretrain.json.

For each named config, full training steps (forward + backward of every micro-batch, then the Muon + AdamW
step) are timed on random tokens, through the same Trainer.train_step the pretrain stage runs, on the
device that is present:

- CPU (default `tiny`, the demo recipe's model): fp32, no compile; MFU against this CPU's measured fp32
  matmul rate (daychat.train.metrics.peak_flops); peak memory = the process's peak RSS.
- CUDA (default `recipe d12 d20`): bf16 autocast + torch.compile, MFU against the card's dense bf16 peak,
  peak memory = torch.cuda.max_memory_allocated. `recipe` is params.yaml's pretrain model at its longest
  seq_len, device_batch rows and real gradient accumulation.

Each config runs in a process of its own, so that its peak memory is its own. Reference points (issue 4):
nanochat's d20 on a 4090 ~38k tok/s; nanochat on 8xH100 ~50-60% MFU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import record

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench" / "pretrain.json"

# name: model shape, vocab, row length, rows per micro-batch, micro-batches per step
CONFIGS = {
    "tiny": dict(depth=4, aspect_ratio=32, head_dim=32, vocab_size=4096, seq_len=512, rows=16, accum=1),
    "ci": dict(depth=2, aspect_ratio=32, head_dim=32, vocab_size=512, seq_len=1024, rows=2, accum=1),
    "d12": dict(depth=12, aspect_ratio=64, head_dim=128, vocab_size=32768, seq_len=2048, rows=8, accum=4),
    "d20": dict(depth=20, aspect_ratio=64, head_dim=128, vocab_size=32768, seq_len=2048, rows=4, accum=8),
}
WARMUP_STEPS = 2  # compile and autotune, allocator warm-up: not timed


def recipe_config(device_type: str = "cuda") -> tuple[dict, object]:
    """params.yaml's pretrain model at its longest seq_len, as the stage would run it: the bench's spec (rows,
    accumulation, learning rates) and the GPTConfig, built where the stage builds it (PretrainParams.model_config,
    so every switch of the recipe is in the timed model)."""
    from daychat.params import load_section
    from daychat.train.schedule import plan_batch

    p = load_section("pretrain", ROOT / "params.yaml")
    plan = plan_batch(p.total_batch, p.device_batch, [t for _, t in p.curriculum()])
    tokenizer = load_section("tokenizer", ROOT / "params.yaml")
    config = p.model_config(tokenizer.vocab_size, plan.max_seq_len, device_type)
    spec = dict(depth=p.depth, aspect_ratio=p.aspect_ratio, head_dim=p.head_dim, vocab_size=tokenizer.vocab_size,
                seq_len=plan.max_seq_len, rows=p.device_batch, accum=plan.accum_steps(plan.max_seq_len),
                n_kv_head=p.n_kv_head or None, window_pattern=p.window_pattern, short_window=p.short_window,
                matrix_lr=p.matrix_lr, embedding_lr=p.embedding_lr, unembedding_lr=p.unembedding_lr,
                scalar_lr=p.scalar_lr, weight_decay=p.weight_decay)
    return spec, config


def measure(name: str, steps: int) -> dict:
    """Time `steps` training steps of config `name` on this process's device."""
    import torch

    from daychat.model import GPT, GPTConfig
    from daychat.optim import build_optimizers
    from daychat.plan.probe import RandomBatches
    from daychat.train.loop import LoopSettings, Trainer
    from daychat.train.metrics import device_name, peak_flops, peak_memory_gib
    from daychat.train.schedule import BatchPlan, Horizon, Schedule

    base, _, variant = name.partition("+")  # "recipe+fp8": the recipe's model with FP8 block matmuls
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec, config = recipe_config(device.type) if base == "recipe" else (dict(CONFIGS[base]), None)
    rows, seq_len, accum = spec.pop("rows"), spec.pop("seq_len"), spec.pop("accum")
    lrs = {key: spec.pop(key) for key in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay")
           if key in spec}
    torch.manual_seed(0)
    config = config or GPTConfig(sequence_len=seq_len, **spec)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if variant == "fp8":
        from daychat.model.fp8 import convert_to_fp8

        convert_to_fp8(model)
    optimizers = build_optimizers(model, **{"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.004,
                                            "scalar_lr": 0.5, "weight_decay": 0.0, **lrs})
    plan = BatchPlan(total_batch=rows * seq_len * accum, device_batch=rows, max_seq_len=seq_len)
    schedule = Schedule(Horizon("tokens", tokens=plan.total_batch * (steps + WARMUP_STEPS)), curriculum=((0.0, seq_len),))
    trainer = Trainer(model, optimizers, RandomBatches(config.vocab_size, device), schedule, plan,
                      LoopSettings(device=device, compile=True))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    for _ in range(WARMUP_STEPS):
        trainer.train_step(seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(seq_len)
    synchronize()
    step_s = (time.perf_counter() - t0) / steps

    peak, peak_source = peak_flops(device)
    tok_per_s = plan.total_batch / step_s
    flops_per_token = model.estimate_flops(seq_len)
    return {
        "device": device_name(device),
        "config": {**spec, "seq_len": seq_len, "rows": rows, "accum": accum, "model_dim": config.model_dim},
        "params": model.num_params()["total"],
        "flops_per_token": flops_per_token,
        "precision": ("bf16 autocast" if device.type == "cuda" else "fp32") + (" + FP8 block matmuls" if variant == "fp8" else ""),
        "compile": device.type == "cuda",
        "steps": steps,
        "step_s": step_s,
        "tok_per_s": tok_per_s,
        "mfu": tok_per_s * flops_per_token / peak if peak else None,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "peak_mem_gib": peak_memory_gib(device),
        "torch": torch.__version__,
    }


def run(name: str, steps: int, timeout_s: float | None = None) -> dict:
    """`measure(name, steps)` in a process of its own; an error (out of memory, a timeout) is returned, not raised."""
    try:
        out = subprocess.run([sys.executable, "-m", "bench.pretrain", "--one", name, "--steps", str(steps)],
                             cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s"}
    if out.returncode != 0:  # e.g. out of memory: say so and go on with the others
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"configs: recipe, {', '.join(CONFIGS)}, each optionally +fp8 "
                                                 "(default: by device)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per config (default: 5 on CPU, 3 on CUDA)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps)))
        return

    import torch

    cuda = torch.cuda.is_available()
    names = args.names or (["recipe", "d12", "d20"] if cuda else ["tiny"])
    steps = args.steps or (3 if cuda else 5)
    results = {}
    for name in names:
        results[name] = run(name, steps)
        print(f"{name}: {json.dumps(results[name])}", flush=True)

    kind = "cuda" if cuda else "cpu"
    record(OUT, {f"{kind}/{name}": result for name, result in results.items()})


if __name__ == "__main__":
    main()
