"""Rehearse a recipe: run every GPU phase once at its real shapes, with random weights, on whatever device is
here; measure each one's peak memory and time; set them against the memory model and the card.

    python -m daychat.plan.rehearse --params params.yaml --card rtx4090 \\
        --out reports/rehearse.md --metrics reports/metrics/rehearse.json [--tokenizer models/tokenizer]

A day of someone's card is lost when a phase that runs hours in (the first CORE proxy, the first SFT
validation, GSM8K generation) needs more memory than the training step that was checked. So every phase
the recipe runs is listed, estimated for the card (daychat.plan.memory, bf16 + compile as the stages run),
and run here once with the code the stages use:

    pretrain   train step and optimizer step at every seq_len of the curriculum (Trainer.train_step:
               gradient accumulation, autocast, torch.compile on CUDA), val bpb (device_batch rows of the
               longest seq_len beside the optimizer state), the CORE proxy (batches of the budget the
               preflight gives it, rows as long as the bundle's longest prompt, beside the optimizer state)
    core_eval  CORE scoring beside the model alone
    sft        train and optimizer step at sft.device_batch x sft.seq_len (half the targets masked, as
               conversations are), the validation loss
    chat_eval  letter scoring (the answer position's label columns), generation with the KV cache
               (the longest GSM8K-like prompt, then max_new_tokens decoding steps)

Each phase runs in its own child process (daychat.plan.measure): its peak is its own, and an
out-of-memory error is a row of the table, not the end of the rehearsal. On CUDA the model is the
recipe's; the measured max_memory_allocated is set against the estimate's allocated bytes. On a CPU the
same shapes run in fp32 eager (the CPU's precision), estimated for the CPU; when a phase would not fit this
machine's memory or its time budget, the depth is lowered first, then the micro-batch, and the table says
so: the width, vocabulary, sequence lengths and batch budgets stay the recipe's.

The longest prompts: the CORE bundle's (core_eval.source resolved as the stage does, or --bundle) and the
chat eval data's (--chat-data, default: what chat_eval.source resolves to), in tokens of --tokenizer when
given (the pipeline's models/tokenizer once it exists), else bounded by their UTF-8 bytes (a byte-level BPE
token covers at least one byte; the table says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daychat.model.gpt import ROTARY_HEADROOM, GPTConfig
from daychat.plan import memory as mem
from daychat.plan.memory import GiB, Phase

# On a CPU: a phase's fp32 estimate must fit in this share of the memory available when the rehearsal
# starts, and its measured run should take about this long at most; deeper models are rehearsed shallower.
CPU_MEMORY_SHARE = 0.6
CPU_PHASE_SECONDS = 240.0
# A CPU's fp32 matmul throughput, for sizing the rehearsal to its time budget (measured 40-110 GFLOP/s on
# the 2-core dev machines with 1-2 threads; the lower end, so that phases come in under budget).
CPU_FLOPS = 40e9
# Tokens of the chat eval's GSM8K prompt when no data is at hand: GSM8K questions are ~100-250 tokens; the
# prefill is sized at the whole context anyway (the engine's cache is).
SCORED_SPAN = 32  # tokens scored per CORE row (a continuation); the head's share of a batch is small
LETTER_COLUMNS = 16  # vocabulary columns letter scoring reads (stages/chat_eval.py's bound)


def _rows(job: "Job") -> int:
    """Rows of a scoring batch: as many rows of the longest width as the token budget holds (at least one,
    at most the items there are)."""
    rows = max(1, max(job.tokens, job.width) // job.width)
    return min(rows, job.items) if job.items else rows


def _span(job: "Job") -> int:
    return min(SCORED_SPAN, job.width - 1)


@dataclass
class Job:
    """One child process: a kind of work at a shape, producing one or more measured phases."""

    stage: str
    kind: str  # train | val | score | letters | generate
    config: dict  # GPTConfig fields
    phases: list[str]  # the phase names it measures, in order
    rows: int = 0
    seq_len: int = 0
    tokens: int = 0  # scoring batch (tokens)
    width: int = 0  # scoring row width (the longest prompt)
    items: int = 0  # score: sequences to score (0 = two batches' worth)
    prompt: int = 0  # generation prompt tokens
    new_tokens: int = 0
    static: str = "model"  # model (weights) | training (weights + optimizer state)
    precision: str = "auto"
    compile: bool = True
    activation_checkpointing: bool = False
    ema: bool = False
    fp8: bool = False
    masked: bool = False  # SFT rows: half the targets are -1
    device: str = "cpu"
    threads: int = 0
    reduced: list[str] = field(default_factory=list)  # what this machine could not hold of the recipe

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(**self.config)


# ----------------------------------------------------------------------------------------------------------
# What the recipe runs, and what the model estimates for it


@dataclass
class Shapes:
    """The recipe's GPU work, read from its params and data."""

    config: GPTConfig
    curriculum: list[int]
    device_batch: int
    pretrain: Any
    sft: Any
    core_eval: Any
    chat_eval: Any
    core_longest: int  # tokens of the longest CORE sequence (the proxy's items / the full bundle's)
    proxy_longest: int
    chat_longest: int  # tokens of the longest letter-choice prompt
    gsm8k_prompt: int
    lengths_from: str  # "tokenizer <path>" or "UTF-8 bytes (upper bound)"


