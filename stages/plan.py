"""plan stage (on demand): the pretraining recipe for a card and a wall-clock budget.

    python stages/plan.py --recipe reports/plan/recipe.yaml --report reports/plan.md --metrics reports/metrics/plan.json

Reads params.yaml's `plan` section (card, hours, MFU assumption or a probe file, scaling rule) and its pretrain
and tokenizer sections (the model family). Writes a runnable recipe (params.yaml with the planned pretrain
section), a markdown report of every candidate depth and the choice, and flat metrics (depth, tokens, FLOPs,
batch, estimated memory). The same code as `python -m daychat.plan` (daychat/plan/make.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from daychat.cli import run, status
from daychat.params import PARAMS_FILE, load_section
from daychat.plan.make import plan_for, write_plan

NAME = "plan"


def main() -> None:
    args = parse_args()
    plan = plan_for(Path(PARAMS_FILE), load_section(NAME))
    c = plan.chosen
    write_plan(plan, Path(PARAMS_FILE), recipe=args.recipe, report=args.report, metrics=args.metrics)
    status(NAME, f"depth {c.depth}, ~{c.tokens / 1e9:.2f}B tokens, {c.compute:.2e} FLOPs, batch {c.total_batch:,} = "
                 f"{c.device_batch} x {c.max_seq_len} x {c.accum_steps}; {args.report}, {args.recipe}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, required=True, help="the planned recipe to write")
    parser.add_argument("--report", type=Path, required=True, help="markdown report to write")
    parser.add_argument("--metrics", type=Path, required=True, help="flat metrics JSON to write")
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
