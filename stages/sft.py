"""sft stage: fine-tune the base model on conversations; resume after a crash or kill; write the chat model.

    python stages/sft.py --base models/base --out models/sft --cache .cache/sft_data \
        --checkpoints .cache/sft --live reports/sft --metrics reports/metrics/sft.json

Reads params.yaml's `sft` section. The conversations (daychat/sft: url sources downloaded once into
--cache, local files, synthetic ones) are rendered with the chat format, a held-out share kept for the
validation loss, and packed whole into padded rows; only assistant tokens are trained (the loss mask).
Training is the pretraining loop (daychat.train.loop.Trainer) started from models/base, with the
pretraining's optimizer state (models/base/optimizer.pt, `sft.load_optimizer`) and this stage's own
learning rates (x `sft.init_lr_frac`) and schedule. Checkpoints go to <checkpoints>/<fingerprint>/, the fingerprint
being a hash of the params that change what is trained, the base model's weights and the rendered data:
a rerun with the same inputs resumes the same run. `sft.gpus` > 1 reruns the stage under torchrun, data
parallel as pretraining (daychat.train.distributed): every rank packs the same rows and trains on its
share of each step's micro-batches; rank 0 alone evaluates, logs, checkpoints and writes the outputs.
Before the model goes to the device, a memory preflight (daychat.plan.preflight) refuses a device_batch x
seq_len that does not fit the card (sft.memory_gib / memory_margin).

Writes, at the end and each as a whole: models/sft/ (model.pt, config.json, tokenizer/, meta.json), the
dvclive curves under <live>/plots/metrics/, and flat metrics: train_loss, val_loss, val_loss_base (before
SFT), conversations, val_conversations, tokens (row tokens, padding included), conversation_tokens,
trained_tokens (assistant targets), pad_fraction, epochs, skipped_<reason>, truncated, tok_per_s, wall_s,
steps, and conversations_<source> per source.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

import torch

from daychat import provenance
from daychat.cli import run, status
from daychat.errors import UserError
from daychat.io import sha256_file, write_metrics
from daychat.optim import build_optimizers
from daychat.params import load_section
from daychat.plan.memory import in_training_static, scoring_phase, training_phases
from daychat.plan.preflight import check_phase, preflight, summary
from daychat.sft.batches import SftBatches, build_mixture, evaluate_loss, val_batches
from daychat.sft.sources import parse_sources
from daychat.tokenizer import Tokenizer
from daychat.train import distributed
from daychat.train.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    TOKENIZER_DIR,
    Checkpointer,
    load_model_folder,
    load_optimizer_state,
    read_model_config,
    run_fingerprint,
    write_model_folder,
)
from daychat.train.loop import CheckpointPolicy, LoopSettings, Trainer, autocast_for, resume_and_run
from daychat.train.metrics import device_name, peak_flops, pick_device
from daychat.train.schedule import Horizon, Schedule, plan_batch

NAME = "sft"


def main() -> None:
    args = parse_args()
    p = load_section(NAME)
    base = Path(args.base)
    dist = distributed.setup(NAME, p.gpus, p.device, __file__)  # None in one process; may re-exec under torchrun
    main_rank = dist is None or dist.is_main
    if not main_rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 tells the story; errors still reach stderr
    device = pick_device(p.device, "sft.device") if dist is None else dist.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    config = read_model_config(base)
    if p.seq_len > config.sequence_len:
        raise UserError(f"params.yaml: sft.seq_len ({p.seq_len}) is longer than the base model's context "
                        f"({config.sequence_len}, its longest pretrain.seq_len); lower sft.seq_len")
    preflight_memory(p, config, device)  # before anything is allocated on the device
    model, base_meta = load_model_folder(base, device)  # the same file on every rank: the same weights
    tok = Tokenizer.load(base / TOKENIZER_DIR)

    if not main_rank:  # rank 0 downloads the url sources into the cache first; the others then read it
        dist.barrier()
    mixture = build_mixture(parse_sources(p.sources), tok, max_len=p.seq_len + 1, seed=p.seed,
                            val_fraction=p.val_fraction, val_max=p.val_max, overlong=p.overlong, cache=args.cache,
                            retries=p.retries, timeout_s=p.timeout_s)
    if dist is not None and dist.is_main:
        dist.barrier()
    skipped = {reason: n for reason, n in mixture.skipped.items() if n}
    status(NAME, f"{len(mixture.train):,} train conversations ({len(mixture.items):,} a pass, "
                 f"{mixture.pass_tokens:,} tokens), {len(mixture.val):,} held out; skipped {skipped or 'none'}, "
                 f"truncated {mixture.truncated:,}")

    torch.manual_seed(p.seed)
    plan = plan_batch(p.total_batch, p.device_batch, [p.seq_len], section=NAME)
    pad_id = tok.bos_id
    batches = SftBatches(mixture.train, mixture.items, pad_id=pad_id, seed=p.seed, buffer=p.buffer, device=device)
    rows_per_step = p.total_batch // p.seq_len
    if p.steps:
        steps = p.steps
    else:
        rows_per_pass = batches.rows_per_pass(p.seq_len)
        steps = max(1, math.ceil(p.epochs * rows_per_pass / rows_per_step))
        status(NAME, f"one pass = {rows_per_pass:,} rows of {p.seq_len} = {rows_per_pass / rows_per_step:.1f} steps")
    # Muon's momentum as nanochat's chat_sft: 0.85 -> 0.95 over 300 steps, no change in the warmdown
    schedule = Schedule(Horizon("tokens", tokens=steps * p.total_batch), warmup_steps=p.warmup_steps,
                        warmdown_frac=p.warmdown_frac, final_lr_frac=p.final_lr_frac,
                        curriculum=((0.0, p.seq_len),), momentum=(0.85, 0.95, 0.95), momentum_warmup_steps=300)
    optimizers, continued = sft_optimizers(model, p, base, base_meta.get("params", {}), device)
    status(NAME, "optimizer state: " + ("continued from the pretraining's (models/base/optimizer.pt)" if continued
                                        else "fresh" + (" (the base model folder has no optimizer.pt)"
                                                        if p.load_optimizer else "")))
    autocast = autocast_for(device, p.precision)

    def evaluate(forward: torch.nn.Module) -> dict[str, float]:
        if len(mixture.val) == 0:
            return {}
        return {"val/loss": evaluate_loss(forward, val_batches(mixture.val, p.device_batch, p.seq_len, pad_id, device),
                                          autocast)}

    params = dataclasses.asdict(p)
    fingerprint = run_fingerprint({k: v for k, v in params.items() if k not in p.NOT_IN_FINGERPRINT},
                                  sha256_file(base / MODEL_FILE), mixture.sha256())
    checkpointer = Checkpointer(Path(args.checkpoints) / fingerprint, keep=p.keep_checkpoints)
    peak, peak_source = peak_flops(device)
    world = dist.world_size if dist is not None else 1
    if peak:  # throughput against the whole group's peak
        peak *= world
    settings = LoopSettings(device=device, precision=p.precision, compile=p.compile, eval_every=p.eval_every,
                            log_every=p.log_every, loss_spike=p.loss_spike, peak_flops=peak, section=NAME)
    policy = CheckpointPolicy(checkpointer, every_steps=p.save_every, every_s=p.save_every_min * 60,
                              extra={"params": params, "config": dataclasses.asdict(config)}, background=True)
    # Every rank packs the same rows from the same seed; ShardedBatches hands each its share of them.
    source = batches if dist is None else distributed.ShardedBatches(batches, dist.rank, dist.world_size)
    trainer = Trainer(model, optimizers, source, schedule, plan, settings, evaluate=evaluate if main_rank else None,
                      checkpoints=policy, dist=dist)

    status(NAME, f"base {base}: d{config.depth}, dim {config.model_dim}; {device_name(device)}")
    status(NAME, f"schedule: {steps:,} steps of {p.total_batch:,} tokens ({plan.accum_steps(p.seq_len)} x "
                 f"{plan.rows(p.seq_len)} rows of {p.seq_len}); {schedule.describe()}")
    if dist is not None:
        status(NAME, f"data parallel over {world} processes ({'nccl' if device.type == 'cuda' else 'gloo'}), "
                     f"{plan.accum_steps(p.seq_len) // world} micro-batches each a step")
    state = resume_and_run(trainer, args.live, NAME, main=main_rank)
    if state is None:  # another rank: it trained; the outputs are rank 0's
        distributed.shutdown()
        return

    first_val = next((row["val/loss"] for row in state.history if row.get("step") == 0 and "val/loss" in row), None)
    metrics = {
        "train_loss": state.smooth_loss,
        "val_loss": state.val.get("val/loss"),
        "val_loss_base": first_val,
        "conversations": len(mixture.train),
        "val_conversations": len(mixture.val),
        "tokens": state.tokens,
        "conversation_tokens": batches.tokens,
        "trained_tokens": batches.trained,
        "pad_fraction": batches.pad_fraction,
        "epochs": batches.epochs,
        **{f"skipped_{reason}": n for reason, n in mixture.skipped.items()},
        "truncated": mixture.truncated,
        "tok_per_s": state.timed_tokens / state.timed_s if state.timed_s else None,
        "peak_mem_gib": state.peak_mem_gib,
        "steps": state.step,
        "wall_s": state.elapsed_s,
        **{f"conversations_{name}": counts["train"] for name, counts in mixture.per_source.items()},
    }
    meta = {
        "params": params,
        "config": dataclasses.asdict(config),
        "base": {"folder": str(base), "model_sha256": sha256_file(base / MODEL_FILE),
                 "fingerprint": base_meta.get("run", {}).get("fingerprint")},
        "code": provenance.code_version(),
        "libraries": provenance.library_versions(),
        "hardware": {**provenance.hardware(gpu=device.type == "cuda"), "device": device_name(device),
                     "peak_flops": peak, "peak_flops_source": peak_source},
        "data": {"sha256": mixture.sha256(), "sources": mixture.per_source, "skipped": mixture.skipped,
                 "truncated": mixture.truncated, "pass_tokens": mixture.pass_tokens},
        "run": {"fingerprint": fingerprint, "schedule": schedule.describe(), "steps": steps, "gpus": world,
                "optimizer_continued": continued},
        "metrics": metrics,
    }
    write_model_folder(args.out, model, config, meta, base / TOKENIZER_DIR)
    write_metrics(args.metrics, metrics)
    shown = f"val loss {metrics['val_loss']:.4f} (base {first_val:.4f}), " if first_val is not None and metrics["val_loss"] is not None else ""
    status(NAME, f"{shown}train loss {state.smooth_loss:.4f} after {state.step:,} steps "
                 f"({state.elapsed_s / 60:.1f} min); model in {args.out}")
    distributed.shutdown()


def sft_optimizers(model, p, base: Path, pre: dict, device: torch.device) -> tuple[list, bool]:
    """[AdamW, Muon] with the pretraining's groups and switches (`pre`: the base's pretrain params) and this
    stage's LRs x init_lr_frac, then (sft.load_optimizer) the pretraining's final state loaded into them:
    the moments carry over, every hyperparameter (lr, betas, weight decay) stays this stage's. Returns the
    optimizers and whether the state was continued."""
    frac = p.init_lr_frac
    optimizers = build_optimizers(model, matrix_lr=p.matrix_lr * frac, embedding_lr=p.embedding_lr * frac,
                                  unembedding_lr=p.unembedding_lr * frac, scalar_lr=p.scalar_lr * frac,
                                  weight_decay=p.weight_decay, adam_betas=(p.adam_beta1, p.adam_beta2),
                                  adam_groups=pre.get("adam_groups", "tuned"), muon_beta2=pre.get("muon_beta2", 0.9),
                                  muon_eq=pre.get("muon_eq", True), muon_plus=pre.get("muon_plus", True))
    saved = load_optimizer_state(base, device) if p.load_optimizer else None
    if saved is None:
        return optimizers, False
    if len(saved) != len(optimizers):
        raise UserError(f"{base / OPTIMIZER_FILE} holds {len(saved)} optimizers, this model needs {len(optimizers)}; "
                        "set sft.load_optimizer: false or rerun the pretrain stage")
    for opt, state in zip(optimizers, saved):
        ours = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        try:
            opt.load_state_dict(state)
        except (ValueError, KeyError) as e:
            raise UserError(f"{base / OPTIMIZER_FILE} does not fit this model's optimizer groups ({e}); set "
                            "sft.load_optimizer: false or rerun the pretrain stage") from None
        for group, hyper in zip(opt.param_groups, ours):  # load_state_dict brought the pretraining's: undo
            group.update(hyper)
    return optimizers, True


def preflight_memory(p, config, device: torch.device) -> None:
    """Stop in one line if a phase does not fit the card: the training step (sft.device_batch rows of
    sft.seq_len on the base model's shapes), the optimizer step, and the validation loss (device_batch
    rows beside the optimizer state). Only sft.device_batch / seq_len are offered as knobs (the model is the
    base's)."""
    card = device_name(device)
    preflight(NAME, config, p.device_batch, p.seq_len, device, memory_gib=p.memory_gib, margin=p.memory_margin,
              card=card, say=lambda line: status(NAME, line), precision=p.precision,
              compile=p.compile, total_batch=p.total_batch, tunes_model=False)
    phases = training_phases(config, p.device_batch, p.seq_len, precision=p.precision, compile=p.compile,
                             device=device.type)
    val = scoring_phase("val loss", config, p.device_batch * p.seq_len, static=in_training_static(config),
                        precision=p.precision, device=device.type, shape=f"{p.device_batch} x {p.seq_len}")
    check_phase(NAME, val, device, memory_gib=p.memory_gib, margin=p.memory_margin, card=card,
                fix="set sft.device_batch lower (the validation loss scores device_batch rows at a time)")
    status(NAME, summary([*phases, val], device, memory_gib=p.memory_gib, card=card, section=NAME))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base model folder (from the pretrain stage)")
    parser.add_argument("--out", required=True, help="chat model folder to write")
    parser.add_argument("--cache", default=".cache/sft_data", help="where url sources are downloaded (kept between runs)")
    parser.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (not a pipeline output)")
    parser.add_argument("--live", required=True, help="dvclive folder for the step-wise curves")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
