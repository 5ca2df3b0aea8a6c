"""The training schedule as data: a horizon, a learning-rate shape and a sequence-length curriculum.

Everything is a function of `progress` in [0, 1], the fraction of the horizon done:

- by tokens (an explicit count, or tokens:params ratio resolved to a count once the model is built),
  progress = tokens trained / horizon tokens;
- by wall-clock budget, progress = elapsed / budget, so a run warms down on time whatever throughput the
  card turns out to give (a 20 h budget ends at 20 h with the learning rate at its final value).

The learning rate multiplier ramps up linearly over `warmup_steps` optimizer steps (warmup is about the
optimizers' state settling, so it counts steps, as nanochat does), stays at 1, and over the last
`warmdown_frac` of progress falls linearly to `final_lr_frac` (warmup-stable-decay; nanochat's
get_lr_multiplier). The sequence-length curriculum is a list of (fraction, seq_len): from each fraction
of progress on, rows are that long (short contexts early are cheaper per token and learn local
statistics as well; long contexts late teach the long-range use). Beside the learning rate, Muon's
momentum warms up from 0.85 to 0.97 over the first 400 steps and comes down to 0.90 over the warmdown,
and Muon's weight decay follows a cosine to 0 over the horizon (all nanochat's, scripts/base_train.py
get_muon_momentum and get_weight_decay at 92d63d4).

Like modded-nanogpt's stage list, this is data a test can read and a log can print, not branches in
the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from daychat.sections import ParamsError

HorizonKind = Literal["tokens", "time"]


@dataclass(frozen=True)
class Horizon:
    """When training ends: after `tokens` tokens, or after `budget_s` seconds of training."""

    kind: HorizonKind
    tokens: int = 0  # kind == "tokens"
    budget_s: float = 0.0  # kind == "time"

    def __post_init__(self):
        if self.kind == "tokens" and self.tokens <= 0:
            raise ValueError(f"a token horizon needs tokens > 0, got {self.tokens}")
        if self.kind == "time" and self.budget_s <= 0:
            raise ValueError(f"a wall-clock horizon needs budget_s > 0, got {self.budget_s}")

    def progress(self, tokens: int, elapsed_s: float) -> float:
        """Fraction of the horizon done, clipped to [0, 1]."""
        done = tokens / self.tokens if self.kind == "tokens" else elapsed_s / self.budget_s
        return min(1.0, max(0.0, done))

    def done(self, tokens: int, elapsed_s: float) -> bool:
        return self.progress(tokens, elapsed_s) >= 1.0

    def describe(self) -> str:
        if self.kind == "tokens":
            return f"{self.tokens:,} tokens"
        return f"{self.budget_s / 3600:.2f} h of training wall clock"


@dataclass(frozen=True)
class Schedule:
    """Learning-rate shape and sequence-length curriculum over a horizon."""

    horizon: Horizon
    warmup_steps: int = 0
    warmdown_frac: float = 0.5
    final_lr_frac: float = 0.0
    # (fraction of progress from which it applies, seq_len), fractions increasing, the first 0.0
    curriculum: tuple[tuple[float, int], ...] = field(default=((0.0, 1024),))
    # Muon's momentum (start, peak, end): start -> peak linearly over the first momentum_warmup_steps (a
    # lower momentum early tracks the fast-moving first gradients), then peak -> end linearly over the
    # warmdown (less averaging while the learning rate falls). nanochat's base_train: 0.85 -> 0.97 over 400
    # steps, 0.97 -> 0.90 in the warmdown; its chat_sft (and daychat before issue 17): 0.85 -> 0.95 over
    # 300 steps and no change in the warmdown.
    momentum: tuple[float, float, float] = (0.85, 0.97, 0.90)
    momentum_warmup_steps: int = 400

    def __post_init__(self):
        fractions = [f for f, _ in self.curriculum]
        if not self.curriculum or fractions[0] != 0.0 or fractions != sorted(set(fractions)):
            raise ValueError(f"curriculum fractions must start at 0.0 and increase, got {fractions}")
        if not 0.0 <= self.warmdown_frac <= 1.0 or not 0.0 <= self.final_lr_frac <= 1.0:
            raise ValueError("warmdown_frac and final_lr_frac must be in [0, 1]")

    def lr_multiplier(self, progress: float, step: int) -> float:
        """Multiplier of every group's initial learning rate for optimizer step `step` at `progress`."""
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        start = 1.0 - self.warmdown_frac
        if self.warmdown_frac == 0.0 or progress <= start:
            return warmup
        left = max(0.0, (1.0 - progress) / self.warmdown_frac)  # 1 at the start of the warmdown, 0 at the end
        return warmup * (left + (1.0 - left) * self.final_lr_frac)

    def muon_momentum(self, step: int, progress: float = 0.0) -> float:
        """Muon's momentum for optimizer step `step` at `progress` (the warmup wins where they overlap, as
        in nanochat's get_muon_momentum)."""
        start, peak, end = self.momentum
        if step < self.momentum_warmup_steps:
            return start + (peak - start) * step / self.momentum_warmup_steps
        warmdown_start = 1.0 - self.warmdown_frac
        if self.warmdown_frac > 0.0 and progress > warmdown_start:
            return peak + (end - peak) * min(1.0, (progress - warmdown_start) / self.warmdown_frac)
        return peak

    def weight_decay_multiplier(self, progress: float) -> float:
        """Weight decay follows a cosine from its full value to 0 at the end of the horizon (nanochat)."""
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def seq_len(self, progress: float) -> int:
        """The row length of the curriculum stage that `progress` is in."""
        current = self.curriculum[0][1]
        for fraction, seq_len in self.curriculum:
            if progress >= fraction:
                current = seq_len
        return current

    @property
    def max_seq_len(self) -> int:
        return max(seq_len for _, seq_len in self.curriculum)

    def describe(self) -> str:
        stages = ", ".join(f"{seq_len} from {fraction:.0%}" for fraction, seq_len in self.curriculum)
        return (f"{self.horizon.describe()}; lr: warmup {self.warmup_steps} steps, warmdown over the last "
                f"{self.warmdown_frac:.0%} to {self.final_lr_frac:g}; seq_len: {stages}")


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's `total_batch` tokens are cut into micro-batches.

    A micro-batch holds `device_batch` rows at the longest sequence length of the curriculum, and the
    same number of tokens at a shorter one (rows x seq_len is constant): memory per micro-batch stays
    about the same (SDPA's flash attention is linear in T), and short-context steps are not slowed down
    by tiny micro-batches. Gradient accumulation = total_batch / (rows x seq_len), checked to be whole.
    """

    total_batch: int  # tokens per optimizer step
    device_batch: int  # rows per micro-batch at max_seq_len
    max_seq_len: int

    @property
    def micro_tokens(self) -> int:
        return self.device_batch * self.max_seq_len

    def rows(self, seq_len: int) -> int:
        return self.micro_tokens // seq_len

    def accum_steps(self, seq_len: int) -> int:
        return self.total_batch // (self.rows(seq_len) * seq_len)


def plan_batch(total_batch: int, device_batch: int, seq_lens: list[int], section: str = "pretrain") -> BatchPlan:
    """A checked BatchPlan; a total that does not split into whole micro-batches is a ParamsError naming
    `<section>.total_batch`, `.device_batch` and `.seq_len`."""
    max_seq_len = max(seq_lens)
    plan = BatchPlan(total_batch, device_batch, max_seq_len)
    for seq_len in seq_lens:
        if max_seq_len % seq_len:
            raise ParamsError(f"{section}.seq_len", f"lengths must each divide the longest ({max_seq_len}) so that "
                                                    f"a micro-batch holds whole rows at every stage, got {seq_len}")
    if total_batch % plan.micro_tokens:
        lower = total_batch // plan.micro_tokens * plan.micro_tokens
        options = " or ".join(f"{n:,}" for n in (lower, lower + plan.micro_tokens) if n > 0)
        raise ParamsError(f"{section}.total_batch",
                          f"({total_batch:,} tokens) must be a multiple of {section}.device_batch x the longest "
                          f"{section}.seq_len = {device_batch} x {max_seq_len} = {plan.micro_tokens:,} tokens per "
                          f"micro-batch; use e.g. {options}")
    return plan


def check_batch(section: str, total_batch: int, device_batch: int, seq_lens: list[int], gpus: int) -> None:
    """The batch keys of a pretrain or sft params section (run by daychat.params when it reads the section):
    the micro-batches must split the total (`plan_batch`), and the GPUs must share them evenly."""
    plan_batch(total_batch, device_batch, seq_lens, section)
    per_rank = device_batch * max(seq_lens)
    if total_batch % (gpus * per_rank):
        longest = "longest seq_len" if section == "pretrain" else "seq_len"
        raise ParamsError(f"{section}.gpus", f"({gpus}) must divide the micro-batches of a step: total_batch "
                                             f"{total_batch:,} / (device_batch x {longest} = {per_rank:,}) "
                                             f"= {total_batch // per_rank}; change {section}.gpus or total_batch")


def schedule_from_params(p, scaling_params: int) -> Schedule:
    """The Schedule a `pretrain` params section describes; `scaling_params` resolves horizon: ratio
    (nanochat's scaling parameters: block matrices + lm_head, `GPT.num_params()["matmul"]`)."""
    if p.horizon == "time":
        horizon = Horizon("time", budget_s=p.budget_h * 3600)
    else:
        tokens = p.tokens if p.horizon == "tokens" else round(p.tokens_per_param * scaling_params)
        horizon = Horizon("tokens", tokens=tokens)
    return Schedule(horizon, warmup_steps=p.warmup_steps, warmdown_frac=p.warmdown_frac,
                    final_lr_frac=p.final_lr_frac, curriculum=tuple(p.curriculum()),
                    momentum=tuple(p.muon_momentum), momentum_warmup_steps=p.muon_momentum_warmup_steps)
