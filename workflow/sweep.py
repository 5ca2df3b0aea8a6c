"""The scaling sweep: small pretraining runs sized by the plan's rule, a fit of val_bpb vs compute, and a
projection to the real run's budget (daychat/plan/projection.py does the fit and the report).

    python -m workflow.sweep                                   # demo recipe, 6 budgets, ~12 min on 2 CPU cores
    python -m workflow.sweep --budgets 1e12,4e12 --recipe demo

It syncs its own workspace (runs/sweep/, from the demo recipe, so it never touches runs/demo/ or the root run),
brings the data stages up to date there once (`dvc exp run -S tokenizer.vocab_size=1024 pretokenize`), then runs one experiment per budget:
`dvc exp run -s pretrain -n sweep-... -S pretrain.depth=.. -S pretrain.tokens=..`. `dvc exp show` in
runs/sweep/ compares them afterwards. Finished points are kept in reports/scaling/points.json and reused when
the sweep is run again with the same budgets and code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from workflow import workspace

ROOT = workspace.ROOT
# Sized for a shared 2-core CPU (one thread per run: ~6e9 model FLOP/s at these sizes): 6.3e12 FLOPs in all,
# ~12 min with the data stages.
DEFAULT_BUDGETS = (1e11, 2e11, 4e11, 8e11, 1.6e12, 3.2e12)


def sweep_overrides(compute: float, vocab: int, aspect_ratio: int, head_dim: int, seq_len: int, rule) -> dict:
    """The pretrain params of one sweep point (what -S sets)."""
    from daychat.plan.planner import batch_for_compute
    from daychat.plan.projection import size_for_compute

    depth, tokens = size_for_compute(compute, rule, vocab, aspect_ratio, head_dim, seq_len, depths=range(1, 13))
    total_batch = max(seq_len, batch_for_compute(compute))
    steps = max(20, round(tokens / total_batch))
    return {"depth": depth, "horizon": "tokens", "tokens": steps * total_batch, "total_batch": total_batch,
            "device_batch": min(16, total_batch // seq_len), "seq_len": [[0.0, seq_len]],
            "warmup_steps": min(5, steps // 10), "eval_every": 0, "core_source": "", "save_every": 0,
            "save_every_min": 0.0, "log_every": 10}


def _hydra_value(value) -> str:
    if isinstance(value, str):
        return f"'{value}'"
    return json.dumps(value).replace(" ", "")


def sweep_env() -> dict[str, str]:
    # One thread per run: on a shared 2-core box a second OpenMP thread mostly waits at barriers (tests/conftest.py).
    return {**workspace.tool_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_point(ws: Path, name: str, overrides: dict) -> dict:
    cmd = ["dvc", "exp", "run", "-s", "pretrain", "-n", name]
    for key, value in overrides.items():
        cmd += ["-S", f"pretrain.{key}={_hydra_value(value)}"]
    print(f"[sweep] {name}: {' '.join(cmd[5:])}", flush=True)
    result = subprocess.run(cmd, cwd=ws, env=sweep_env())
    if result.returncode != 0:
        raise SystemExit(f"error: [sweep] `dvc exp run` failed for {name} in {ws} (exit {result.returncode})")
    return json.loads((ws / "reports" / "metrics" / "pretrain.json").read_text())


def main(argv: list[str] | None = None) -> None:
    from daychat.model.accounting import param_counts
    from daychat.model.gpt import GPTConfig
    from daychat.plan.cards import get_card
    from daychat.plan.planner import PlanInputs, make_plan
    from daychat.plan.projection import SweepPoint, write_report
    from daychat.plan.scaling import ScalingRule

    parser = argparse.ArgumentParser(prog="python -m workflow.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo", help="recipe whose data and model family the sweep uses")
    parser.add_argument("--workspace", type=Path, default=ROOT / "runs" / "sweep")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS), help="FLOPs, comma-separated")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--source", help="a local corpus (folder of parquet/jsonl) instead of the recipe's download "
                        "source, e.g. ../shared/data/corpus/mixed: more text, less repetition")
    parser.add_argument("--vocab", type=int, default=1024,
                        help="tokenizer.vocab_size for the sweep (small: at 4096 the lm_head is most of a tiny model)")
    parser.add_argument("--card", default="rtx4090", help="the real run the projection targets (planner's budget)")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--md", type=Path, default=ROOT / "reports" / "scaling.md")
    parser.add_argument("--png", type=Path, default=ROOT / "reports" / "scaling.png")
    parser.add_argument("--points", type=Path, default=ROOT / "reports" / "scaling" / "points.json")
    args = parser.parse_args(argv)

    source = str(Path(args.source).resolve()) if args.source else None
    rule = ScalingRule()
    budgets = sorted(float(b) for b in args.budgets.split(","))
    ws = workspace.sync(args.recipe, args.workspace)
    t0 = time.time()
    # The data stages once, with the sweep's vocabulary (`dvc exp run -S` leaves it in the workspace's
    # params.yaml, so the pretrain experiments below train on these tokens).
    data_cmd = ["dvc", "exp", "run", "-n", f"sweep-data-v{args.vocab}", "-S", f"tokenizer.vocab_size={args.vocab}"]
    if args.source:
        data_cmd += ["-S", "++download.source='local'", "-S", f"++download.path='{source}'",
                     "-S", "++download.max_chars=0"]  # ++: add the key or override it (Hydra)
    data_cmd.append("pretokenize")
    print(f"[sweep] data stages in {_rel(ws)}: {' '.join(data_cmd)}", flush=True)
    if subprocess.run(data_cmd, cwd=ws, env=sweep_env()).returncode != 0:
        raise SystemExit(f"error: [sweep] `{' '.join(data_cmd)}` failed in {ws}")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    vocab = int(params["tokenizer"]["vocab_size"])
    aspect, head_dim = int(params["pretrain"]["aspect_ratio"]), int(params["pretrain"]["head_dim"])

    done = {}
    if args.points.is_file():
        done = {p["name"]: p for p in json.loads(args.points.read_text())}
    points = []
    for compute in budgets:
        ov = sweep_overrides(compute, vocab, aspect, head_dim, args.seq_len, rule)
        name = f"sweep-c{compute:.2g}-d{ov['depth']}".replace("+", "")
        reuse = [p for p in done.values() if p.get("overrides") == ov and p.get("source") == source]
        if reuse:
            points.append({**reuse[0], "name": name})
            print(f"[sweep] {name}: reusing {args.points}", flush=True)
            continue
        t = time.time()
        m = run_point(ws, name, ov)
        cfg = GPTConfig(vocab_size=vocab, sequence_len=args.seq_len, depth=ov["depth"], aspect_ratio=aspect,
                        head_dim=head_dim)
        points.append({"name": name, "source": source, "overrides": ov, "depth": ov["depth"],
                       "params_matmul": param_counts(cfg)["matmul"], "tokens": int(m["tokens"]),
                       "compute": float(m["flops"]), "val_bpb": float(m["val_bpb"]),
                       "wall_s": float(m.get("wall_s", time.time() - t)), "epochs": float(m.get("epochs", 0.0))})
        args.points.parent.mkdir(parents=True, exist_ok=True)
        args.points.write_text(json.dumps(points, indent=2) + "\n")
        print(f"[sweep] {name}: val_bpb {m['val_bpb']:.4f} at {m['flops']:.2e} FLOPs in {time.time() - t:.0f}s "
              f"({time.time() - t0:.0f}s so far)", flush=True)

    plan = make_plan(PlanInputs(card=get_card(args.card), hours=args.hours))
    target = plan.chosen.compute
    sweep_points = [SweepPoint(**{k: p[k] for k in SweepPoint.__dataclass_fields__}) for p in points]
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {_torch_version()}"
    context = {
        "recipe": args.recipe, "workspace": str(_rel(ws)), "command": "python -m workflow.sweep " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        **({"data": f"the local corpus {args.source} (not FineWeb-Edu)"} if args.source else {}),
        "machine": machine, "seq_len": args.seq_len,
        "rule": rule.describe(),
        "target": f"the {args.card} / {args.hours:g} h plan (depth {plan.chosen.depth}, "
                  f"{plan.chosen.tokens / 1e9:.2f}B tokens, reports/plan.md)",
        "notes": [
            f"This invocation took {time.time() - t0:.0f} s (points already in {_rel(args.points)} are reused, not "
            "rerun); each point's own training time is in the table.",
            f"An epoch of the packed train split is ~{_epoch_tokens(points) / 1e3:.0f}k tokens (all of it: the loader "
            "drops nothing since issue 17), so points with epochs > 1 repeat it: repetition raises "
            "their loss and flattens the fitted exponent (Muennighoff et al. 2023, arXiv:2305.16264: repeated tokens "
            "are worth less after ~4 epochs). The real run sees its data about once.",
            f"At these sizes most matmul parameters are the lm_head (vocab {vocab} x model_dim) and attention is a "
            "large share of the FLOPs: the family is not the shape of the real run's models.",
            "CORE (subset) is not used: at these sizes it is at chance (demo: core_subset < 0), noise, not signal.",
            f"Reproduce: the command above (finished points in {_rel(args.points)} are reused).",
        ],
    }
    projection = write_report(sweep_points, target, args.md, args.png, context)
    for form in projection.fits:
        mid, lo, hi = projection.at_target(form)
        print(f"[sweep] {form}: {projection.fits[form].describe()}; at {target:.2e} FLOPs val_bpb {mid:.3f} "
              f"(5-95%: {lo:.3f}-{hi:.3f})", flush=True)
    print(f"[sweep] report: {_rel(args.md)}, plot: {_rel(args.png)}", flush=True)


def _epoch_tokens(points: list[dict]) -> float:
    per_epoch = sorted(p["tokens"] / p["epochs"] for p in points if p.get("epochs"))
    return per_epoch[len(per_epoch) // 2] if per_epoch else float("nan")


def _torch_version() -> str:
    import torch

    return torch.__version__


def _rel(path: Path) -> Path:
    try:
        return Path(path).resolve().relative_to(ROOT)
    except ValueError:
        return Path(path)


if __name__ == "__main__":
    main()
