"""Data-parallel training (the pretrain and sft stages) over several GPUs of one machine, under torchrun.

How a run is launched: a stage asked for `<section>.gpus: N > 1` and not already under torchrun (no
WORLD_SIZE in the environment) re-executes itself (`setup()`) as

    python -m torch.distributed.run --standalone --nproc_per_node=N stages/<stage>.py <the same arguments>

so dvc.yaml's command stays the same for one GPU or eight. Each process then calls `init()`: NCCL on CUDA
(one device per LOCAL_RANK), gloo on the CPU (tests).

How the work is split, and why it gives the single-process result: every rank runs the SAME PackedLoader
(or SftBatches) with the same seed, so every rank packs the same sequence of micro-batches. An optimizer
step is accum_steps micro-batches of device_batch rows in one process; with W ranks, rank r takes micro-batches
r, r + W, r + 2W, ... of that same sequence (`ShardedBatches`) and the others are packed and dropped. Each
rank accumulates the mean loss over its accum_steps / W micro-batches; the gradients are then averaged
over the ranks after accumulation, in bucketed all-reduces (Distributed.sync_gradients), BEFORE the optimizers step - so Muon
orthogonalises the full-batch gradient, exactly the one a single process sums (up to float summation
order). Optimizer steps are then the same computation on the same numbers on every rank: the weights stay
identical without broadcasting them. Packing costs a few ms of CPU a step, so redundant packing is cheaper
than coordinating a shared reader, and the loader's state_dict (the checkpoint's) is the same on every rank.

Who does what: every rank trains; rank 0 alone evaluates, logs, writes checkpoints, the curves, the model
folder and the metrics (the others wait at their next all-reduce; the process group's timeout is raised to
cover an evaluation). Every rank resumes from rank 0's checkpoints. The loop's wall-clock decisions (a
time horizon's progress, hence the learning rate and the sequence length) use rank 0's clock, broadcast,
so that ranks can never disagree on the schedule.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Ranks other than 0 wait at their next collective while rank 0 evaluates (val bpb + the CORE proxy take a
# few minutes on the real recipe): well above that, so a slow evaluation is not mistaken for a hang.
TIMEOUT = timedelta(minutes=60)


# Gradient all-reduce buckets (DDP's default is 25 MiB): large enough that each transfer runs at bandwidth,
# small enough that two in flight cost little memory.
BUCKET_BYTES = 64 * 2 ** 20


def buckets(tensors: list[torch.Tensor], max_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of same-dtype tensors of at most max_bytes each (a larger tensor is a group alone)."""
    groups: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if groups and size + nbytes <= max_bytes and groups[-1][0].dtype == t.dtype:
            groups[-1].append(t)
            size += nbytes
        else:
            groups.append([t])
            size = nbytes
    return groups


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def torchrun_command(gpus: int, script: str, args: list[str]) -> list[str]:
    """The command that runs `script args` as `gpus` processes of one machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", script, *args]


def relaunch(gpus: int, script: str, args: list[str]) -> None:
    """Replace this process by torchrun running `gpus` copies of `script args` (does not return)."""
    sys.stdout.flush()
    sys.stderr.flush()
    command = torchrun_command(gpus, script, args)
    os.execv(command[0], command)


def setup(section: str, gpus: int, device_choice: str, script: str) -> Distributed | None:
    """None for one process. For `<section>.gpus` > 1: check the devices, re-exec `script` (the stage, with
    this process's arguments) under torchrun when not already there (does not return), else join the group.

    device_choice is the section's `device`: cpu with gpus > 1 runs gloo processes on the CPU, slower than
    one process, for tests only."""
    from daychat.progress import status
    from daychat.errors import UserError

    if gpus == 1:
        return None
    if device_choice != "cpu":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < gpus:
            raise UserError(f"params.yaml: {section}.gpus is {gpus} but {visible} CUDA device(s) are visible; lower "
                            f"{section}.gpus ({section}.device: cpu runs CPU processes, for testing only)")
    if not under_torchrun():
        status(section, f"relaunching under torchrun with {gpus} processes")
        relaunch(gpus, os.path.abspath(script), sys.argv[1:])
    if int(os.environ["WORLD_SIZE"]) != gpus:
        raise UserError(f"params.yaml: {section}.gpus is {gpus} but torchrun started {os.environ['WORLD_SIZE']} "
                        f"processes; launch plainly (the stage starts torchrun itself) or match --nproc_per_node")
    return init("cpu" if device_choice == "cpu" else "cuda")


@dataclass
class Distributed:
    """This process's place in the group, and the collectives the loop needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @torch.no_grad()
    def sync_gradients(self, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """Average every parameter's gradient and the step's loss over the ranks (in place); returns the loss.

        The gradients go in buckets of about BUCKET_BYTES (a d17 has ~150 parameters, some of a few
        hundred bytes: one all-reduce each would be latency-bound), each flattened into one fp32 buffer and
        all-reduced asynchronously; at most two buckets are in flight, so the next bucket's copy overlaps
        the current one's transfer and the extra memory is two buckets. Summed in a fixed order, as plain
        all-reduces: exact, and Muon sees the averaged gradient. Once per optimizer step, after the last
        micro-batch (the compiled backward hands every gradient over at its end, so a per-parameter hook
        would have nothing to overlap with)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        pending: list[tuple[object, torch.Tensor, list[torch.Tensor]]] = []

        def finish(handle, flat: torch.Tensor, members: list[torch.Tensor]) -> None:
            handle.wait()
            flat.div_(self.world_size)
            offset = 0
            for g in members:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

        for members in buckets(grads, BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in members]) if len(members) > 1 else members[0].reshape(-1).clone()
            pending.append((dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True), flat, members))
            if len(pending) == 2:
                finish(*pending.pop(0))
        for item in pending:
            finish(*item)
        loss = loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        return loss / self.world_size

    @torch.no_grad()
    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Rank 0's initial weights on every rank (the same seed gives the same init already; this makes
        sure of it whatever the device's RNG does)."""
        for p in model.parameters():
            dist.broadcast(p.data, src=0)

    def agree(self, value: float) -> float:
        """Rank 0's `value` on every rank (for clock readings that steer the schedule)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def barrier(self) -> None:
        dist.barrier()


def init(device_choice: str) -> Distributed:
    """Join the torchrun group: NCCL + cuda:LOCAL_RANK when `device_choice` is cuda, gloo + cpu otherwise."""
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_choice == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return Distributed(rank, world, local, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ShardedBatches:
    """Rank `rank`'s share of a batch source: of every `world_size` consecutive micro-batches the source
    produces, the `rank`-th (the others are packed and dropped). The state is the source's own, the same on
    every rank."""

    def __init__(self, loader, rank: int, world_size: int):
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def next_batch(self, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = None
        for r in range(self.world_size):
            if r == self.rank:
                batch = self.loader.next_batch(rows, seq_len)
            else:
                self.loader.pack(rows, seq_len)  # advance the shared sequence without a device copy
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
