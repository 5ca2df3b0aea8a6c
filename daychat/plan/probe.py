"""Probe: measured training throughput and peak memory over a grid of shapes, one fresh process per config.

    result = run_one(spec, timeout_s=600)     # {"tok_per_s", "step_s", "mfu", "peak_mem_gib", "oom", ...}

Each config trains a few steps of the real thing (the GPT, Muon + AdamW, Trainer.train_step with
gradient accumulation over `accum` micro-batches, autocast and torch.compile as the pretrain stage runs
them) on random tokens: throughput does not depend on the data. The first `warmup_steps` (compile,
autotuning, allocator warm-up) are not timed. A config runs in a child process
(`python -m daychat.plan.probe '<json spec>'`) so that its peak memory is its own and an out-of-memory
error (torch.OutOfMemoryError on CUDA, caught and reported) or a crash cannot take the next config down.

Peak memory (daychat.plan.measure.Meter): torch.cuda.max_memory_allocated on CUDA; on a CPU the
resident-set high-water mark (VmHWM, reset after imports) less the RSS at that point. The memory model's estimate
(daychat.plan.memory) is recorded beside it with its relative error (allocated bytes, without the CUDA
context, against max_memory_allocated).
"""

from __future__ import annotations

import json
import sys
import time

from daychat.plan.measure import Meter, run_child

GiB = 2 ** 30


class RandomBatches:
    """Random token rows made on the device (the model's speed, not the loader's); a Trainer batch source."""

    def __init__(self, vocab_size: int, device):
        import torch

        self.vocab_size, self.device = vocab_size, device
        self.generator = torch.Generator(device=device).manual_seed(0)

    def next_batch(self, rows: int, seq_len: int):
        import torch

        tokens = torch.randint(0, self.vocab_size, (rows, seq_len + 1), device=self.device, generator=self.generator)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def measure(spec: dict) -> dict:
    """Train `spec` in this process and measure it. spec: depth, seq_len, device_batch, accum, steps,
    warmup_steps, vocab_size, aspect_ratio, head_dim, device, precision, compile, activation_checkpointing."""
    import torch

    from daychat.model import GPT, GPTConfig
    from daychat.model.accounting import flops_per_token
    from daychat.optim import build_optimizers
    from daychat.plan.memory import estimate_memory
    from daychat.train.loop import LoopSettings, Trainer
    from daychat.train.metrics import peak_flops
    from daychat.train.schedule import BatchPlan, Horizon, Schedule

    device = torch.device(spec["device"])
    rows, seq_len, accum = spec["device_batch"], spec["seq_len"], spec["accum"]
    config = GPTConfig(vocab_size=spec["vocab_size"], sequence_len=seq_len, depth=spec["depth"],
                       aspect_ratio=spec["aspect_ratio"], head_dim=spec["head_dim"])
    precision = spec["precision"] if spec["precision"] != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    est = estimate_memory(config, rows, seq_len, precision=precision, compile=spec["compile"],
                          activation_checkpointing=spec["activation_checkpointing"], device=device.type)
    peak, _ = peak_flops(device)
    result = {"estimate_gib": est.allocated_bytes / GiB, "params": None, "oom": False}
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    meter = Meter(device)  # the peak from here on, the model included
    try:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=device)
        model.init_weights()
        model.activation_checkpointing = spec["activation_checkpointing"]
        result["params"] = model.num_params()["total"]
        optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5,
                                      weight_decay=0.2)
        steps = spec["steps"] + spec["warmup_steps"]
        plan = BatchPlan(total_batch=rows * seq_len * accum, device_batch=rows, max_seq_len=seq_len)
        schedule = Schedule(Horizon("tokens", tokens=plan.total_batch * steps), curriculum=((0.0, seq_len),))
        trainer = Trainer(model, optimizers, RandomBatches(config.vocab_size, device), schedule, plan,
                          LoopSettings(device=device, precision=spec["precision"], compile=spec["compile"]))
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        for _ in range(spec["warmup_steps"]):
            trainer.train_step(seq_len)
        sync()
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            trainer.train_step(seq_len)
        sync()
        step_s = (time.perf_counter() - t0) / spec["steps"]
    except torch.OutOfMemoryError:
        result["oom"] = True
        return result
    measured = meter.peak()
    tok_per_s = plan.total_batch / step_s
    fpt = flops_per_token(config, seq_len)
    result.update(step_s=step_s, tok_per_s=tok_per_s, mfu=tok_per_s * fpt / peak if peak else None,
                  flops_per_token=fpt, peak_mem_gib=measured / GiB,
                  estimate_error=est.allocated_bytes / measured - 1 if measured > 0 else None)
    return result


def run_one(spec: dict, timeout_s: float) -> dict:
    """`measure(spec)` in a fresh child process; a crash or a timeout is recorded, not raised."""
    return run_child("daychat.plan.probe", spec, device=spec["device"], timeout_s=timeout_s)


if __name__ == "__main__":  # the child: one config, its result as the last line of stdout
    import torch

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m daychat.plan.probe '<json spec>'")
    spec = json.loads(sys.argv[1])
    if spec["device"] == "cpu" and spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    print(json.dumps(measure(spec)))
