"""Preflight: refuse, before anything is allocated, a training config whose estimated peak memory does not fit.

    budget = available_bytes(device, p.memory_gib)        # None: unknown (a CPU without memory_gib)
    est = check_fits(config, p.device_batch, max_seq_len, budget_bytes=budget, margin=p.memory_margin, ...)

`check_fits` raises a UserError with ONE line: what was estimated against what is available, and the
first knob that makes it fit, in this order (cheapest for the recipe first): a smaller device_batch (the
largest that fits, and that splits total_batch), a shorter longest seq_len, activation checkpointing,
a smaller depth. Pretraining calls it; SFT calls it with section "sft" and tunes_model=False (its model
is the base model as it is: only its device_batch and seq_len are knobs).
"""

from __future__ import annotations

import dataclasses

from daychat.errors import UserError
from daychat.model.gpt import GPTConfig
from daychat.plan.memory import (
    GiB,
    MemoryEstimate,
    Phase,
    estimate_memory,
    largest_fit,
    scoring_batch_tokens,
    scoring_phase,
    static_bytes,
)


def preflight(section: str, config: GPTConfig, device_batch: int, seq_len: int, device, *, memory_gib: float,
              margin: float, card: str, say, **settings) -> MemoryEstimate | None:
    """A training stage's check before it allocates anything: `check_fits` against `memory_gib` or the card
    (named `card` in messages), or skipped on a CPU without memory_gib; one status line through `say`
    either way. `settings` go to check_fits (precision, compile, total_batch, ...)."""
    budget = available_bytes(device, memory_gib)
    if budget is None:
        say(f"memory preflight skipped: a CPU run with {section}.memory_gib 0 (set it to check a card)")
        return None
    source = f"{section}.memory_gib {memory_gib:g} GiB" if memory_gib > 0 else f"{card} {budget / GiB:.1f} GiB"
    est = check_fits(config, device_batch, seq_len, budget_bytes=budget, margin=margin,
                     device=getattr(device, "type", device), section=section, budget_source=source, **settings)
    say(f"memory preflight: estimated {est.describe()}; fits {source}")
    return est


def available_bytes(device, memory_gib: float = 0.0) -> int | None:
    """The memory a run may use: `memory_gib` when set (> 0: plan for another card, or force it in tests),
    else the CUDA card's total memory, else None (a CPU: unknown, the check is skipped)."""
    if memory_gib > 0:
        return int(memory_gib * GiB)
    if getattr(device, "type", device) == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def check_fits(config: GPTConfig, device_batch: int, seq_len: int, *, budget_bytes: int, margin: float = 0.05,
               precision: str = "bf16", compile: bool = True, activation_checkpointing: bool = False,
               device: str = "cuda", section: str = "pretrain", total_batch: int | None = None,
               budget_source: str = "", ema: bool = False, tunes_model: bool = True) -> MemoryEstimate:
    """The estimate if it fits in budget_bytes x (1 - margin); else a one-line UserError naming the knob."""
    settings = dict(precision=precision, compile=compile, device=device, ema=ema)
    est = estimate_memory(config, device_batch, seq_len, activation_checkpointing=activation_checkpointing, **settings)
    usable = budget_bytes * (1 - margin)
    if est.total_bytes <= usable:
        return est
    how = f"{precision}" + (" + compile" if compile and device == "cuda" else "") + \
          (" + activation checkpointing" if activation_checkpointing else "")
    source = budget_source or f"{budget_bytes / GiB:.1f} GiB"
    advice = suggest(config, device_batch, seq_len, usable, activation_checkpointing=activation_checkpointing,
                     section=section, total_batch=total_batch, tunes_model=tunes_model, **settings)
    raise UserError(f"{section}: estimated peak memory {est.total_bytes / GiB:.1f} GiB (d{config.depth}, "
                    f"{device_batch} rows x {seq_len} tokens, {how}) exceeds the {usable / GiB:.1f} GiB available "
                    f"({source} less {section}.memory_margin {margin:.0%}); {advice}")


def suggest(config: GPTConfig, device_batch: int, seq_len: int, usable: float, *, activation_checkpointing: bool,
            section: str, total_batch: int | None = None, tunes_model: bool = True, **settings) -> str:
    """The first knob that brings the estimate under `usable` bytes, as an instruction. tunes_model=False:
    the section has no depth or activation_checkpointing knob (SFT), so only the batch shape is offered."""
    ckpt = activation_checkpointing
    rows = largest_fit(config, seq_len, usable, activation_checkpointing=ckpt, max_batch=device_batch, **settings)
    if rows >= 1:
        # the micro-batch must split total_batch (daychat.train.schedule.plan_batch): the largest that does
        while total_batch and rows > 1 and total_batch % (rows * seq_len):
            rows -= 1
        return f"set {section}.device_batch to {rows} (the largest that fits{' and splits total_batch' if total_batch else ''})"
    t = seq_len // 2  # half the context, one row; shorter would change the recipe more than fit it
    if t >= 128 and largest_fit(config, t, usable, activation_checkpointing=ckpt, max_batch=1, **settings):
        return f"set {'the longest ' if tunes_model else ''}{section}.seq_len to {t} with {section}.device_batch 1"
    if not tunes_model:
        return (f"not even 1 row of {seq_len} tokens fits beside the d{config.depth} model's weights, gradients "
                f"and optimizer state; use a larger card, a shorter {section}.seq_len or a smaller base model")
    if not ckpt:
        rows = largest_fit(config, seq_len, usable, activation_checkpointing=True, max_batch=device_batch, **settings)
        if rows:
            return f"set {section}.activation_checkpointing: true with {section}.device_batch {rows}"
    for depth in range(config.depth - 1, 0, -1):
        smaller = dataclasses.replace(config, depth=depth)
        if largest_fit(smaller, seq_len, usable, activation_checkpointing=True, max_batch=1, **settings):
            return (f"lower {section}.depth to {depth} (with {section}.activation_checkpointing: true and "
                    f"{section}.device_batch 1)")
    static = sum(static_bytes(config).values())
    return (f"not even a d1 model fits: weights, gradients and optimizer state alone take {static / GiB:.2f} GiB; "
            f"use a larger card or a smaller vocabulary")


