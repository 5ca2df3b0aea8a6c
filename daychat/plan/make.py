"""From a params.yaml to a written plan: what both `python -m daychat.plan` and the plan stage do.

    p = load_section("plan")                         # PlanParams
    plan = plan_for(Path("params.yaml"), p)          # reads its pretrain + tokenizer sections, the probe file
    write_plan(plan, Path("params.yaml"), recipe=..., report=..., metrics=...)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from daychat.errors import UserError
from daychat.io import write_metrics, write_text
from daychat.params import SCHEMA_FILE, parse_section, read_params, with_schema_line
from daychat.plan.cards import get_card
from daychat.plan.planner import Plan, PlanInputs, load_probe, make_plan
from daychat.plan.render import plan_markdown, recipe_text
from daychat.plan.scaling import ScalingRule


def plan_for(params_path: Path, p) -> Plan:
    """The plan for the card and budget of `p` (PlanParams), with the model family of params_path."""
    card = get_card(p.card)
    if p.memory_gib:
        card = dataclasses.replace(card, key=f"{card.key}-{p.memory_gib:g}gib", memory_gib=p.memory_gib)
    root = read_params(params_path)
    pre = parse_section("pretrain", root.get("pretrain", {}), params_path.name)
    vocab = int(parse_section("tokenizer", root.get("tokenizer", {}), params_path.name).vocab_size)
    probe = None
    if p.probe:
        path = Path(p.probe)
        if not path.is_file():
            raise UserError(f"{path} (plan.probe) not found: run the probe stage first (dvc repro probe), "
                            "or set plan.probe to \"\"")
        probe = load_probe(json.loads(path.read_text()), str(path), peak_flops=card.bf16_flops, vocab_size=vocab,
                           aspect_ratio=pre.aspect_ratio, head_dim=pre.head_dim)
        if not probe.mfu:
            raise UserError(f"{path} (plan.probe): no measured config (d<depth>_T<seq_len>_b<rows>/mfu) in it")
    rule = ScalingRule(ref_compute=p.ref_compute, ref_params=p.ref_params, ref_tokens=p.ref_tokens,
                       a=p.exponent, b=1.0 - p.exponent)
    inputs = PlanInputs(card=card, hours=p.hours, pretrain_share=p.pretrain_share, mfu=p.mfu, probe=probe, rule=rule,
                        vocab_size=vocab, aspect_ratio=pre.aspect_ratio, head_dim=pre.head_dim,
                        n_kv_head=pre.n_kv_head, window_pattern=pre.window_pattern,
                        curriculum=tuple(pre.curriculum()), depths=tuple(range(p.depth_min, p.depth_max + 1)),
                        memory_fraction=p.memory_fraction)
    try:
        return make_plan(inputs)
    except ValueError as e:
        raise UserError(f"{params_path}: plan: {e}") from None


def write_plan(plan: Plan, params_path: Path, recipe: Path | None = None, report: Path | None = None,
               metrics: Path | None = None) -> None:
    """Write the recipe (validated section by section before it is written), the report and the metrics."""
    if recipe:
        text = recipe_text(params_path.read_text(encoding="utf-8"), plan, recipe.stem)
        schema = os.path.relpath(params_path.absolute().parent / SCHEMA_FILE, recipe.absolute().parent)
        text = with_schema_line(text, Path(schema).as_posix())
        for name, values in yaml.safe_load(text).items():
            parse_section(name, values, recipe.name)
        write_text(recipe, text)
    if report:
        write_text(report, plan_markdown(plan))
    if metrics:
        write_metrics(metrics, plan.summary())
