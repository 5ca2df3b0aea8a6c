"""pretrain stage: train the GPT on the token shards; resume after a crash or kill; write the base model.

    python stages/pretrain.py --tokens data/tokens --tokenizer models/tokenizer --out models/base \
        --checkpoints .cache/pretrain --live reports/pretrain --metrics reports/metrics/pretrain.json

Reads params.yaml's `pretrain` section. Checkpoints go to <checkpoints>/<fingerprint>/, the fingerprint
being a hash of the params that change what is trained, the token dataset's meta.json and the tokenizer:
a rerun with the same inputs resumes the same run (same data order, same schedule), one with other
params starts fresh beside it. The folder is not a pipeline output, because the engines delete outputs
before they rerun a stage.

Writes, at the end and each as a whole: models/base/ (model.pt, config.json, tokenizer/, meta.json; see
daychat.train.checkpoint), step-wise dvclive TSVs under <live>/plots/metrics/, and flat metrics: val_bpb,
train_loss, tokens, flops, tok_per_s, mfu, peak_mem_gib, steps, wall_s, crop_fraction (0: the loader drops
nothing), continued_fraction, epochs, params, weight_decay (after daychat.optim.transfer), and heldout_bpb
with pretrain.eval_text. models/base/optimizer.pt holds the final optimizer state (pretrain.save_optimizer).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path

# The curriculum changes activation shapes mid-run; expandable segments keep the CUDA caching allocator
# from fragmenting over them (nanochat sets the same). Read when CUDA first allocates, so set before.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from daychat import provenance
from daychat.cli import run, status
from daychat.data.loader import PackedLoader
from daychat.data.tokens import META, TokenShards
from daychat.errors import UserError
from daychat.eval.bundle import load_bundle, resolve
from daychat.eval.core import evaluate_core, longest_prompt_bound
from daychat.io import sha256_file, write_metrics
from daychat.model import GPT, GPTConfig
from daychat.model.gpt import ROTARY_HEADROOM
from daychat.model.fp8 import convert_to_fp8, fp8_supported
from daychat.optim import build_optimizers
from daychat.optim.transfer import transfer
from daychat.params import load_section
from daychat.plan.memory import in_training_static, scoring_phase, training_phases
from daychat.plan.preflight import check_phase, preflight, scoring_batch, summary
from daychat.tokenizer import Tokenizer
from daychat.train import distributed
from daychat.train.checkpoint import Checkpointer, run_fingerprint, write_model_folder
from daychat.train.ema import EMA, decay_for
from daychat.train.evaluate import evaluate_bpb, val_batches
from daychat.train.loop import CheckpointPolicy, LoopSettings, Trainer, autocast_for, resume_and_run
from daychat.train.metrics import device_name, peak_flops, pick_device
from daychat.train.schedule import plan_batch, schedule_from_params

NAME = "pretrain"


def main() -> None:
    args = parse_args()
    p = load_section(NAME)
    dist = data_parallel(p)  # None in a single process; may re-exec this stage under torchrun
    if dist is not None and not dist.is_main:
        sys.stdout = open(os.devnull, "w")  # rank 0 tells the story; errors still reach stderr
    device = pick_device(p.device, "pretrain.device") if dist is None else dist.device
    if p.fp8 and not fp8_supported(device):
        raise UserError(f"params.yaml: pretrain.fp8 is true but this device ({device_name(device)}) has no FP8 "
                        f"tensor cores (needs CUDA compute capability 8.9+, e.g. RTX 4090 or H100); set pretrain.fp8: false")
    train_shards, val_shards = TokenShards(args.tokens, "train"), TokenShards(args.tokens, "val")
    tok = Tokenizer.load(args.tokenizer)
    tokenizer_sha = sha256_file(Path(args.tokenizer) / "tokenizer.tiktoken")
    if tokenizer_sha != train_shards.tokenizer_sha256:
        raise UserError(f"{args.tokens} was encoded with another tokenizer than {args.tokenizer}; rerun the pretokenize stage")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside bf16 autocast

    torch.manual_seed(p.seed)
    curriculum = p.curriculum()
    plan = plan_batch(p.total_batch, p.device_batch, [seq_len for _, seq_len in curriculum])
    config = p.model_config(tok.vocab_size, plan.max_seq_len, device.type)
    core_tasks = load_bundle(resolve(p.core_source, args.eval_cache, path=p.core_path)) if p.core_source else []
    core_tokens = preflight_memory(p, config, plan, device, core_tasks)  # before anything is allocated on the device
    with torch.device("meta"):  # shapes only; the weights are allocated once, on the device
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.activation_checkpointing = p.activation_checkpointing  # a switch of the forward, not of the config
    if p.fp8:  # the same Parameters behind FP8 matmuls: optimizers and state_dict keys are unchanged
        try:
            convert_to_fp8(model)
        except ValueError as e:
            raise UserError(f"params.yaml: pretrain.fp8 cannot be used with this model ({e}); change "
                            f"pretrain.head_dim / n_kv_head / aspect_ratio or set pretrain.fp8: false") from None
    if dist is not None:
        dist.broadcast_parameters(model)
    counts = model.num_params()
    schedule = schedule_from_params(p, counts["matmul"])
    rule = transfer(total_batch=p.total_batch, model_dim=config.model_dim, weight_decay=p.weight_decay,
                    tokens=schedule.horizon.tokens if schedule.horizon.kind == "tokens" else p.tokens,
                    lr_batch_exponent=p.lr_batch_exponent, wd_rule=p.wd_rule)
    optimizers = optimizers_from_params(model, p, rule)
    loader = PackedLoader(train_shards, seed=p.seed, shuffle=p.shuffle, buffer_docs=p.buffer_docs, device=device)

    autocast = autocast_for(device, p.precision)
    token_bytes = torch.tensor(tok.token_bytes(), device=device)

    heldout = heldout_shards(p.eval_text, tok) if p.eval_text else None
    evaluations = 0

    def evaluate(forward: torch.nn.Module) -> dict[str, float]:
        nonlocal evaluations
        batches = val_batches(val_shards, p.device_batch, plan.max_seq_len, p.eval_tokens, device)
        results = {"val/bpb": evaluate_bpb(forward, batches, token_bytes, autocast)}
        if heldout is not None:
            batches = val_batches(heldout, p.device_batch, plan.max_seq_len, p.eval_tokens, device)
            results["heldout/bpb"] = evaluate_bpb(forward, batches, token_bytes, autocast)
        if core_tasks and evaluations % p.core_every == 0:
            # The plain model, not the compiled one: CORE's batches come in every shape, and each new
            # shape would recompile it. Scored as core_eval scores it: uncropped, bf16 (no FP8 without grad),
            # in token-budgeted batches sized by the preflight beside the optimizer state.
            model.eval()
            proxy = evaluate_core(model, tok, core_tasks, p.core_max_per_task, device, core_tokens,
                                  max_seq_len=model.max_positions)
            model.train()
            results["core/proxy"] = proxy["core"]
        evaluations += 1
        return results

    params = dataclasses.asdict(p)
    fingerprint = run_fingerprint({k: v for k, v in params.items() if k not in p.NOT_IN_FINGERPRINT},
                                  sha256_file(Path(args.tokens) / META), tokenizer_sha)
    checkpointer = Checkpointer(Path(args.checkpoints) / fingerprint, keep=p.keep_checkpoints)
    peak, peak_source = peak_flops(device)
    world = dist.world_size if dist is not None else 1
    if peak:  # MFU of the whole group: its FLOPs over the sum of its devices' peaks
        peak *= world
    settings = LoopSettings(device=device, precision=p.precision, compile=p.compile, eval_every=p.eval_every,
                            log_every=p.log_every, loss_spike=p.loss_spike, peak_flops=peak, section=NAME)
    policy = CheckpointPolicy(checkpointer, every_steps=p.save_every, every_s=p.save_every_min * 60,
                              extra={"params": params, "config": dataclasses.asdict(config)},
                              background=p.save_background)
    ema = EMA(model, decay_for(p.ema_halflife_tokens, p.total_batch)) if p.ema_halflife_tokens else None
    main_rank = dist is None or dist.is_main
    batches = loader if dist is None else distributed.ShardedBatches(loader, dist.rank, dist.world_size)
    trainer = Trainer(model, optimizers, batches, schedule, plan, settings, evaluate=evaluate if main_rank else None,
                      checkpoints=policy, ema=ema, dist=dist)

    status(NAME, f"d{p.depth} GPT, dim {config.model_dim}, {counts['total'] / 1e6:.2f}M params "
                 f"({counts['matmul'] / 1e6:.2f}M in matmuls), {model.estimate_flops():.3g} FLOPs/token at T={plan.max_seq_len}")
    status(NAME, f"{device_name(device)}; MFU against {peak_source}" + (f" = {peak / 1e12:.3g} TFLOPS" if peak else ""))
    status(NAME, f"schedule: {schedule.describe()}")
    status(NAME, f"hyperparameter transfer (daychat.optim.transfer): {rule.describe()}")
    status(NAME, f"batch: {p.total_batch:,} tokens a step = " + ", ".join(
        f"{plan.accum_steps(t)} x {plan.rows(t)} rows of {t}" for t in sorted({t for _, t in curriculum})))
    if dist is not None:
        status(NAME, f"data parallel over {world} processes ({'nccl' if device.type == 'cuda' else 'gloo'}), "
                     f"{plan.accum_steps(plan.max_seq_len) // world} micro-batches each a step")
    if p.fp8:
        status(NAME, "FP8 matmuls (e4m3 forward, e5m2 gradients, tensorwise scales) in the block linears")
    if ema is not None:
        status(NAME, f"EMA of the weights: half-life {p.ema_halflife_tokens:,} tokens = decay {ema.decay:.6f} a step")
    state = resume_and_run(trainer, args.live, NAME, main=main_rank)
    if state is None:  # another rank: it trained; the outputs are rank 0's
        distributed.shutdown()
        return

    # The EMA's val bpb on the same batches as the raw weights' final evaluation; ema_pick chooses.
    val_bpb_ema, chosen = None, "raw"
    if ema is not None:
        with ema.applied():
            batches = val_batches(val_shards, p.device_batch, plan.max_seq_len, p.eval_tokens, device)
            val_bpb_ema = evaluate_bpb(trainer.forward, batches, token_bytes, autocast)
        raw = state.val.get("val/bpb")
        better = val_bpb_ema < raw
        chosen = "ema" if p.ema_pick == "ema" or (p.ema_pick == "best" and better) else "raw"
        status(NAME, f"val bpb: raw weights {raw:.4f}, EMA {val_bpb_ema:.4f}; the model folder gets the {chosen} weights")

    metrics = {
        "val_bpb": state.val.get("val/bpb"),
        "train_loss": state.smooth_loss,
        "tokens": state.tokens,
        "flops": state.flops,
        "tok_per_s": state.timed_tokens / state.timed_s if state.timed_s else None,
        "mfu": state.timed_flops / state.timed_s / peak if state.timed_s and peak else None,
        "peak_mem_gib": state.peak_mem_gib,
        "steps": state.step,
        "wall_s": state.elapsed_s,
        "crop_fraction": loader.crop_fraction,
        "continued_fraction": loader.continued_fraction,
        "epochs": loader.epochs,
        "params": counts["total"],
        "weight_decay": rule.weight_decay,
        **({"heldout_bpb": state.val.get("heldout/bpb")} if heldout is not None else {}),
        **({"val_bpb_ema": val_bpb_ema} if ema is not None else {}),
    }
    meta = {
        "params": params,
        "config": dataclasses.asdict(config),
        "num_params": counts,
        "flops_per_token": {str(t): model.estimate_flops(t) for _, t in curriculum},
        "code": provenance.code_version(),
        "libraries": provenance.library_versions(),
        "hardware": {**provenance.hardware(gpu=device.type == "cuda"), "device": device_name(device),
                     "peak_flops": peak, "peak_flops_source": peak_source},
        "data": {"tokens": str(args.tokens), "tokens_meta_sha256": sha256_file(Path(args.tokens) / META),
                 "tokenizer_sha256": tokenizer_sha, "train_tokens": train_shards.tokens, "val_tokens": val_shards.tokens,
                 **({"eval_text": p.eval_text, "eval_text_sha256": heldout.sha256} if heldout is not None else {})},
        "transfer": dataclasses.asdict(rule),
        "run": {"fingerprint": fingerprint, "schedule": schedule.describe(), "gpus": world, "fp8": p.fp8},
        # which weights model.pt holds: the raw ones or their EMA (pretrain.ema_pick), with both val bpbs
        "weights": {"chosen": chosen, "ema_pick": p.ema_pick if ema is not None else None,
                    "ema_halflife_tokens": p.ema_halflife_tokens, "ema_decay": ema.decay if ema is not None else None,
                    "val_bpb_raw": metrics["val_bpb"], "val_bpb_ema": val_bpb_ema},
        "metrics": metrics,
    }
    with ema.applied() if chosen == "ema" else contextlib.nullcontext():
        # the optimizer state belongs to the raw weights (SFT continues from them: sft.load_optimizer)
        optimizer_state = [opt.state_dict() for opt in optimizers] if p.save_optimizer else None
        write_model_folder(args.out, model, config, meta, args.tokenizer, optimizers=optimizer_state)
    write_metrics(args.metrics, metrics)
    status(NAME, f"val bpb {metrics['val_bpb']:.4f} after {state.tokens:,} tokens in {state.step:,} steps "
                 f"({state.elapsed_s / 60:.1f} min); model in {args.out}")
    distributed.shutdown()


def optimizers_from_params(model: GPT, p, rule) -> list:
    """[AdamW, Muon] for a `pretrain` params section, with the transfer rule's factors applied."""
    return build_optimizers(model, matrix_lr=p.matrix_lr, embedding_lr=p.embedding_lr, unembedding_lr=p.unembedding_lr,
                            scalar_lr=p.scalar_lr, weight_decay=rule.weight_decay,
                            adam_betas=(p.adam_beta1, p.adam_beta2), adam_groups=p.adam_groups,
                            lr_factor=rule.lr_factor, muon_beta2=p.muon_beta2, muon_eq=p.muon_eq,
                            muon_plus=p.muon_plus)


