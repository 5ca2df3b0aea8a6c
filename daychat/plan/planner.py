"""The planner: a card and a wall-clock budget -> the pretraining recipe (depth, tokens, batch, curriculum).

For every candidate depth (model_dim = depth * aspect_ratio rounded up to head_dim, nanochat's one-knob
sizing):
  1. throughput per curriculum phase: tok/s = MFU * peak / FLOPs-per-token(seq_len), with the MFU measured by
     the probe stage for that (depth, seq_len) when reports/metrics/probe.json has it, else an assumption;
  2. the tokens D and FLOPs C that the pretraining share of the budget buys (the horizon is wall clock, so each
     curriculum phase gets its fraction of the hours, at its own speed);
  3. the compute-optimal size at that C from the scaling rule (daychat.plan.scaling), N_opt(C);
  4. the batch: total tokens per step from the compute (DeepSeek LLM's fit, below), and the largest
     micro-batch whose estimated memory (daychat.plan.memory) stays under a margin of the card's memory,
     shortening the longest context of the curriculum if even one row does not fit.
The chosen depth is the one that fits memory and whose matmul params are closest to N_opt(C) in log space:
it spends the budget at the compute-optimal tokens:params ratio. Ties go to the smaller (faster) model.

Everything is a pure function of the inputs (no clock, no randomness): the same inputs give the same plan.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from daychat.model.accounting import flops_per_token, param_counts
from daychat.model.gpt import GPTConfig
from daychat.plan.cards import GIB, Card
from daychat.plan.scaling import ScalingRule

# MFU assumed when nothing is measured: bf16 autocast + torch.compile on one card. nanochat reports ~40-50% MFU
# on H100 for d20-d26 with FA3; the 4090 has no FA3 (SDPA's FA2 backend) and a much smaller L2 + memory
# bandwidth per FLOP, so we assume the lower end. (params.yaml's earlier guess of ~38k tok/s for a d20 would be
# 38e3 * 3.24e9 / 165.2e12 = 75% MFU, which we do not assume without a measurement.) The probe replaces this.
DEFAULT_MFU = 0.45

# Tokens per optimizer step as a function of compute: DeepSeek LLM (arXiv:2401.02954, Sec. 3.1, fit over
# 1e17-3e20 FLOPs) B_opt = 0.2920 * C^0.3271 tokens. At 1e19 that is ~4.8e5 tokens, i.e. 2^19 = 524,288,
# nanochat's measured optimum for d12-d20; we round to the nearest power of two (in log space) so that every
# micro-batch of powers of two divides it.
BATCH_COEF, BATCH_EXP = 0.2920, 0.3271

DEFAULT_CURRICULUM = ((0.0, 512), (0.5, 1024), (0.85, 2048))


def batch_for_compute(compute: float, coef: float = BATCH_COEF, exponent: float = BATCH_EXP) -> int:
    """Tokens per optimizer step for `compute` FLOPs: the power of two nearest to DeepSeek's B_opt(C)."""
    return 2 ** max(0, round(math.log2(coef * compute ** exponent)))


@dataclass(frozen=True)
class Probe:
    """Measured throughput: MFU per (depth, seq_len), from the probe stage's reports/metrics/probe.json."""

    mfu: dict[tuple[int, int], float]
    source: str = ""

    def lookup(self, depth: int, seq_len: int) -> float | None:
        """The measured MFU at (depth, seq_len); at the nearest measured depth (same seq_len, else any) when
        that exact config was not probed; None when nothing was measured."""
        if (depth, seq_len) in self.mfu:
            return self.mfu[(depth, seq_len)]
        same_seq = [(abs(d - depth), d) for d, s in self.mfu if s == seq_len]
        if same_seq:
            return self.mfu[(min(same_seq)[1], seq_len)]
        if self.mfu:
            nearest = min(abs(d - depth) for d, _ in self.mfu)
            values = [v for (d, _), v in self.mfu.items() if abs(d - depth) == nearest]
            return sum(values) / len(values)
        return None


