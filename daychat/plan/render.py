"""A Plan as text: a runnable recipe yaml (every params section) and reports/plan.md."""

from __future__ import annotations

import dataclasses
import math
import re

from daychat.plan.cards import GIB
from daychat.plan.planner import Plan, make_plan

_KEY = re.compile(r"^  (\w+):")
_SECTION = re.compile(r"^(\w+):")


# Shard sizing (the data note): a ClimbMix / FineWeb-Edu shard is ~250M characters, ~50M tokens at a 32k
# vocabulary (nanochat: ~150 ClimbMix shards for ~7B tokens); dedup + the quality stage keep ~85% (an
# assumption until the first real run's dedup.json / quality.json say).
SHARD_TOKENS = 50e6
KEPT = 0.85

def yaml_scalar(value) -> str:
    """A YAML scalar both PyYAML and DVC read back as the same type (floats always with a dot: 3.0e-4)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, list):
        return "[" + ", ".join(yaml_scalar(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[A-Za-z_][\w.-]*", value) else f'"{value}"'
    return str(value)


def comments(plan: Plan) -> dict[str, str]:
    """Why each planned value is what it is, one line each (the recipe puts them beside the values)."""
    c, i = plan.chosen, plan.inputs
    return {
        "depth": f"model_dim {c.model_dim}, {c.n_head} heads of {i.head_dim}: {c.params_matmul / 1e6:.0f}M matmul params, "
                 f"closest to N_opt {c.params_opt / 1e6:.0f}M at {c.compute:.2e} FLOPs",
        "aspect_ratio": "nanochat's one-knob sizing: model_dim = depth x 64",
        "head_dim": "FA2-friendly head size (nanochat)",
        "n_kv_head": "0 = no GQA: memory is not the binding constraint at this size",
        "window_pattern": "all-global: SDPA has no sliding-window kernel that skips the masked work",
        "horizon": "warm down on time whatever throughput the card gives",
        "tokens": "the tokens the plan expects: the horizon daychat.optim.transfer scales Muon's weight decay for",
        "budget_h": f"{i.pretrain_share:.0%} of {i.hours:g} h; the rest: data stages, SFT, evals, margin",
        "total_batch": f"power of two nearest DeepSeek LLM's B_opt = 0.292 C^0.327 at C = {c.compute:.2e}",
        "device_batch": f"rows of {c.max_seq_len} per micro-batch, {c.accum_steps} a step; est. "
                        f"{c.memory_bytes / GIB:.1f} of {c.memory_limit / GIB:.1f} GiB allowed",
        "seq_len": "short contexts first for throughput (seeds T5), the full context at the end",
    }


def pretrain_block(root_block: list[str], plan: Plan) -> list[str]:
    """params.yaml's pretrain section with the planned keys replaced (commented) and every other line kept."""
    planned, why = plan.pretrain_section(), comments(plan)
    c, i = plan.chosen, plan.inputs
    mfu = "MFU measured by the probe (reports/metrics/probe.json)" if any(p.mfu_measured for p in c.phases) \
        else f"{i.mfu:.0%} MFU assumed (nothing measured; --probe reports/metrics/probe.json replaces it)"
    out = ["pretrain:",
           f"  # Planned by `python -m daychat.plan` for {i.card.device_name} ({i.card.memory_gib:g} GiB), {i.hours:g} h",
           "  # (reports/plan.md: the candidates and why). Assumptions:",
           f"  # - throughput: {mfu};",
           f"  # - {i.pretrain_hours:.1f} h of pretraining buys ~{c.tokens / 1e9:.2f}B tokens = {c.compute:.2e} FLOPs "
           f"(~{c.phases[-1].tok_per_s / 1e3:.0f}k tok/s at {c.phases[-1].seq_len});",
           f"  # - size rule N_opt = {i.rule.k_params:.3g} C^{i.rule.a:g}, D_opt = {i.rule.k_tokens:.3g} C^{i.rule.b:g} "
           f"(nanochat's fit, {i.rule.ref_params / 1e6:.0f}M / {i.rule.ref_tokens / 1e9:.1f}B",
           f"  #   at {i.rule.ref_compute:.0e} FLOPs; Chinchilla's exponents): ~{c.params_opt / 1e6:.0f}M params / "
           f"{c.tokens_opt / 1e9:.2f}B tokens here;",
           f"  # - memory: daychat.plan.memory's estimate kept under {i.memory_fraction:.0%} of the card."]
    seen, skipping, started = set(), False, False
    for line in root_block[1:]:
        m = _KEY.match(line)
        if m:
            key, started = m.group(1), True
            skipping = key in planned
            if skipping:
                out.append(f"  {key}: {yaml_scalar(planned[key])}  # {why[key]}")
                seen.add(key)
                continue
        elif skipping and line.strip().startswith("#") and line.startswith("   "):
            continue  # a continuation comment of a replaced key
        elif not started and line.strip().startswith("#"):
            continue  # the old section's leading comment: replaced by the plan's
        else:
            skipping = False
        out.append(line)
    for key, value in planned.items():
        if key not in seen:
            out.append(f"  {key}: {yaml_scalar(value)}  # {why[key]}")
    while out and not out[-1].strip():
        out.pop()
    return out