def heldout_shards(path: str, tok: Tokenizer):
    """pretrain.eval_text tokenized with this run's tokenizer, as token shards (daychat.data.tokens.encode_texts)."""
    from daychat.data.tokens import encode_texts

    return encode_texts(path, tok, "pretrain.eval_text")


def data_parallel(p) -> distributed.Distributed | None:
    """None for one process. For pretrain.gpus > 1: check the devices, re-exec this stage under torchrun
    when not already there (does not return), else join the group (daychat.train.distributed.setup).

    device: cpu with gpus > 1 runs gloo processes on the CPU: slower than one process, for tests only."""
    return distributed.setup(NAME, p.gpus, p.device, __file__)


def preflight_memory(p, config: GPTConfig, plan, device: torch.device, core_tasks) -> int:
    """Stop in one line if a phase of the run does not fit the card, before anything is allocated: the
    training step (longest seq_len, device_batch rows) and the optimizer step, then what each evaluation
    holds beside the optimizer state: val bpb (device_batch rows) and the CORE proxy (its longest prompt,
    uncropped). Returns the CORE proxy's scoring batch in tokens."""
    card, ema = device_name(device), p.ema_halflife_tokens > 0
    preflight(NAME, config, plan.device_batch, plan.max_seq_len, device, memory_gib=p.memory_gib,
              margin=p.memory_margin, card=card, say=lambda line: status(NAME, line),
              precision=p.precision, compile=p.compile, activation_checkpointing=p.activation_checkpointing,
              total_batch=plan.total_batch, ema=ema)
    dev = device.type
    phases = training_phases(config, plan.device_batch, plan.max_seq_len, precision=p.precision, compile=p.compile,
                             activation_checkpointing=p.activation_checkpointing, device=dev, ema=ema)
    static = in_training_static(config, ema)
    val = scoring_phase("val bpb", config, plan.device_batch * plan.max_seq_len, static=static,
                        precision=p.precision, device=dev, shape=f"{plan.device_batch} x {plan.max_seq_len}")
    check_phase(NAME, val, device, memory_gib=p.memory_gib, margin=p.memory_margin, card=card,
                fix="set pretrain.device_batch lower (val bpb scores device_batch rows at a time)")
    phases.append(val)
    core_tokens = 0
    if core_tasks:
        longest = min(longest_prompt_bound(core_tasks, p.core_max_per_task), ROTARY_HEADROOM * config.sequence_len)
        core_tokens, core = scoring_batch(NAME, "CORE proxy", config, device, memory_gib=p.memory_gib,
                                          margin=p.memory_margin, card=card, static=static, longest=longest,
                                          precision=p.precision,
                                          fix="set pretrain.core_source to \"\" (no CORE proxy during training) "
                                              "or lower pretrain.depth")
        phases.append(core)
    status(NAME, summary(phases, device, memory_gib=p.memory_gib, card=card, section=NAME))
    return core_tokens


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", required=True, help="token dataset folder (from the pretokenize stage)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (from the tokenizer stage)")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (not a pipeline output)")
    parser.add_argument("--live", required=True, help="dvclive folder for the step-wise curves")
    parser.add_argument("--eval-cache", default=".cache/eval_bundle",
                        help="where the CORE proxy's bundle is downloaded or built (pretrain.core_source)")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