# ----------------------------------------------------------------------------------------------------------
# Evaluation phases: every stage that scores text (and pretraining, which evaluates as it goes) checks its
# scoring and generation phases here before it allocates, and sizes its scoring batches from the same model.

# Scoring batch on a CPU when no memory figure is given (memory_gib 0): tokens per forward. 8k tokens of the
# real recipe's d17 is ~0.5 GB of fp32 transients beside the model; more buys a CPU nothing.
CPU_SCORING_TOKENS = 8192


def _usable(device, memory_gib: float, margin: float, card: str, section: str) -> tuple[float | None, str]:
    budget = available_bytes(device, memory_gib)
    if budget is None:
        return None, ""
    source = f"{section}.memory_gib {memory_gib:g} GiB" if memory_gib > 0 else f"{card} {budget / GiB:.1f} GiB"
    return budget * (1 - margin), f"{source} less {section}.memory_margin {margin:.0%}"


def scoring_batch(section: str, what: str, config: GPTConfig, device, *, memory_gib: float, margin: float,
                  card: str, static: dict[str, int], longest: int, batch_tokens: int = 0, precision: str = "auto",
                  columns: int | None = None, knob: str | None = None, fix: str = "") -> tuple[int, Phase]:
    """The scoring batch (tokens, rows x padded width) of the evaluation phase `what`, and its memory.

    batch_tokens 0 = automatic: the largest batch that fits beside `static` (the model; the optimizer state
    when a training stage evaluates), at most memory.MAX_SCORING_TOKENS; on a CPU without memory_gib,
    CPU_SCORING_TOKENS. A sequence longer than the batch is scored alone, so the phase is sized at
    max(batch, longest). Every position is taken as scored (the worst case), or with `columns`, the last
    position of each row over that many vocabulary columns (letter scoring). Raises a one-line UserError,
    before anything is allocated, when the phase does not fit: naming `knob` (the batch size key) when it
    was set too large, else `fix`."""
    dev = getattr(device, "type", device)
    usable, source = _usable(device, memory_gib, margin, card, section)

    def phase(tokens: int) -> Phase:
        scored = tokens if columns is None else max(1, tokens // max(longest, 1))
        return scoring_phase(what, config, tokens, static=static, precision=precision, device=dev, scored=scored,
                             columns=columns)

    if usable is None:
        tokens = batch_tokens or CPU_SCORING_TOKENS
        return tokens, phase(max(tokens, longest))
    prec = "bf16" if precision == "auto" and dev == "cuda" else ("fp32" if precision == "auto" else precision)
    if batch_tokens:
        est = phase(max(batch_tokens, longest))
        if est.total_bytes > usable:
            fit = scoring_batch_tokens(config, usable, static=static, precision=prec, device=dev, longest=longest,
                                       columns=columns)
            advice = (f"set {knob} to {fit:,} or 0 (the largest that fits)" if fit and knob else fix)
            raise UserError(f"{section}: {what} with batches of {max(batch_tokens, longest):,} tokens is estimated at "
                            f"{est.total_bytes / GiB:.1f} GiB ({est.describe()}), over the {usable / GiB:.1f} GiB "
                            f"available ({source}); {advice}")
        return batch_tokens, est
    tokens = scoring_batch_tokens(config, usable, static=static, precision=prec, device=dev, longest=longest,
                                  columns=columns)
    if not tokens:
        est = phase(longest)
        raise UserError(f"{section}: {what} needs {est.total_bytes / GiB:.1f} GiB for its longest sequence "
                        f"({longest:,} tokens; {est.describe()}), over the {usable / GiB:.1f} GiB available "
                        f"({source}); {fix}")
    return tokens, phase(max(tokens, longest))


def check_phase(section: str, phase: Phase, device, *, memory_gib: float, margin: float, card: str,
                fix: str) -> None:
    """Raise a one-line UserError if `phase` does not fit the card less the margin (nothing on a CPU without
    memory_gib); `fix` says which knob to turn."""
    usable, source = _usable(device, memory_gib, margin, card, section)
    if usable is not None and phase.total_bytes > usable:
        raise UserError(f"{section}: {phase.name} ({phase.shape}) is estimated at {phase.total_bytes / GiB:.1f} GiB "
                        f"({phase.describe()}), over the {usable / GiB:.1f} GiB available ({source}); {fix}")


def summary(phases: list[Phase], device, *, memory_gib: float, card: str, section: str) -> str:
    """One status line: each phase's estimate and what it is checked against."""
    budget = available_bytes(device, memory_gib)
    shown = ", ".join(f"{p.name} {p.total_bytes / GiB:.1f}" for p in phases)
    if budget is None:
        return f"memory by phase (GiB, estimated for a CPU; not checked: {section}.memory_gib 0): {shown}"
    source = f"{section}.memory_gib {memory_gib:g} GiB" if memory_gib > 0 else f"{card} {budget / GiB:.1f} GiB"
    return f"memory preflight by phase (GiB): {shown}; all fit {source}"