def recipe_text(root_params: str, plan: Plan, name: str = "<name>") -> str:
    """The root params.yaml with its pretrain section replaced by the plan's: a runnable recipe."""
    lines = root_params.splitlines()
    starts = [n for n, line in enumerate(lines) if _SECTION.match(line)] + [len(lines)]
    blocks = {lines[a].split(":")[0]: (a, b) for a, b in zip(starts, starts[1:])}
    if "pretrain" not in blocks:
        raise ValueError("params.yaml has no pretrain section")
    a, b = blocks["pretrain"]
    block = lines[a:b]
    trailing = []
    while block and (not block[-1].strip() or block[-1].startswith("#")):
        trailing.insert(0, block.pop())
    i = plan.inputs
    header = [f"# Recipe for {i.card.device_name}, {i.hours:g} h, written by `python -m daychat.plan --card {i.card.key} "
              f"--hours {i.hours:g}`.",
              "# Every section but pretrain is a copy of the root params.yaml; see reports/plan.md for the plan.",
              f"# Run it in runs/{name}/ with `python -m workflow.workspace run {name}`.", ""]
    body = lines[:a] + pretrain_block(block, plan) + (trailing or [""]) + lines[b:]
    return "\n".join(header + body).rstrip() + "\n"


def _sensitivity(plan: Plan, mfus=(0.30, 0.45, 0.60)) -> list[tuple[float, int, float]]:
    """(mfu, chosen depth, tokens) of the same inputs at other assumed MFUs (no probe)."""
    out = []
    for mfu in mfus:
        try:
            other = make_plan(dataclasses.replace(plan.inputs, mfu=mfu, probe=None)).chosen
        except ValueError:
            continue
        out.append((mfu, other.depth, other.tokens))
    return out


