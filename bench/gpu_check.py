"""The prepared GPU check: everything a short visit to a CUDA machine should measure, in one command.

    bash bench/gpu_check.sh            # = make gpu-check: on a CUDA machine, ~8 minutes on an H100/H200
    python -m bench.gpu_check --cpu    # the same code at tiny shapes on a CPU (what the test suite runs)

No part of daychat's CUDA path had run on a card when this was written, so a visit must answer, in order
of what a lost day would cost:

1. checks: the CUDA paths the CPU tests cannot reach, each pass / fail with its numbers:
   - compile + bf16: a compiled GPT trains steps with the same losses as eager (bf16 tolerance) and
     compiles once (no recompilation over the steps);
   - FlexAttention windows: sliding-window attention forward and backward against dense-mask SDPA;
   - FP8: the FP8 block linears' forward and backward against bf16, compiled, with a token count that is
     not a multiple of 16;
   - pinned loader: the pretraining and SFT batches reach the device equal to the host's, through pinned
     memory and non-blocking copies;
   - evaluation: memory-bounded scoring (daychat.eval.scoring) against the full forward, in bf16, and
     window layers in evaluation taking the dense path;
2. the rehearsal of params.yaml (daychat.plan.rehearse --device cuda): every GPU phase at its real
   shapes, measured peaks against the memory model, with the longest prompts taken from the committed
   reports/metrics/rehearse.json (the card's machine has no eval data);
3. throughput: tok/s, MFU and peak memory of the recipe's model (before the rehearsal, so that a long
   rehearsal cannot crowd it out), then with FP8, then d20 and d12, at the recipe's longest seq_len and
   micro-batch in bf16 + compile (bench.pretrain).

Each result is written to reports/bench/gpu-<card>.json as soon as it is known (a run cut off by its
time limit keeps what finished), and `--budget-s` skips what would not finish in time, saying so. What it
needs: the repository and PyTorch with CUDA; no internet, no data beyond what is committed (a few KB).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


class Report:
    """The JSON file of this run, rewritten whole after each result (bench.record stamps the machine)."""

    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline = path, deadline
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def put(self, key: str, value: Any) -> None:
        from bench import record

        self.data[key] = value
        record(self.path, {key: value if isinstance(value, dict) else {"value": value}})
        print(f"gpu_check: {key}: {json.dumps(value, default=str)[:600]}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# 1. Checks of the CUDA paths


def _tiny_gpt(device, cpu: bool, **overrides):
    import torch

    from daychat.model import GPT, GPTConfig

    shape = dict(vocab_size=512, sequence_len=128, depth=2, aspect_ratio=64, head_dim=64) if cpu else \
        dict(vocab_size=32768, sequence_len=1024, depth=4, aspect_ratio=64, head_dim=128)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**shape, **overrides})).to(device)
    model.init_weights()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    return model


def check_compile_bf16(device, cpu: bool) -> dict:
    """Three training steps of a compiled GPT against the same steps eager: losses within bf16 tolerance
    (fp32 on a CPU), and one compiled graph for them all."""
    import torch
    import torch._dynamo

    from daychat.optim import build_optimizers
    from daychat.train.loop import accumulate_gradients, autocast_for

    device = torch.device(device)
    autocast = autocast_for(device, "auto")
    gen = torch.Generator().manual_seed(0)
    cfg = _tiny_gpt("cpu", cpu).config
    batches = [torch.randint(0, cfg.vocab_size, (2, 129 if cpu else 1025), generator=gen).to(device) for _ in range(3)]
    losses = {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for mode in ("eager", "compiled"):
        model = _tiny_gpt(device, cpu)
        opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5,
                                weight_decay=0.0)
        forward = torch.compile(model, dynamic=False) if mode == "compiled" else model
        out = []
        for b in batches:
            loss = accumulate_gradients(forward, iter([(b[:, :-1], b[:, 1:])]), 1, autocast)
            for opt in opts:
                opt.step()
            model.zero_grad(set_to_none=True)
            out.append(float(loss))
        losses[mode] = out
    frames = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    worst = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"]))
    return {"ok": worst < (0.05 if not cpu else 1e-3) and frames <= 2, "losses": losses, "max_diff": worst,
            "graphs": frames}


def check_flex_windows(device, cpu: bool) -> dict:
    """Sliding-window attention through FlexAttention (compiled on CUDA) against dense-mask SDPA, forward
    and backward, in bf16 on CUDA (forward only on a CPU: FlexAttention has no CPU backward)."""
    import torch
    import torch.nn.functional as F

    from daychat.model.gpt import _flex, sliding_window_block_mask, sliding_window_dense_mask

    T, W = (256, 64) if cpu else (2048, 512)
    dtype = torch.float32 if cpu else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, T, 64, generator=gen).to(device, dtype).requires_grad_(not cpu) for _ in range(3))
    block = sliding_window_block_mask(T, W, torch.device(device))
    dense = sliding_window_dense_mask(T, W, torch.device(device))
    out_flex = _flex(q, k, v, block, enable_gqa=False)
    out_dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    fwd = (out_flex.float() - out_dense.float()).abs().max().item()
    bwd = None
    if not cpu:
        grads = []
        for out in (out_flex, out_dense):
            out.float().square().sum().backward()
            grads.append([t.grad.clone() for t in (q, k, v)])
            for t in (q, k, v):
                t.grad = None
        bwd = max((a.float() - b.float()).abs().max().item() for a, b in zip(*grads))
    tol = 1e-4 if cpu else 3e-2
    return {"ok": fwd < tol and (bwd is None or bwd < 10 * tol), "forward_max_diff": fwd, "backward_max_diff": bwd,
            "T": T, "window": W}


def check_fp8(device, cpu: bool) -> dict:
    """FP8 block linears, compiled, forward and backward with 1,000 tokens (not a multiple of 16), against
    bf16 (relative error), and in evaluation the plain matmul. On a CPU (torch._scaled_mm emulated) or a
    card below sm_89 the numerics still run, on CPU; `fp8_cores` says which."""
    import torch
    import torch.nn as nn

    from daychat.model.fp8 import FP8Linear, fp8_supported

    dev = torch.device(device)
    on = dev if fp8_supported(dev) else torch.device("cpu")
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=False).to(on)
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(1000, 256, device=on)
    fn = torch.compile(lambda t: fp8(t))
    with torch.autocast(on.type, dtype=torch.bfloat16, enabled=on.type == "cuda"):
        ref = linear(x)
        xg = x.clone().requires_grad_()
        y = fn(xg)
        y.float().square().sum().backward()
    rel = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    with torch.no_grad():
        plain = torch.equal(fp8(x), linear(x))
    return {"ok": rel < 0.06 and plain and xg.grad is not None and bool(torch.isfinite(linear.weight.grad).all()),
            "forward_rel_err": rel, "eval_is_plain_matmul": plain, "fp8_cores": on.type == "cuda",
            "device": str(on)}


def check_pinned_loader(device, cpu: bool) -> dict:
    """Batches through daychat.data.staging reach the device equal to the host arrays, and the copy does not
    hold the host back (the call returns before the device has the data on CUDA: non-blocking)."""
    import numpy as np
    import torch

    from daychat.data.staging import PinnedStaging

    staging = PinnedStaging(device)
    rng = np.random.default_rng(0)
    ok, seconds = True, []
    for rows, T in ((4, 2048), (8, 1024), (4, 2048)):
        packed = rng.integers(0, 32768, size=(rows, T + 1), dtype=np.int64)
        t0 = time.perf_counter()
        x, y = staging.to_device(packed[:, :-1], packed[:, 1:])
        seconds.append(time.perf_counter() - t0)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        ok &= bool(np.array_equal(x.cpu().numpy(), packed[:, :-1]) and np.array_equal(y.cpu().numpy(), packed[:, 1:]))
        ok &= x.device.type == torch.device(device).type
    pinned = bool(staging._slots and staging._slots[0][0].is_pinned()) if torch.device(device).type == "cuda" else None
    return {"ok": ok and pinned is not False, "pinned": pinned, "host_seconds": seconds}


def check_eval_scoring(device, cpu: bool) -> dict:
    """daychat.eval.scoring.losses_at against the full forward's cross-entropy, under the device's autocast,
    on a model with window layers (evaluation takes their dense path)."""
    import torch
    import torch.nn.functional as F

    from daychat.eval.scoring import losses_at
    from daychat.train.loop import autocast_for

    model = _tiny_gpt(device, cpu, window_pattern="SL", short_window=32 if cpu else 256).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, model.config.sequence_len), generator=gen).to(device)
    autocast = autocast_for(torch.device(device), "auto")
    with torch.no_grad(), autocast():
        full = F.cross_entropy(model(ids).reshape(-1, model.config.vocab_size), ids.roll(-1, 1).reshape(-1),
                               reduction="none")
        chunked, _ = losses_at(model, ids, ids.roll(-1, 1), chunk_rows=257)
    diff = (full - chunked).abs().max().item()
    return {"ok": diff < (1e-4 if cpu else 2e-2), "max_diff": diff}


CHECKS: dict[str, Callable] = {"compile_bf16": check_compile_bf16, "flex_windows": check_flex_windows,
                               "fp8": check_fp8, "pinned_loader": check_pinned_loader, "eval_scoring": check_eval_scoring}


# ----------------------------------------------------------------------------------------------------------
# 2 and 3: the rehearsal, throughput


def rehearse(report: Report, cpu: bool, params: Path, lengths: Path, reserve_s: float = 0.0) -> None:
    """The rehearsal within what is left less `reserve_s` (kept for the throughput runs after it)."""
    out = Path(report.path).with_name(Path(report.path).stem + "-rehearse")
    budget = max(30, int(report.left() - reserve_s))
    cmd = [sys.executable, "-m", "daychat.plan.rehearse", "--params", str(params), "--device", "cpu" if cpu else "cuda",
           "--lengths", str(lengths), "--longest-only", "--out", f"{out}.md", "--metrics", f"{out}.metrics.json",
           "--json", f"{out}.json", "--budget-s", str(budget)]
    if cpu:  # the plumbing, not the figures: two phases of the tiny recipe
        cmd += ["--only", "train step,CORE scoring"]

    def phases() -> list | None:  # the JSON is written after every job: a run cut off keeps what it measured
        return json.loads(Path(f"{out}.json").read_text()).get("phases") if Path(f"{out}.json").is_file() else None

    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget + 60)
        report.put("rehearsal", {"returncode": done.returncode, "seconds": time.monotonic() - t0,
                                 "phases": phases(), "stderr_tail": done.stderr[-1500:]})
    except subprocess.TimeoutExpired:
        report.put("rehearsal", {"error": "out of time", "seconds": time.monotonic() - t0, "phases": phases()})


def throughput(report: Report, cpu: bool, names: list[str]) -> None:
    from bench import pretrain

    for name in names:
        if report.left() < (20 if cpu else 75):
            report.put(f"throughput/{name}", {"skipped": "out of time"})
            continue
        report.put(f"throughput/{name}", pretrain.run(name, steps=2 if cpu else 3, timeout_s=report.left()))


# ----------------------------------------------------------------------------------------------------------


def preflight(params: Path) -> str | None:
    """What the whole run will import, imported now, and the recipe read: a missing package costs seconds of
    the machine's time here instead of the figures that need it (a line saying what to carry, or None)."""
    import importlib

    missing = []
    for module in ("daychat.plan.rehearse", "daychat.plan.measure", "daychat.eval.scoring", "daychat.train.loop",
                   "daychat.model.fp8", "daychat.data.staging", "bench.pretrain", "pydantic"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing.append(e.name or module)
    if not missing:
        try:
            from daychat.params import validate_all

            validate_all(params)
            from bench.pretrain import recipe_config

            recipe_config()
        except ModuleNotFoundError as e:
            missing.append(e.name or "?")
    if missing:
        return (f"missing Python packages on this machine: {', '.join(sorted(set(missing)))} (carry them as wheels: "
                "bash bench/gpu_wheels.sh where pip works, then carry .whl)")
    return None


def card_slug(device) -> str:
    import torch

    if torch.device(device).type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (the test of this script)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip what would not finish within this")
    parser.add_argument("--out", help="JSON to write (default: reports/bench/gpu-<card>.json)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="the recipe to rehearse")
    parser.add_argument("--lengths", default=str(ROOT / "reports" / "metrics" / "rehearse.json"),
                        help="longest prompts, from a rehearsal that had the eval data")
    args = parser.parse_args(argv)

    import torch

    problem = preflight(Path(args.params))
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    cpu = args.cpu or not torch.cuda.is_available()
    device = "cpu" if cpu else "cuda"
    if device == "cuda":
        torch.set_float32_matmul_precision("high")
    out = Path(args.out) if args.out else ROOT / "reports" / "bench" / f"gpu-{card_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(out, time.monotonic() + args.budget_s)
    report.put("device", {"name": torch.cuda.get_device_name(0) if not cpu else "cpu", "torch": torch.__version__,
                          "cuda": torch.version.cuda, "mode": "cpu" if cpu else "cuda"})
    failed = []
    for name, check in CHECKS.items():
        try:
            result = check(device, cpu)
        except Exception as e:  # a failed check is a result: record it and go on
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                      "where": traceback.format_exc().splitlines()[-3:]}
        report.put(f"check/{name}", result)
        if not result.get("ok"):
            failed.append(name)
    # The recipe's throughput first (one compile, ~1 min on an H100), then the rehearsal keeping ~2 minutes
    # for FP8 and the reference depths. FP8 on a CPU is emulated: check/fp8 only.
    throughput(report, cpu, ["ci"] if cpu else ["recipe"])
    rehearse(report, cpu, Path(args.params), Path(args.lengths), reserve_s=0 if cpu else 120)
    if not cpu:
        throughput(report, cpu, ["recipe+fp8", "d20", "d12"])
    report.put("summary", {"failed_checks": failed, "seconds": args.budget_s - report.left()})
    print(f"gpu_check: wrote {out}; {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
