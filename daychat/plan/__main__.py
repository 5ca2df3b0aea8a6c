"""`python -m daychat.plan`: plan the pretraining recipe for a card and a wall-clock budget.

    python -m daychat.plan --card rtx4090 --hours 24 \\
        --out-recipe workflow/recipes/rtx4090-24h.yaml --report reports/plan.md
    python -m daychat.plan --probe reports/metrics/probe.json      # measured MFU instead of the assumption

Every option defaults to params.yaml's `plan` section (the dvc stage `plan` runs the same code). Writes a
runnable recipe (every params section: pretrain from the plan, the rest copied from --params), a markdown
report of the candidates and the choice, and flat metrics. The recipe is validated before it is written.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from daychat.cli import run, status
from daychat.params import PlanParams, parse_section, read_params
from daychat.plan.cards import CARDS
from daychat.plan.make import plan_for, write_plan

NAME = "plan"
FLAGS = {"card": "card", "hours": "hours", "pretrain_share": "pretrain_share", "mfu": "mfu",
         "memory_gib": "memory_gib", "probe": "probe", "exponent": "exponent", "ref_params": "ref_params",
         "ref_tokens": "ref_tokens", "ref_compute": "ref_compute"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daychat.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="recipe with the plan section and the model family; the other sections are copied from it")
    p.add_argument("--card", choices=sorted(CARDS))
    p.add_argument("--hours", type=float, help="wall clock for the whole pipeline")
    p.add_argument("--pretrain-share", type=float, help="share of the hours spent pretraining")
    p.add_argument("--mfu", type=float, help="MFU assumed where the probe measured nothing")
    p.add_argument("--memory-gib", type=float, help="override the card's memory (e.g. a 12 GB variant)")
    p.add_argument("--probe", help="the probe stage's reports/metrics/probe.json")
    p.add_argument("--ref-params", type=float, help="N_opt at --ref-compute")
    p.add_argument("--ref-tokens", type=float, help="D_opt at --ref-compute")
    p.add_argument("--ref-compute", type=float)
    p.add_argument("--exponent", type=float, help="a in N_opt ~ C^a (D_opt ~ C^(1-a))")
    p.add_argument("--out-recipe", type=Path, help="write the recipe here (e.g. workflow/recipes/rtx4090-24h.yaml)")
    p.add_argument("--report", type=Path, help="write the markdown report here (e.g. reports/plan.md)")
    p.add_argument("--metrics", type=Path, help="write the flat summary JSON here (e.g. reports/metrics/plan.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    section = read_params(args.params).get("plan")
    p = parse_section("plan", section, args.params.name) if section is not None else PlanParams()
    given = {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
    p = parse_section("plan", {**dataclasses.asdict(p), **given}, "command line")
    plan = plan_for(args.params, p)
    c, i = plan.chosen, plan.inputs
    status(NAME, f"{i.card.describe()}, {i.hours:g} h ({i.pretrain_hours:.1f} h pretraining)")
    status(NAME, f"depth {c.depth} (dim {c.model_dim}, {c.params_matmul / 1e6:.0f}M matmul params), "
                 f"~{c.tokens / 1e9:.2f}B tokens, {c.compute:.2e} FLOPs; N_opt {c.params_opt / 1e6:.0f}M; batch "
                 f"{c.total_batch:,} = {c.device_batch} x {c.max_seq_len} x {c.accum_steps}; est. "
                 f"{c.memory_bytes / 2**30:.1f} GiB")
    write_plan(plan, args.params, args.out_recipe, args.report, args.metrics)
    for what, path in (("recipe", args.out_recipe), ("report", args.report), ("metrics", args.metrics)):
        if path:
            status(NAME, f"{what}: {path}")


if __name__ == "__main__":
    run(main, NAME)