def estimates(shapes: Shapes, card_bytes: int, device: str = "cuda") -> list[tuple[Job, list[Phase]]]:
    """Every phase of the recipe as a Job, with the memory model's estimate for `device` (cuda: the card's
    precision, bf16 + compile as the stages run; cpu: fp32 eager) at the shapes the card gets."""
    from daychat.plan.preflight import CPU_SCORING_TOKENS

    p, s, c = shapes.pretrain, shapes.sft, shapes.config
    cfg = dataclasses.asdict(c)
    ema = p.ema_halflife_tokens > 0
    prec = "bf16" if device == "cuda" else "fp32"
    jobs: list[tuple[Job, list[Phase]]] = []

    def budget(static: dict, longest: int, margin: float, knob: int, columns: int | None = None) -> int:
        # what the stage's preflight gives this phase on the card (daychat.plan.preflight.scoring_batch)
        if knob:
            return knob
        usable = card_bytes * (1 - margin)
        return mem.scoring_batch_tokens(c, usable, static=static, precision="bf16", device="cuda",
                                        longest=longest, columns=columns) or CPU_SCORING_TOKENS

    rows_at = {t: shapes.device_batch * max(shapes.curriculum) // t for t in shapes.curriculum}
    for t in sorted(shapes.curriculum):
        job = Job("pretrain", "train", cfg, [f"train step T={t}", f"optimizer step T={t}"], rows=rows_at[t],
                  seq_len=t, static="training", precision=p.precision, compile=p.compile,
                  activation_checkpointing=p.activation_checkpointing, ema=ema, fp8=p.fp8, device=device)
        phases = mem.training_phases(c, rows_at[t], t, precision=p.precision, compile=p.compile,
                                     activation_checkpointing=p.activation_checkpointing, device=device, ema=ema)
        jobs.append((job, phases))
    in_training = mem.in_training_static(c, ema)
    T = max(shapes.curriculum)
    jobs.append((Job("pretrain", "val", cfg, ["val bpb"], rows=shapes.device_batch, seq_len=T, static="training",
                     ema=ema, device=device),
                 [mem.scoring_phase("val bpb", c, shapes.device_batch * T, static=in_training, precision=prec,
                                    device=device)]))
    if p.core_source:
        tokens = budget(in_training, shapes.proxy_longest, p.memory_margin, 0)
        n = max(tokens, shapes.proxy_longest)
        jobs.append((Job("pretrain", "score", cfg, ["CORE proxy"], tokens=tokens, width=shapes.proxy_longest,
                         static="training", ema=ema, device=device),
                     [mem.scoring_phase("CORE proxy", c, n, static=in_training, precision=prec, device=device,
                                        scored=n)]))
    weights = mem.model_bytes(c)
    tokens = budget(weights, shapes.core_longest, shapes.core_eval.memory_margin, shapes.core_eval.batch_tokens)
    n = max(tokens, shapes.core_longest)
    jobs.append((Job("core_eval", "score", cfg, ["CORE scoring"], tokens=tokens, width=shapes.core_longest,
                     device=device),
                 [mem.scoring_phase("CORE scoring", c, n, static=weights, precision=prec, device=device, scored=n)]))
    job = Job("sft", "train", cfg, ["sft train step", "sft optimizer step"], rows=s.device_batch, seq_len=s.seq_len,
              static="training", precision=s.precision, compile=s.compile, masked=True, device=device)
    jobs.append((job, mem.training_phases(c, s.device_batch, s.seq_len, precision=s.precision, compile=s.compile,
                                          device=device, prefix="sft ")))
    sft_static = mem.in_training_static(c)
    jobs.append((Job("sft", "val", cfg, ["sft val loss"], rows=s.device_batch, seq_len=s.seq_len, static="training",
                     masked=True, device=device),
                 [mem.scoring_phase("sft val loss", c, s.device_batch * s.seq_len, static=sft_static,
                                    precision=prec, device=device)]))
    ce = shapes.chat_eval
    if any(t != "gsm8k" for t in ce.tasks):
        tokens = budget(weights, shapes.chat_longest, ce.memory_margin, ce.batch_tokens, LETTER_COLUMNS)
        n = max(tokens, shapes.chat_longest)
        jobs.append((Job("chat_eval", "letters", cfg, ["letter scoring"], tokens=tokens, width=shapes.chat_longest,
                         device=device),
                     [mem.scoring_phase("letter scoring", c, n, static=weights, precision=prec, device=device,
                                        scored=n // shapes.chat_longest, columns=LETTER_COLUMNS)]))
    if "gsm8k" in ce.tasks:
        prompt = min(shapes.gsm8k_prompt, c.sequence_len - 1)
        jobs.append((Job("chat_eval", "generate", cfg, ["generation"], prompt=prompt,
                         new_tokens=min(ce.max_new_tokens, c.sequence_len - prompt), device=device),
                     [mem.generation_phase(c, c.sequence_len, static=weights, precision=prec, device=device)]))
    return jobs


def fit_to_cpu(job: Job, available: float, threads: int) -> tuple[Job, list[Phase]]:
    """The job as this CPU can run it: fp32 eager, and shallower (then fewer rows) when the recipe's shapes
    would exceed CPU_MEMORY_SHARE of `available` bytes or CPU_PHASE_SECONDS. Returns the job and its CPU
    estimate."""
    fp8 = job.fp8
    job = dataclasses.replace(job, device="cpu", precision="fp32", compile=False, fp8=False, threads=threads,
                              reduced=list(job.reduced))
    if fp8:
        job.reduced.append("FP8 off (CPU)")
    depth0, width = job.config["depth"], job.gpt_config().model_dim
    while True:
        phases = cpu_estimate(job)
        peak = max(ph.total_bytes for ph in phases)
        fits = peak <= CPU_MEMORY_SHARE * available and job_seconds(job) <= CPU_PHASE_SECONDS
        if fits:
            break
        if job.config["depth"] > 1:
            # model_dim = depth x aspect_ratio rounded up to head_dim: keep the recipe's width while removing
            # layers (width // depth rounds up to exactly the width while depth <= head_dim)
            depth = job.config["depth"] - 1
            job.config = {**job.config, "depth": depth, "aspect_ratio": width // depth}
        elif job.rows > 1:
            job.rows //= 2
            job.reduced.append(f"rows {job.rows * 2} -> {job.rows}")
        elif job.kind in ("score", "letters") and job.tokens > job.width:
            job.tokens = max(job.width, job.tokens // 2)
            job.reduced.append(f"batch {job.tokens * 2:,} -> {job.tokens:,} tokens")
        else:
            break
    if job.config["depth"] != depth0:
        job.reduced.insert(0, f"depth {depth0} -> {job.config['depth']} (width kept)")
    return job, phases


def cpu_estimate(job: Job) -> list[Phase]:
    """The memory model's CPU (fp32 eager) estimate of a job as it will run here."""
    c = job.gpt_config()
    static = mem.in_training_static(c, job.ema) if job.static == "training" else mem.model_bytes(c)
    if job.kind == "train":
        return mem.training_phases(c, job.rows, job.seq_len, precision="fp32", compile=False,
                                   activation_checkpointing=job.activation_checkpointing, device="cpu", ema=job.ema)
    if job.kind == "val":
        return [mem.scoring_phase(job.phases[0], c, job.rows * job.seq_len, static=static, precision="fp32",
                                  device="cpu")]
    if job.kind in ("score", "letters"):
        rows = _rows(job)
        scored = rows * _span(job) if job.kind == "score" else rows
        return [mem.scoring_phase(job.phases[0], c, rows * job.width, static=static, precision="fp32", device="cpu",
                                  scored=scored, columns=LETTER_COLUMNS if job.kind == "letters" else None)]
    return [mem.generation_phase(c, c.sequence_len, static=static, precision="fp32", device="cpu")]


def job_seconds(job: Job) -> float:
    """A rough CPU time for a job, from its matmul FLOPs at CPU_FLOPS (for sizing, not for reporting)."""
    from daychat.model.accounting import flops_per_token

    c = job.gpt_config()
    if job.kind == "train":
        return 2 * job.rows * job.seq_len * flops_per_token(c, job.seq_len) / CPU_FLOPS  # 2 full micro-batches
    if job.kind == "val":
        return 2 * job.rows * job.seq_len * flops_per_token(c, job.seq_len) / 3 / CPU_FLOPS  # forward only
    if job.kind in ("score", "letters"):
        return 2 * max(job.tokens, job.width) * flops_per_token(c, job.width) / 3 / CPU_FLOPS
    return (job.prompt + job.new_tokens) * flops_per_token(c, job.prompt) / 3 / CPU_FLOPS


# ----------------------------------------------------------------------------------------------------------
# Running a job (in the child process)


def run_job(job: Job) -> dict[str, Any]:
    """Run `job` here; {phase name: {"peak_bytes", "seconds"}} plus "reserved_bytes" on CUDA."""
    import torch

    from daychat.model import GPT
    from daychat.model.fp8 import convert_to_fp8
    from daychat.optim import build_optimizers
    from daychat.plan.measure import Meter
    from daychat.train.loop import accumulate_gradients
    from daychat.train.schedule import BatchPlan

    # Everything the phases import, imported before the baseline: module objects are not the phase's memory.
    import daychat.eval.core  # noqa: F401
    import daychat.train.ema  # noqa: F401
    import daychat.train.evaluate  # noqa: F401
    import daychat.plan.probe  # noqa: F401

    device = torch.device(job.device)
    if job.threads and device.type == "cpu":
        torch.set_num_threads(job.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    _warm_up(device)
    meter = Meter(device)  # the baseline: before the model, which is measured too
    config = job.gpt_config()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():  # random weights everywhere (zero-initialised projections would make some work trivial)
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    model.activation_checkpointing = job.activation_checkpointing
    if job.fp8:
        convert_to_fp8(model)
    results: dict[str, Any] = {}
    if job.kind == "train" or job.static == "training":
        trainer = _trainer(job, model, device, build_optimizers)
        # One step first, so that the optimizer state (and the EMA) exist, as at any later step. On CUDA at
        # the real shape (it compiles the graph the measured step then reuses); on a CPU, where nothing
        # compiles, one short row is enough.
        if device.type == "cuda" and job.kind == "train":
            trainer.plan = BatchPlan(total_batch=job.rows * job.seq_len, device_batch=job.rows, max_seq_len=job.seq_len)
        else:  # an evaluation beside the optimizer state: the state's size does not depend on the batch
            trainer.plan = BatchPlan(total_batch=16, device_batch=1, max_seq_len=16)
        trainer.train_step(trainer.plan.max_seq_len)
    if job.kind == "train":
        # The measured step, as Trainer.train_step runs it: two micro-batches (the second's backward runs
        # with the first's gradients held), then the optimizer step; each its own peak.
        model.train()
        batches = (trainer.batches.next_batch(job.rows, job.seq_len) for _ in range(2))
        meter.reset()
        t0 = time.perf_counter()
        accumulate_gradients(trainer.forward, batches, 2, trainer.autocast)
        results[job.phases[0]] = {"peak_bytes": meter.peak(), "seconds": _elapsed(t0, device)}
        meter.reset()
        t0 = time.perf_counter()
        for opt in trainer.optimizers:
            opt.step()
        results[job.phases[1]] = {"peak_bytes": meter.peak(), "seconds": _elapsed(t0, device)}
    else:
        model.eval()
        meter.reset()
        t0 = time.perf_counter()
        _eval_work(job, model, device)
        results[job.phases[0]] = {"peak_bytes": meter.peak(), "seconds": _elapsed(t0, device)}
    results["reserved_bytes"] = meter.reserved()
    return results


def _warm_up(device) -> None:
    """A tiny forward and backward, so that libraries, kernels and thread pools are in the baseline."""
    import torch

    from daychat.model import GPT

    from daychat.eval.scoring import losses_at
    from daychat.model.gpt import KVCache

    tiny = GPT(GPTConfig(vocab_size=256, sequence_len=32, depth=1, aspect_ratio=32, head_dim=32)).to(device)
    tiny.init_weights()
    ids = torch.randint(0, 256, (1, 32), device=device)
    tiny(ids, ids).backward()
    with torch.no_grad():  # the evaluation kernels too (no-grad attention, the chunked head, the cache)
        losses_at(tiny, ids, ids, predictions=True)
        tiny.head(tiny.hidden(ids[:, :8], kv_cache=KVCache(32)))
    del tiny
    import gc

    gc.collect()


def _elapsed(t0: float, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _trainer(job: Job, model, device, build_optimizers):
    from daychat.plan.probe import RandomBatches
    from daychat.train.ema import EMA
    from daychat.train.loop import LoopSettings, Trainer
    from daychat.train.schedule import BatchPlan, Horizon, Schedule

    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5,
                                  weight_decay=0.2)
    rows, seq_len = job.rows or 1, job.seq_len or 16  # an evaluation job only needs the optimizer state
    plan = BatchPlan(total_batch=2 * rows * seq_len, device_batch=rows, max_seq_len=seq_len)
    schedule = Schedule(Horizon("tokens", tokens=plan.total_batch * 4), curriculum=((0.0, seq_len),))
    source = MaskedBatches(model.config.vocab_size, device) if job.masked else RandomBatches(model.config.vocab_size, device)
    return Trainer(model, optimizers, source, schedule, plan,
                   LoopSettings(device=device, precision=job.precision, compile=job.compile),
                   ema=EMA(model, 0.999) if job.ema else None)


class MaskedBatches:
    """Random SFT-like rows: every other target ignored (-1), as a conversation's user turns are."""

    def __init__(self, vocab_size: int, device):
        from daychat.plan.probe import RandomBatches

        self.inner = RandomBatches(vocab_size, device)

    def next_batch(self, rows: int, seq_len: int):
        x, y = self.inner.next_batch(rows, seq_len)
        y = y.clone()
        y[:, ::2] = -1
        return x, y

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _eval_work(job: Job, model, device) -> None:
    """The evaluation phases, through the functions the stages call."""
    import torch

    from daychat.eval.core import Scorable, span_scores
    from daychat.eval.scoring import logits_at
    from daychat.model.gpt import KVCache
    from daychat.train.evaluate import evaluate_bpb
    from daychat.train.loop import autocast_for

    c = model.config
    gen = torch.Generator(device="cpu").manual_seed(0)
    autocast = autocast_for(device, "auto")
    if job.kind == "val":
        batches = []
        for _ in range(2):
            tokens = torch.randint(0, c.vocab_size, (job.rows, job.seq_len + 1), generator=gen).to(device)
            x, y = tokens[:, :-1], tokens[:, 1:].clone()
            if job.masked:
                y[:, ::2] = -1
            batches.append((x, y))
        evaluate_bpb(model, batches, torch.ones(c.vocab_size, dtype=torch.long, device=device), autocast)
    elif job.kind == "score":
        rows, span = _rows(job), _span(job)
        items = [Scorable([torch.randint(0, c.vocab_size, (job.width,), generator=gen).tolist()],
                          [job.width - span], [job.width], 0) for _ in range(job.items or 2 * rows)]
        span_scores(model, items, pad_id=0, device=device, batch_tokens=job.tokens)
    elif job.kind == "letters":
        rows = _rows(job)
        for _ in range(2):
            ids = torch.randint(0, c.vocab_size, (rows, job.width), generator=gen).to(device)
            where = (torch.arange(rows, device=device), torch.full((rows,), job.width - 1, device=device))
            with autocast():
                logits_at(model, ids, where, torch.arange(LETTER_COLUMNS, device=device))
    elif job.kind == "generate":
        # as daychat.chat.engine.Engine: a cache for the whole context, the prompt's prefill, one token a step
        cache = KVCache(c.sequence_len)
        ids = torch.randint(0, c.vocab_size, (1, job.prompt), generator=gen).to(device)
        with torch.inference_mode(), autocast():
            for _ in range(job.new_tokens + 1):
                logits = model.head(model.hidden(ids, kv_cache=cache)[0, -1:])
                ids = logits.argmax(-1, keepdim=True)
    else:
        raise ValueError(f"unknown job kind {job.kind!r}")


# ----------------------------------------------------------------------------------------------------------
# The parent: shapes from params and data, children, the table


LENGTH_KEYS = ("core_longest", "proxy_longest", "chat_longest", "gsm8k_prompt", "lengths_from")


def recipe_shapes(params_path: str, *, tokenizer: str | None, bundle: str | None, chat_data: str | None,
                  cache: str = ".cache", lengths: str | None = None, longest_only: bool = False) -> Shapes:
    """Read the recipe and the data it will evaluate on: every shape the phases need. `lengths`: a metrics
    file of an earlier rehearsal to take the longest prompts from (a GPU machine has no data to measure
    them on); `longest_only`: rehearse the curriculum's longest seq_len only (the training peak)."""
    from daychat.errors import UserError
    from daychat.eval.bundle import load_bundle, resolve as resolve_bundle
    from daychat.eval.core import longest_prompt_bound, longest_sequence
    from daychat.params import parse_section, read_params

    raw = read_params(params_path)
    sections = {name: parse_section(name, raw.get(name)) for name in
                ("tokenizer", "pretrain", "sft", "core_eval", "chat_eval")}
    p = sections["pretrain"]
    curriculum = sorted({t for _, t in p.curriculum()})
    # The card's model (bf16 embeddings under embedding_dtype auto); the CPU children build the same one.
    config = p.model_config(sections["tokenizer"].vocab_size, max(curriculum), "cuda")
    rehearsed = curriculum[-1:] if longest_only else curriculum
    if lengths:
        try:
            known = json.loads(Path(lengths).read_text(encoding="utf-8"))
            got = {key: known[key] for key in LENGTH_KEYS}
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--lengths {lengths}: not an earlier rehearsal's metrics ({type(e).__name__}: {e})") from None
        return Shapes(config=config, curriculum=rehearsed, device_batch=p.device_batch, pretrain=p,
                      sft=sections["sft"], core_eval=sections["core_eval"], chat_eval=sections["chat_eval"],
                      **{**got, "lengths_from": f"{got['lengths_from']}, as measured in {lengths}"})
    tok = None
    if tokenizer:
        from daychat.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer)
    ce = sections["core_eval"]
    try:
        root = Path(bundle) if bundle else resolve_bundle(ce.source, f"{cache}/eval_bundle", path=ce.path, url=ce.url,
                                                         sha256=ce.sha256, retries=ce.retries, timeout_s=ce.timeout_s)
    except UserError as e:
        raise UserError(f"rehearse: the CORE bundle is needed for its longest prompts ({e}); pass --bundle DIR") from None
    tasks = load_bundle(root)
    limit = ROTARY_HEADROOM * config.sequence_len

    def longest(max_per_task: int) -> int:
        if tok is not None:
            return min(max(longest_sequence(tasks, tok, max_per_task).values()), limit)
        return min(longest_prompt_bound(tasks, max_per_task), limit)

    chat_longest, gsm8k = _chat_lengths(sections["chat_eval"], tok, chat_data, cache)
    return Shapes(config=config, curriculum=rehearsed, device_batch=p.device_batch, pretrain=p, sft=sections["sft"],
                  core_eval=ce, chat_eval=sections["chat_eval"], core_longest=longest(ce.max_per_task),
                  proxy_longest=longest(p.core_max_per_task) if p.core_source else 0,
                  chat_longest=min(chat_longest, config.sequence_len), gsm8k_prompt=gsm8k,
                  lengths_from=f"tokenizer {tokenizer}" if tok else "UTF-8 bytes + special tokens (upper bound)")


def _chat_lengths(p, tok, folder: str | None, cache: str) -> tuple[int, int]:
    """(longest letter-choice prompt, longest GSM8K prompt) in tokens (or the byte bound without a tokenizer)."""
    from daychat.errors import UserError
    from daychat.eval.chat import choice_conversation, load_tasks, resolve, select

    try:
        root = Path(folder) if folder else resolve(p.source, f"{cache}/chat_eval", path=p.path, url=p.url,
                                                    tasks=p.tasks, retries=p.retries, timeout_s=p.timeout_s)
    except UserError as e:
        raise UserError(f"rehearse: the chat eval data is needed for its longest prompts ({e}); pass --chat-data DIR") from None
    lengths = {"choice": 1, "generate": 1}
    for task in load_tasks(root, p.tasks):
        for item in select(task.items, p.max_items, p.seed):
            messages = choice_conversation(item) if task.kind == "choice" else [{"role": "user", "content": item["question"]}]
            lengths[task.kind] = max(lengths[task.kind], _prompt_tokens(messages, tok))
    return lengths["choice"], lengths["generate"]


def _prompt_tokens(messages: list[dict], tok) -> int:
    if tok is not None:
        from daychat.chat.format import render_prompt

        return len(render_prompt(messages, tok))
    text = sum(len(str(m["content"]).encode("utf-8")) for m in messages)
    return text + 4 * len(messages) + 2  # BOS, each turn's start and end tokens, the assistant start


def rehearse(shapes: Shapes, card, *, device: str, timeout_s: float, threads: int, margin: float = 0.05,
             only: list[str] | None = None, budget_s: float | None = None, after_job=None,
             say=print) -> dict[str, Any]:
    """Estimate every phase for the card, run each on `device` (fitted to a CPU), compare. The report dict.
    `budget_s` bounds the whole run (a job that would start past it is recorded as skipped, not run);
    `after_job(report)` gets the report so far after each job (a run cut off keeps what it measured)."""
    deadline = time.monotonic() + budget_s if budget_s else None
    card_bytes = card.memory_bytes
    planned = estimates(shapes, card_bytes, "cuda")
    if only:
        planned = [(job, phases) for job, phases in planned if any(o in name for o in only for name in job.phases)]
    available = _available_bytes() if device == "cpu" else None
    rows = []
    for n, (job, card_phases) in enumerate(planned, 1):
        if device == "cpu":
            run, here = fit_to_cpu(job, available, threads)
        else:
            run, here = dataclasses.replace(job, device=device), card_phases
        say(f"rehearse: [{n}/{len(planned)}] {job.stage}: {', '.join(job.phases)}"
            + (f" ({'; '.join(run.reduced)})" if run.reduced else ""))
        left = deadline - time.monotonic() if deadline else timeout_s
        measured = _run(run, min(timeout_s, left)) if left >= 10 else {"error": "skipped: the time budget ran out"}
        for name, on_card, est in zip(job.phases, card_phases, here):
            m = measured.get(name) if "error" not in measured else None
            peak = m["peak_bytes"] if m else None
            compare = est.total_bytes - (est.slack if device == "cuda" else 0)  # CUDA: allocated, no context
            rows.append({
                "stage": job.stage, "phase": name, "shape": on_card.shape,
                "card_estimate_gib": on_card.total_bytes / GiB,
                "card_fits": on_card.total_bytes <= card_bytes * (1 - margin),
                "card_breakdown_gib": {k: v / GiB for k, v in {**on_card.static, **on_card.dynamic}.items()},
                "run_config": {"depth": run.config["depth"], "model_dim": run.gpt_config().model_dim,
                               "rows": run.rows, "seq_len": run.seq_len, "tokens": run.tokens, "width": run.width,
                               "prompt": run.prompt, "new_tokens": run.new_tokens, "precision": run.precision},
                "reduced": run.reduced,
                "estimate_gib": compare / GiB,
                "measured_gib": peak / GiB if peak is not None else None,
                "error": (compare / peak - 1) if peak else None,
                "seconds": m["seconds"] if m else None,
                "failure": measured.get("error") if "error" in measured else None,
                "oom": bool(measured.get("oom")),
            })
        if after_job:
            after_job(_report(shapes, card, card_bytes, margin, device, list(rows)))
    return _report(shapes, card, card_bytes, margin, device, rows)


def _report(shapes: Shapes, card, card_bytes: int, margin: float, device: str, rows: list[dict]) -> dict[str, Any]:
    return {"card": card.key, "card_gib": card_bytes / GiB, "margin": margin, "device": _device_name(device),
            "lengths_from": shapes.lengths_from, "core_longest": shapes.core_longest,
            "proxy_longest": shapes.proxy_longest, "chat_longest": shapes.chat_longest,
            "gsm8k_prompt": shapes.gsm8k_prompt, "config": dataclasses.asdict(shapes.config), "phases": rows}


def _run(job: Job, timeout_s: float) -> dict:
    from daychat.plan.measure import run_child

    return run_child("daychat.plan.rehearse", {"job": dataclasses.asdict(job)}, device=job.device,
                     timeout_s=timeout_s, threads=job.threads)


def _available_bytes() -> int:
    text = Path("/proc/meminfo").read_text()
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * GiB


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def markdown(report: dict) -> str:
    """reports/rehearse.md: the card's estimates, and what this machine measured for the same shapes."""
    cfg = GPTConfig(**report["config"])
    worst = max((abs(r["error"]) for r in report["phases"] if r["error"] is not None), default=None)
    lines = [
        "# Rehearsal: every GPU phase of the recipe, at its shapes",
        "",
        f"Recipe: d{cfg.depth} (model_dim {cfg.model_dim}, vocab {cfg.vocab_size:,}, context {cfg.sequence_len:,}); "
        f"card: {report['card']} ({report['card_gib']:.1f} GiB, {report['margin']:.0%} kept free). "
        f"Ran on: {report['device']}. Written by `make rehearse` (`python -m daychat.plan.rehearse`).",
        "",
        f"Longest prompts ({report['lengths_from']}): CORE {report['core_longest']:,} tokens (the proxy's "
        f"{report['proxy_longest']:,}), chat letter choice {report['chat_longest']:,}, GSM8K {report['gsm8k_prompt']:,}. "
        "CORE prompts are scored uncropped, as the reference scores them." + (f" {report['note']}" if report.get("note") else ""),
        "",
        "| stage | phase | shape on the card | estimate on the card (GiB) | fits | rehearsed here as | estimate here (GiB) | measured (GiB) | error | time (s) |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in report["phases"]:
        rc = r["run_config"]
        here = f"d{rc['depth']} x {rc['model_dim']}, {rc['precision']}"
        if r["reduced"]:
            here += " (" + "; ".join(r["reduced"]) + ")"
        measured = f"{r['measured_gib']:.2f}" if r["measured_gib"] is not None else ("OOM" if r["oom"] else "failed")
        error = f"{r['error']:+.1%}" if r["error"] is not None else "-"
        seconds = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        lines.append(f"| {r['stage']} | {r['phase']} | {r['shape']} | {r['card_estimate_gib']:.2f} | "
                     f"{'yes' if r['card_fits'] else '**no**'} | {here} | {r['estimate_gib']:.2f} | {measured} | "
                     f"{error} | {seconds} |")
    failures = [r for r in report["phases"] if r["failure"]]
    lines += ["", f"Largest |estimate / measured - 1| here: {worst:.1%}." if worst is not None else "",
              "On a CUDA card the comparison is the estimate's allocated bytes (the CUDA context and the allocator's "
              "fragmentation margin left out) against torch.cuda.max_memory_allocated; on a CPU, the fp32 eager "
              "estimate against the resident-set high-water mark (daychat/plan/measure.py)."]
    if failures:
        lines += ["", "Failed phases:", *(f"- {r['stage']} {r['phase']}: {r['failure']}" for r in failures)]
    return "\n".join(line for line in lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from daychat.cli import status
    from daychat.errors import UserError
    from daychat.io import write_metrics, write_text
    from daychat.plan.cards import CARDS, get_card

    args = parse_args(argv)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.card is None:  # the recipe's own plan.card, as the plan stage reads it
        from daychat.params import parse_section, read_params

        args.card = parse_section("plan", read_params(args.params).get("plan")).card
    try:
        card = get_card(args.card)
    except KeyError as e:
        raise UserError(f"--card: {e.args[0]} (known: {', '.join(CARDS)})") from None
    shapes = recipe_shapes(args.params, tokenizer=args.tokenizer, bundle=args.bundle, chat_data=args.chat_data,
                           cache=args.cache, lengths=args.lengths, longest_only=args.longest_only)
    only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
    partial = (lambda so_far: write_text(args.json, json.dumps(so_far, indent=1) + "\n")) if args.json else None
    report = rehearse(shapes, card, device=device, timeout_s=args.timeout_s, threads=args.threads, only=only,
                      budget_s=args.budget_s, after_job=partial, say=lambda line: status("rehearse", line))
    report["note"] = args.note
    write_text(args.out, markdown(report))
    flat = {"card_gib": report["card_gib"], "phases": len(report["phases"]),
            "all_fit_card": all(r["card_fits"] for r in report["phases"]),
            "max_card_estimate_gib": max(r["card_estimate_gib"] for r in report["phases"]),
            "max_abs_error": max((abs(r["error"]) for r in report["phases"] if r["error"] is not None), default=None),
            "failed": sum(1 for r in report["phases"] if r["failure"]),
            **{key: report[key] for key in LENGTH_KEYS}}
    for r in report["phases"]:
        key = f"{r['stage']}/{r['phase']}".replace(" ", "_")
        flat[f"{key}/card_gib"] = r["card_estimate_gib"]
        flat[f"{key}/measured_gib"] = r["measured_gib"]
        flat[f"{key}/error"] = r["error"]
    write_metrics(args.metrics, flat)
    if args.json:
        write_text(args.json, json.dumps(report, indent=1) + "\n")
    status("rehearse", f"{report['card']}: largest phase {flat['max_card_estimate_gib']:.1f} of {report['card_gib']:.1f} GiB "
                       f"({'all fit' if flat['all_fit_card'] else 'NOT ALL FIT'}); here the estimates are within "
                       f"{flat['max_abs_error']:.1%} of the measured peaks" if flat["max_abs_error"] is not None else
                       "rehearse: no phase was measured")
    if flat["failed"]:
        raise UserError(f"rehearse: {flat['failed']} phase(s) failed to run; see {args.out}")
    if not flat["all_fit_card"]:
        raise UserError(f"rehearse: a phase does not fit the {report['card']}; see {args.out}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="the recipe")
    parser.add_argument("--card", help="the card the recipe is for (daychat/plan/cards.py; default: plan.card)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to rehearse")
    parser.add_argument("--tokenizer", help="tokenizer folder for exact prompt lengths (default: UTF-8 byte bound)")
    parser.add_argument("--bundle", help="CORE bundle folder (default: core_eval.source resolved through --cache)")
    parser.add_argument("--chat-data", help="chat eval data folder (default: chat_eval.source resolved through --cache)")
    parser.add_argument("--cache", default=".cache", help="download cache of the eval stages")
    parser.add_argument("--lengths", help="take the longest prompts from this earlier rehearsal's metrics file "
                                          "instead of measuring them (a GPU machine without the data)")
    parser.add_argument("--longest-only", action="store_true",
                        help="rehearse the training step at the curriculum's longest seq_len only (its peak)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per phase (0 = torch's default)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per phase")
    parser.add_argument("--budget-s", type=float, help="for the whole run: jobs that would start later are skipped")
    parser.add_argument("--only", help="comma-separated parts of phase names: rehearse those jobs only")
    parser.add_argument("--note", default="", help="a line for the report: where the tokenizer and data came from")
    parser.add_argument("--out", default="reports/rehearse.md")
    parser.add_argument("--metrics", default="reports/metrics/rehearse.json")
    parser.add_argument("--json", help="also write the full report as JSON here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):  # a child: one job, its result on the last line
        spec = json.loads(sys.argv[1])
        print(json.dumps(run_job(Job(**spec["job"]))))
    else:
        from daychat.cli import run

        run(lambda: main(sys.argv[1:]), "rehearse")