# The probe stage's flat keys: `d{depth}_T{seq_len}_b{device_batch}/mfu` (stages/probe.py, flat_metrics).
_FLAT_KEY = re.compile(r"^d(\d+)_T(\d+)(?:_b\d+)?/(mfu|tok_per_s)$")


def load_probe(data, source: str = "", peak_flops: float | None = None, vocab_size: int = 32768,
               aspect_ratio: int = 64, head_dim: int = 128) -> Probe:
    """MFU per (depth, seq_len) from the probe's JSON: its flat metrics (`d12_T2048_b4/mfu`, `.../tok_per_s`;
    out-of-memory configs have neither) or rows (mappings with depth, seq_len and mfu or tok_per_s). Of the
    micro-batch sizes measured for one (depth, seq_len) the best MFU is kept: the planner takes the largest
    micro-batch that fits, which is the fastest one the probe could run. tok/s without an MFU is turned into
    MFU with `peak_flops` and the FLOPs per token of that config."""
    found: dict[tuple[int, int], float] = {}

    def add(depth, seq_len, kind, value):
        if value is None or not isinstance(value, (int, float)) or value <= 0:
            return
        depth, seq_len = int(depth), int(seq_len)
        if kind == "mfu":
            mfu = float(value) if value <= 1.0 else float(value) / 100.0
        elif peak_flops:
            cfg = GPTConfig(vocab_size=vocab_size, sequence_len=seq_len, depth=depth, aspect_ratio=aspect_ratio,
                            head_dim=head_dim)
            mfu = float(value) * flops_per_token(cfg, seq_len) / peak_flops
        else:
            return
        found[(depth, seq_len)] = max(mfu, found.get((depth, seq_len), 0.0))

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            seq = node.get("seq_len", node.get("seq"))
            if "depth" in node and seq is not None and not node.get("oom", False):
                add(node["depth"], seq, "mfu", node.get("mfu"))
                add(node["depth"], seq, "tok_per_s", node.get("tok_per_s"))
                return
            for key, value in node.items():
                m = _FLAT_KEY.search(str(key))
                if m and isinstance(value, (int, float)):
                    add(m.group(1), m.group(2), m.group(3).lower(), value)
                else:
                    walk(value)

    walk(data)
    return Probe(found, source)


@dataclass(frozen=True)
class PlanInputs:
    card: Card
    hours: float = 24.0  # wall clock for the whole pipeline
    pretrain_share: float = 0.85  # of the hours; the rest: data stages, SFT, evals, margin (seeds: 80-90%)
    mfu: float = DEFAULT_MFU  # assumed where the probe measured nothing
    probe: Probe | None = None
    rule: ScalingRule = field(default_factory=ScalingRule)
    vocab_size: int = 32768
    aspect_ratio: int = 64
    head_dim: int = 128
    n_kv_head: int = 0  # 0 = no GQA
    window_pattern: str = "L"
    curriculum: tuple[tuple[float, int], ...] = DEFAULT_CURRICULUM
    depths: tuple[int, ...] = tuple(range(4, 33))
    # Of the card's memory the estimate may use. The estimate already counts the CUDA context and 5%
    # allocator fragmentation (daychat.plan.memory); the rest covers the estimate's own error.
    memory_fraction: float = 0.9
    max_device_batch: int = 64

    @property
    def pretrain_hours(self) -> float:
        return self.hours * self.pretrain_share


@dataclass(frozen=True)
class Phase:
    start: float  # fraction of the pretraining horizon
    seq_len: int
    hours: float
    tok_per_s: float
    mfu: float
    mfu_measured: bool
    tokens: float
    flops: float


