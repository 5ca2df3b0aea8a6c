"""The training loop: one loop for pretraining and, later, SFT.

    trainer = Trainer(model, optimizers, batches, schedule, plan, settings,
                      evaluate=..., checkpoints=CheckpointPolicy(...), log=...)
    trainer.resume()            # from the latest checkpoint, if there is one
    state = trainer.run()       # until the horizon; returns the LoopState

One optimizer step takes `plan.total_batch` tokens as `plan.accum_steps(T)` micro-batches of
`plan.rows(T)` rows of length T, T from the schedule's curriculum at the current progress. Each
micro-batch's mean loss is divided by the number of micro-batches before backward, so the accumulated
gradient is the gradient of the mean over the whole batch (every target counts: pretraining rows have no
ignored targets). Then the schedule sets the learning-rate multiplier, Muon's momentum and the weight
decay multiplier, and every optimizer steps.

Precision: bf16 autocast on CUDA over fp32 master weights (the model keeps fp32 parameters; logits and
loss are fp32), plain fp32 on CPU. `torch.compile` is on by default on CUDA and never used on CPU.

Safety: the step's loss is read before the optimizers step (one host sync a step); a NaN/inf loss, or a
loss above `loss_spike` x the smoothed loss, stops the run with one line (`TrainingStopped`, a UserError)
and writes nothing, so the last good checkpoint stays the latest.

Everything the run needs to continue exactly is `Trainer.state_dict()`: model, optimizers, the batch
source's position, the loop state (step, tokens, elapsed time, logged rows) and the RNG states (and the
EMA of the weights when one is kept: `ema=daychat.train.ema.EMA(...)`).

Data parallel (`dist=daychat.train.distributed.Distributed`, under torchrun): each rank runs accum_steps /
world_size of the step's micro-batches (its batch source gives it its share), the gradients and the loss
are averaged over the ranks before the optimizers step, only rank 0 saves checkpoints, and every
wall-clock reading that steers the schedule is rank 0's.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import torch

from daychat.progress import status
from daychat.errors import UserError
from daychat.optim import set_lr_multiplier, set_muon_momentum, set_weight_decay_multiplier
from daychat.train.checkpoint import Checkpointer, load_error, rng_state, set_rng_state
from daychat.train.metrics import LiveLog, peak_memory_gib
from daychat.train.schedule import BatchPlan, Schedule

LOSS_EMA = 0.9  # smoothing of the logged train loss (and the reference a spike is measured against)
SPIKE_GRACE_STEPS = 20  # the loss falls fast at first: spikes are only looked for after warmup and this


class TrainingStopped(UserError):
    """The run stopped itself: a NaN/inf loss or a loss spike. The last good checkpoint is kept."""


class Batches(Protocol):
    """A batch source the loop can resume: the pretraining loader, later the SFT one."""

    def next_batch(self, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopSettings:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 elsewhere; bf16; fp32
    compile: bool = True  # torch.compile, on CUDA only
    eval_every: int = 0  # steps between evaluations (0: only at the end); also at step 0
    log_every: int = 1
    loss_spike: float = 0.0  # 0 = off
    peak_flops: float | None = None  # for MFU; None = not reported
    section: str = "pretrain"  # the params.yaml section named in messages


@dataclass
class CheckpointPolicy:
    """When to save: every `every_steps` steps and/or every `every_s` seconds, and at the end."""

    checkpointer: Checkpointer
    every_steps: int = 0
    every_s: float = 0.0
    extra: dict = field(default_factory=dict)  # saved alongside (e.g. the params and model config)
    background: bool = False  # copy to host memory and write in a background thread (Checkpointer.save_async)


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on
    flops: float = 0.0  # model FLOPs spent (estimate_flops at each step's seq_len)
    elapsed_s: float = 0.0  # wall clock of the run, over all sessions (evaluations and saves included)
    timed_s: float = 0.0  # time inside training steps, the first step at each shape left out (compile)
    timed_tokens: int = 0
    timed_flops: float = 0.0
    loss: float = float("nan")  # last step's train loss
    loss_ema: float = 0.0  # not debiased; see smooth_loss
    peak_mem_gib: float = 0.0
    val: dict = field(default_factory=dict)  # latest evaluation results, e.g. {"val/bpb": 1.1}
    val_step: int = -1
    history: list = field(default_factory=list)  # every logged row, replayed into a fresh log on resume
    finished: bool = False

    @property
    def smooth_loss(self) -> float:
        return self.loss_ema / (1 - LOSS_EMA ** self.step) if self.step else float("nan")


def autocast_for(device: torch.device, precision: str = "auto") -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts: bf16 autocast (CUDA by default), or none (fp32)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def accumulate_gradients(model: torch.nn.Module, micro_batches, n: int,
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """Forward + backward `n` micro-batches of (inputs, targets), gradients summed as for their mean loss.

    Returns the mean of the micro-batch losses (a device scalar, not synced).
    """
    total = None
    for _ in range(n):
        x, y = next(micro_batches)
        with autocast():
            loss = model(x, y)
        (loss / n).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total / n


class Trainer:
    def __init__(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], batches: Batches,
                 schedule: Schedule, plan: BatchPlan, settings: LoopSettings | None = None, *,
                 evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 checkpoints: CheckpointPolicy | None = None, log: Callable[[dict], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, ema=None, dist=None):
        self.model = model  # the plain module: its state_dict is what gets saved
        self.optimizers = optimizers
        self.batches = batches
        self.schedule = schedule
        self.plan = plan
        self.settings = settings or LoopSettings()
        self.evaluate = evaluate
        self.checkpoints = checkpoints
        self.log = log or (lambda row: None)
        self.clock = clock
        self.state = LoopState()
        # Optional: an EMA of the weights (daychat.train.ema.EMA), updated after every optimizer step and
        # saved in the checkpoint; a data-parallel group (daychat.train.distributed.Distributed), see train_step.
        self.ema = ema
        self.dist = dist
        self.autocast = autocast_for(self.settings.device, self.settings.precision)
        use_compile = self.settings.compile and self.settings.device.type == "cuda"
        # The shapes change only with the curriculum (a few stages), so static shapes: one graph each.
        self.forward = torch.compile(model, dynamic=False) if use_compile else model
        self._flops_per_token = getattr(model, "estimate_flops", None)

    # ------------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "batches": self.batches.state_dict(),
            "loop": asdict(self.state),
            "rng": rng_state(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if len(state["optimizers"]) != len(self.optimizers):
            raise UserError(f"the checkpoint holds {len(state['optimizers'])} optimizers, this run has "
                            f"{len(self.optimizers)}; start a fresh run")
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        self.batches.load_state_dict(state["batches"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("the checkpoint holds no EMA of the weights but this run keeps one")
            self.ema.load_state_dict(state["ema"])
        self.state = LoopState(**state["loop"])
        set_rng_state(state["rng"])

    def resume(self) -> int | None:
        """Load the latest checkpoint of the policy's folder; return its step, or None for a fresh start."""
        if self.checkpoints is None:
            return None
        checkpointer = self.checkpoints.checkpointer
        path = checkpointer.latest()
        if path is None:
            return None
        try:
            # to host memory first: load_state_dict copies onto each parameter's device, and the RNG
            # states must stay CPU byte tensors
            self.load_state_dict(checkpointer.load(path, map_location="cpu"))
        except UserError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, MemoryError, OSError) as e:
            # an out-of-memory or a CUDA error is not a bad checkpoint: load_error tells them apart
            raise load_error(e, path, damaged="delete that file to resume from the checkpoint before it",
                             mismatch=f"run the code that wrote it to resume, or move {checkpointer.folder} "
                                      "aside to start over") from None
        return self.state.step

    def save(self, wait: bool = False) -> None:
        """Save a checkpoint of the state now (rank 0); in the background if the policy says so, and then
        `wait` blocks until it is on disk."""
        if self.checkpoints is not None and (self.dist is None or self.dist.is_main):  # rank 0 writes
            checkpointer, state = self.checkpoints.checkpointer, {**self.state_dict(), **self.checkpoints.extra}
            if self.checkpoints.background:
                path = checkpointer.save_async(self.state.step, state)
                if wait:
                    checkpointer.wait()
            else:
                path = checkpointer.save(self.state.step, state)
            self._last_save = self.clock()
            status(self.settings.section, f"checkpoint {path}" + (" (written in the background)"
                                                                  if self.checkpoints.background and not wait else ""))

    # ------------------------------------------------------------------------------------------------
    # Training

    def run(self) -> LoopState:
        """Train until the schedule's horizon, evaluating, logging and saving on the way."""
        s, horizon = self.state, self.schedule.horizon
        session_start, elapsed_before = self.clock(), s.elapsed_s
        self._last_save = session_start
        last_seq_len = None  # a step at a new shape (first of a session, or of a curriculum stage) compiles: untimed
        window = {"tokens": 0, "seconds": 0.0, "flops": 0.0}  # since the last log row: for tok/s and MFU

        def elapsed() -> float:
            return elapsed_before + self.clock() - session_start

        def agreed() -> float:
            # Rank 0's clock steers every rank: one broadcast a step, read where the step's schedule is
            # decided. What only rank 0 acts on (logging, saving) reads the local clock.
            value = elapsed()
            return value if self.dist is None else self.dist.agree(value)

        if s.step == 0 and not s.finished:
            self._evaluate()
        while not s.finished:
            now = agreed()
            if horizon.done(s.tokens, now):
                break
            progress = horizon.progress(s.tokens, now)
            seq_len = self.schedule.seq_len(progress)
            lrm = self.schedule.lr_multiplier(progress, s.step)
            set_lr_multiplier(self.optimizers, lrm)
            set_muon_momentum(self.optimizers, self.schedule.muon_momentum(s.step, progress))
            set_weight_decay_multiplier(self.optimizers, self.schedule.weight_decay_multiplier(progress))

            t0 = self.clock()
            s.loss = self.train_step(seq_len)
            dt = self.clock() - t0
            flops = (self._flops_per_token(seq_len) if self._flops_per_token else 0.0) * self.plan.total_batch
            s.step += 1
            s.tokens += self.plan.total_batch
            s.flops += flops
            s.loss_ema = LOSS_EMA * s.loss_ema + (1 - LOSS_EMA) * s.loss
            if seq_len == last_seq_len:
                s.timed_s += dt
                s.timed_tokens += self.plan.total_batch
                s.timed_flops += flops
                window["tokens"] += self.plan.total_batch
                window["seconds"] += dt
                window["flops"] += flops
            last_seq_len = seq_len
            s.peak_mem_gib = max(s.peak_mem_gib, peak_memory_gib(self.settings.device))
            s.elapsed_s = elapsed()
            last = horizon.done(s.tokens, s.elapsed_s)

            if s.step % self.settings.log_every == 0 or last:  # the curves always end at the last step
                self._log_step(horizon.progress(s.tokens, s.elapsed_s), lrm, seq_len, window)
                window = {"tokens": 0, "seconds": 0.0, "flops": 0.0}
            if self.settings.eval_every and s.step % self.settings.eval_every == 0:
                self._evaluate()
            s.elapsed_s = elapsed()
            if self._save_due() and not last:  # the last step saves below, once finished
                self.save()

        if not s.finished:
            if s.val_step != s.step:
                self._evaluate()
            s.elapsed_s = elapsed()
            s.finished = True
            self.save(wait=True)  # the final state: a kill while the outputs are written resumes here, not earlier
        elif self.checkpoints is not None:
            self.checkpoints.checkpointer.wait()
        return s

    def train_step(self, seq_len: int) -> float:
        """One optimizer step on total_batch tokens at `seq_len`; returns the mean train loss."""
        rows, n = self.plan.rows(seq_len), self.plan.accum_steps(seq_len)
        if self.dist is not None:  # each rank takes its share of the micro-batches (ShardedBatches)
            n //= self.dist.world_size
        micro_batches = (self.batches.next_batch(rows, seq_len) for _ in range(n))
        self.model.train()
        loss = accumulate_gradients(self.forward, micro_batches, n, self.autocast)
        if self.dist is not None:  # average gradients and loss over the ranks before any optimizer sees them
            loss = self.dist.sync_gradients(self.model, loss)
        loss = loss.item()  # host sync
        self._check_loss(loss)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return loss

    def _check_loss(self, loss: float) -> None:
        s, spike = self.state, self.settings.loss_spike
        reason = None
        if not math.isfinite(loss):
            reason = f"the train loss is {loss}"
        elif spike and s.step >= max(SPIKE_GRACE_STEPS, self.schedule.warmup_steps) and loss > spike * s.smooth_loss:
            reason = (f"the train loss spiked to {loss:.4f}, over {spike:g} x its smoothed value {s.smooth_loss:.4f} "
                      f"({self.settings.section}.loss_spike)")
        if reason:
            if self.checkpoints:
                self.checkpoints.checkpointer.wait()  # a checkpoint still being written is a good one
            latest = self.checkpoints.checkpointer.latest() if self.checkpoints else None
            kept = f"the last good checkpoint {latest} is kept" if latest else "no checkpoint was saved yet"
            raise TrainingStopped(
                f"training stopped at step {s.step + 1}: {reason}; {kept}. A rerun resumes there on the same data, "
                f"so lower the learning rates ({self.settings.section}.matrix_lr, embedding_lr, ...) or raise "
                f"{self.settings.section}.loss_spike")

    def _save_due(self) -> bool:
        policy = self.checkpoints
        if policy is None:
            return False
        by_steps = policy.every_steps and self.state.step % policy.every_steps == 0
        by_time = policy.every_s and self.clock() - self._last_save >= policy.every_s
        return bool(by_steps or by_time)

    # ------------------------------------------------------------------------------------------------
    # Measuring

    def _evaluate(self) -> None:
        if self.evaluate is None:
            return
        s = self.state
        results = self.evaluate(self.forward)
        s.val, s.val_step = dict(results), s.step
        self._emit({"step": s.step, "tokens": s.tokens, **results})
        shown = " | ".join(f"{name} {value:.4f}" for name, value in results.items())
        status(self.settings.section, f"step {s.step:,} | {shown}")

    def _log_step(self, progress: float, lrm: float, seq_len: int, window: dict) -> None:
        s = self.state
        tok_per_s = window["tokens"] / window["seconds"] if window["seconds"] else float("nan")
        peak = self.settings.peak_flops
        mfu = window["flops"] / window["seconds"] / peak if peak and window["seconds"] else float("nan")
        row = {
            "step": s.step, "tokens": s.tokens, "progress": progress,
            "train/loss": s.loss, "train/loss_smooth": s.smooth_loss, "train/lrm": lrm, "train/seq_len": seq_len,
            "perf/tok_per_s": tok_per_s, "perf/mfu": mfu, "perf/peak_mem_gib": s.peak_mem_gib,
            "time/elapsed_h": s.elapsed_s / 3600,
        }
        self._emit(row)
        steps = ""
        if self.schedule.horizon.kind == "tokens":
            steps = f"/{math.ceil(self.schedule.horizon.tokens / self.plan.total_batch):,}"
        status(self.settings.section,
               f"step {s.step:,}{steps} ({progress:.1%}) | loss {s.smooth_loss:.4f} | lrm {lrm:.3f} | T {seq_len} | "
               f"{_num(tok_per_s, ',.0f')} tok/s | mfu {_num(mfu, '.1%')} | mem {s.peak_mem_gib:.2f} GiB | "
               f"{_hours(s.elapsed_s)} elapsed, eta {_hours(self._eta(progress))}")

    def _eta(self, progress: float) -> float:
        if self.schedule.horizon.kind == "time":
            return max(0.0, self.schedule.horizon.budget_s - self.state.elapsed_s)
        return self.state.elapsed_s * (1 - progress) / progress if progress else float("nan")

    def _emit(self, row: dict) -> None:
        self.state.history.append(row)
        self.log(row)


def _num(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else "?"


def _hours(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def resume_and_run(trainer: Trainer, live: str, section: str, *, main: bool = True) -> LoopState | None:
    """What a training stage does once its Trainer is built: resume the latest checkpoint (saying which)
    and train to the horizon. The main process logs the curves into the dvclive folder `live` (the resumed
    rows replayed first, so the curves start at step 0) and gets the final state; other data-parallel
    ranks train and get None."""
    resumed = trainer.resume()
    folder = trainer.checkpoints.checkpointer.folder if trainer.checkpoints else None
    status(section, f"run {folder}: " + (f"resuming after step {resumed:,}" if resumed is not None else "fresh start"))
    if not main:
        trainer.run()
        return None
    log = LiveLog(live)
    log.replay(trainer.state.history)
    trainer.log = log.log
    state = trainer.run()
    log.close()
    return state