def plan_markdown(plan: Plan) -> str:
    c, i = plan.chosen, plan.inputs
    measured = any(p.mfu_measured for cand in plan.candidates for p in cand.phases)
    mfu_text = (f"MFU measured by the probe ({i.probe.source}) where it measured that depth and context, else "
                f"{i.mfu:.0%} assumed" if measured else
                f"an assumed MFU of {i.mfu:.0%} for every depth and context (no probe measurement given)")
    lines = [
        f"# Pretraining plan: {i.card.device_name}, {i.hours:g} h",
        "",
        f"Written by `python -m daychat.plan --card {i.card.key} --hours {i.hours:g}` (daychat/plan/planner.py). "
        "Deterministic: the same inputs give the same plan.",
        "",
        "## Inputs and assumptions",
        "",
        f"- Card: {i.card.describe()}; the plan keeps the estimated memory under {i.memory_fraction:.0%} of it "
        f"({c.memory_limit / GIB:.1f} GiB).",
        f"- Budget: {i.hours:g} h wall clock, {i.pretrain_share:.0%} of it pretraining ({i.pretrain_hours:.1f} h); the "
        f"rest ({i.hours - i.pretrain_hours:.1f} h) is for the data stages, SFT, evals and a margin (seeds: 80-90%).",
        f"- Throughput: {mfu_text}. tok/s = MFU x {i.card.bf16_flops / 1e12:g} TFLOPS / FLOPs per token (nanochat's "
        "count: 6 x matmul params + 12 x heads x head_dim x T per layer).",
        f"- Size rule: {i.rule.describe()}. Exponents a = b = 0.5 from Chinchilla (arXiv:2203.15556); the level from "
        "nanochat's small-model fit (ARCHITECTURE.md).",
        "- Batch: tokens per step = the power of two nearest DeepSeek LLM's B_opt = 0.292 C^0.327 "
        "(arXiv:2401.02954), which gives 2^19 (nanochat's measured optimum) near 1e19 FLOPs.",
        f"- Model family: vocab {i.vocab_size}, aspect ratio {i.aspect_ratio}, head_dim {i.head_dim}, "
        f"window pattern {i.window_pattern}, curriculum {', '.join(f'{s} from {f:.0%}' for f, s in i.curriculum)} of "
        "the horizon (wall clock).",
        "",
        "## Candidates",
        "",
        "Each depth spends the same pretraining hours; a bigger model gets fewer tokens. `N/N_opt` is how far its "
        "matmul params are from the compute-optimal size for the FLOPs it would do (1.0 = optimal).",
        "",
        "| depth | dim | heads | matmul params | tok/s (longest ctx) | tokens | FLOPs | N_opt | tokens/param | N/N_opt "
        "| total batch | micro-batch x ctx | est. memory |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cand in plan.candidates:
        mark = " **(chosen)**" if cand is c else ""
        fit = (f"{cand.device_batch} x {cand.max_seq_len}" if cand.fits else
               "does not fit" + (" (fits with activation checkpointing)" if cand.checkpointing_would_fit else ""))
        lines.append(
            f"| {cand.depth}{mark} | {cand.model_dim} | {cand.n_head} | {cand.params_matmul / 1e6:.0f}M "
            f"| {cand.phases[-1].tok_per_s:,.0f} | {cand.tokens / 1e9:.2f}B | {cand.compute:.2e} "
            f"| {cand.params_opt / 1e6:.0f}M | {cand.tokens / cand.params_matmul:.1f} "
            f"| {cand.params_matmul / cand.params_opt:.2f} | {cand.total_batch:,} | {fit} "
            f"| {cand.memory_bytes / GIB:.1f} GiB |")
    lines += [
        "",
        "## The plan",
        "",
        f"- **depth {c.depth}**: model_dim {c.model_dim}, {c.n_head} query heads of {i.head_dim}, "
        f"{c.n_kv_head} key/value heads; {c.params_matmul / 1e6:.0f}M matmul params ({c.params_total / 1e6:.0f}M with "
        "embeddings).",
        f"- **tokens**: ~{c.tokens / 1e9:.2f}B in {i.pretrain_hours:.1f} h ({c.tokens / c.params_matmul:.1f} tokens per "
        f"matmul param), {c.compute:.2e} FLOPs; the rule's optimum there is {c.params_opt / 1e6:.0f}M params / "
        f"{c.tokens_opt / 1e9:.2f}B tokens. The recipe's horizon is wall clock (`horizon: time`, "
        f"`budget_h: {round(i.pretrain_hours, 2)}`), so the token count follows the real throughput.",
        f"- **batch**: {c.total_batch:,} tokens per step (~{c.steps:,} steps); micro-batch {c.device_batch} rows x "
        f"{c.max_seq_len} = {c.device_batch * c.max_seq_len:,} tokens, {c.accum_steps} accumulation steps; estimated "
        f"peak memory {c.memory_bytes / GIB:.1f} GiB (daychat.plan.memory, bf16 + compile, no activation "
        "checkpointing).",
        "",
        "| phase | from | context | hours | tok/s | MFU | tokens | FLOPs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, p in enumerate(c.phases, 1):
        src = "measured" if p.mfu_measured else "assumed"
        lines.append(f"| {n} | {p.start:.0%} | {p.seq_len} | {p.hours:.2f} | {p.tok_per_s:,.0f} | {p.mfu:.0%} ({src}) "
                     f"| {p.tokens / 1e9:.2f}B | {p.flops:.2e} |")
    lines += [
        "",
        f"Pipeline wall time: pretraining {i.pretrain_hours:.1f} h + {i.hours - i.pretrain_hours:.1f} h for everything "
        f"else = {i.hours:g} h.",
        "",
        "## Why this depth",
        "",
        "With the horizon fixed in hours, every depth does about the same FLOPs (the MFU differs a little per depth "
        "once measured), so the question is how to split them between parameters and tokens. The scaling rule says "
        f"the loss is lowest near N_opt(C); depth {c.depth} is the depth that fits the card whose matmul parameters "
        f"are closest to it (N/N_opt = {c.params_matmul / c.params_opt:.2f}). A deeper model would see fewer tokens "
        "than compute-optimal (undertrained), a shallower one more (too small to use them).",
        "",
        "## How wrong this can be",
        "",
        "- The MFU: everything scales with it (N_opt goes as C^0.5). The same plan at other MFUs: "
        + "; ".join(f"{m:.0%} -> depth {d}, {t / 1e9:.2f}B tokens" for m, d, t in _sensitivity(plan))
        + ". Run the probe stage on the card and pass `--probe reports/metrics/probe.json` to replace the "
        "assumption with measurements.",
        "- The rule's level comes from another codebase's sweep (same architecture family, FineWeb data). Our data "
        "pipeline (dedup + quality filter) changes the loss, possibly the optimum. The sweep "
        "(`python -m daychat.plan.sweep`, reports/scaling.md) fits our own curve, at CPU scale only.",
        "- The memory estimate is a model, not a measurement; the margin covers the allocator and the CUDA context.",
        f"- Data: what dedup and the quality stage keep of the downloaded shards must hold the planned tokens, or "
        f"the run repeats data (epochs > 1 in reports/metrics/pretrain.json). The loader drops nothing, so the "
        f"tokens read are the tokens trained: at ~{SHARD_TOKENS / 1e6:.0f}M tokens a shard (~250M characters, "
        f"32k vocabulary) and ~{KEPT:.0%} kept, {c.tokens / 1e9:.2f}B tokens need "
        f"{math.ceil(c.tokens / (SHARD_TOKENS * KEPT))} train shards (download.shards; more for a faster card).",
        "",
    ]
    return "\n".join(lines)