@dataclass(frozen=True)
class Candidate:
    depth: int
    model_dim: int
    n_head: int
    n_kv_head: int
    params_matmul: int
    params_total: int
    phases: tuple[Phase, ...]
    tokens: float
    compute: float
    params_opt: float
    tokens_opt: float
    total_batch: int
    device_batch: int  # 0: does not fit the card even at one row of the shortest context
    memory_bytes: int
    memory_limit: int
    curriculum: tuple[tuple[float, int], ...]  # possibly shortened to fit memory
    checkpointing_would_fit: bool  # (only computed when nothing fits without activation checkpointing)

    @property
    def fits(self) -> bool:
        return self.device_batch > 0

    @property
    def distance(self) -> float:
        """|ln(N / N_opt)|: 0 = exactly compute-optimal."""
        return abs(math.log(self.params_matmul / self.params_opt))

    @property
    def max_seq_len(self) -> int:
        return max(s for _, s in self.curriculum)

    @property
    def accum_steps(self) -> int:
        return self.total_batch // (self.device_batch * self.max_seq_len) if self.fits else 0

    @property
    def steps(self) -> int:
        return int(self.tokens // self.total_batch)


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    candidates: tuple[Candidate, ...]
    chosen: Candidate

    def pretrain_section(self) -> dict:
        """The planned keys of params.yaml's pretrain section."""
        c, i = self.chosen, self.inputs
        return {
            "depth": c.depth, "aspect_ratio": i.aspect_ratio, "head_dim": i.head_dim, "n_kv_head": i.n_kv_head,
            "window_pattern": i.window_pattern, "horizon": "time", "budget_h": round(i.pretrain_hours, 2),
            "tokens": int(round(c.tokens, -7)),
            "total_batch": c.total_batch, "device_batch": c.device_batch,
            "seq_len": [[float(f), int(s)] for f, s in c.curriculum],
        }

    def summary(self) -> dict:
        """Flat numbers for reports/metrics/plan.json."""
        c = self.chosen
        return {"card": self.inputs.card.key, "hours": self.inputs.hours, "pretrain_hours": self.inputs.pretrain_hours,
                "depth": c.depth, "model_dim": c.model_dim, "params_matmul": c.params_matmul,
                "params_total": c.params_total, "tokens": c.tokens, "compute": c.compute,
                "params_opt": c.params_opt, "tokens_opt": c.tokens_opt, "tokens_per_param": c.tokens / c.params_matmul,
                "total_batch": c.total_batch, "device_batch": c.device_batch, "accum_steps": c.accum_steps,
                "max_seq_len": c.max_seq_len, "memory_gib": c.memory_bytes / GIB, "steps": c.steps,
                "mfu_measured": any(p.mfu_measured for p in c.phases)}


def _config(inputs: PlanInputs, depth: int, max_seq_len: int) -> GPTConfig:
    # bf16 embeddings: what pretrain.embedding_dtype auto gives on a CUDA card
    return GPTConfig(vocab_size=inputs.vocab_size, sequence_len=max_seq_len, depth=depth,
                     aspect_ratio=inputs.aspect_ratio, head_dim=inputs.head_dim,
                     n_kv_head=inputs.n_kv_head or None, window_pattern=inputs.window_pattern, embedding_dtype="bf16")


def _phases(inputs: PlanInputs, cfg: GPTConfig, curriculum) -> tuple[Phase, ...]:
    peak = inputs.card.bf16_flops
    phases = []
    ends = [f for f, _ in curriculum[1:]] + [1.0]
    for (start, seq_len), end in zip(curriculum, ends):
        measured = inputs.probe.lookup(cfg.depth, seq_len) if inputs.probe else None
        mfu = inputs.mfu if measured is None else measured
        fpt = flops_per_token(cfg, seq_len)
        tok_s = mfu * peak / fpt
        hours = inputs.pretrain_hours * (end - start)
        tokens = tok_s * hours * 3600
        phases.append(Phase(start, seq_len, hours, tok_s, mfu, measured is not None, tokens, tokens * fpt))
    return tuple(phases)


def _fit_memory(inputs: PlanInputs, depth: int, total_batch: int, curriculum):
    """(device_batch, memory_bytes, curriculum) for the largest micro-batch that fits, shortening the
    curriculum's longest context while nothing fits; device_batch 0 when nothing fits at all."""
    from daychat.plan.memory import estimate_memory

    limit = int(inputs.memory_fraction * inputs.card.memory_bytes)
    seqs = sorted({s for _, s in curriculum}, reverse=True)
    smallest = None
    for max_seq in seqs:
        kept = tuple((f, s) for f, s in curriculum if s <= max_seq)
        cfg = _config(inputs, depth, max_seq)
        rows = min(inputs.max_device_batch, total_batch // max_seq)
        while rows >= 1:
            if total_batch % (rows * max_seq) == 0:
                est = estimate_memory(cfg, rows, max_seq, precision="bf16", compile=True)
                if est.total_bytes <= limit:
                    return rows, int(est.total_bytes), kept
                smallest = int(est.total_bytes)
            rows //= 2
    return 0, smallest or 0, curriculum


def evaluate_depth(inputs: PlanInputs, depth: int) -> Candidate:
    """Throughput, tokens, compute, the optimal size at that compute, batch and memory for one depth."""
    curriculum = tuple((float(f), int(s)) for f, s in inputs.curriculum)
    max_seq = max(s for _, s in curriculum)
    cfg = _config(inputs, depth, max_seq)
    phases = _phases(inputs, cfg, curriculum)
    compute = sum(p.flops for p in phases)
    total_batch = batch_for_compute(compute)
    device_batch, memory, fitted = _fit_memory(inputs, depth, total_batch, curriculum)
    checkpointing = False
    if device_batch == 0:
        from daychat.plan.memory import estimate_memory

        shortest = min(s for _, s in curriculum)
        est = estimate_memory(_config(inputs, depth, shortest), 1, shortest, precision="bf16", compile=True,
                              activation_checkpointing=True)
        checkpointing = est.total_bytes <= inputs.memory_fraction * inputs.card.memory_bytes
    elif fitted != curriculum:  # a shorter longest context: its own (faster) phases
        phases = _phases(inputs, _config(inputs, depth, max(s for _, s in fitted)), fitted)
        compute = sum(p.flops for p in phases)
    counts = param_counts(cfg)
    return Candidate(
        depth=depth, model_dim=cfg.model_dim, n_head=cfg.n_head, n_kv_head=cfg.kv_heads,
        params_matmul=counts["matmul"], params_total=counts["total"], phases=phases,
        tokens=sum(p.tokens for p in phases), compute=compute, params_opt=inputs.rule.params(compute),
        tokens_opt=inputs.rule.tokens(compute), total_batch=total_batch, device_batch=device_batch,
        memory_bytes=memory, memory_limit=int(inputs.memory_fraction * inputs.card.memory_bytes),
        curriculum=fitted, checkpointing_would_fit=checkpointing)


def make_plan(inputs: PlanInputs) -> Plan:
    if not 0.0 < inputs.pretrain_share <= 1.0:
        raise ValueError(f"pretrain_share must be in (0, 1], got {inputs.pretrain_share}")
    if inputs.hours <= 0:
        raise ValueError(f"hours must be > 0, got {inputs.hours}")
    candidates = tuple(evaluate_depth(inputs, d) for d in sorted(set(inputs.depths)))
    feasible = [c for c in candidates if c.fits]
    if not feasible:
        raise ValueError(f"no depth in {min(inputs.depths)}..{max(inputs.depths)} fits {inputs.card.memory_gib:g} GiB "
                         f"at {inputs.memory_fraction:.0%} (even one row of the shortest context)")
    chosen = min(feasible, key=lambda c: (round(c.distance, 9), c.depth))
    return Plan(inputs, candidates, chosen)
