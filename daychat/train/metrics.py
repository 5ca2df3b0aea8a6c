"""What a training run measures about itself: the device's peak, MFU, peak memory, and the dvclive log.

MFU is model FLOPs per second (the model's own count, `estimate_flops`, nanochat's convention) over the
device's peak: the dense bf16 tensor-core peak from daychat.model.accounting's table on a CUDA card, or, on
a CPU, the fp32 matmul rate measured on the spot (a CPU has no datasheet peak worth comparing to, and
what its BLAS reaches on a large square matmul is the honest ceiling).

`LiveLog` writes the step-wise rows through dvclive (`Live(dvcyaml=False, save_dvc_exp=False)`: it never
touches dvc.yaml or the experiment refs) as one TSV per metric that `dvc plots show` draws. The rows are
also kept in the checkpoint, and replayed into a fresh log on resume: the engines delete a stage's outputs
before rerunning it, the log folder included, and the curves must still start at step 0.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Iterable

import torch

from daychat.errors import UserError
from daychat.model.accounting import peak_bf16_flops


def pick_device(choice: str, key: str) -> torch.device:
    """The device a `device: auto | cuda | cpu` param names; `key` (e.g. "pretrain.device") is the param,
    named in the one-line error when it asks for CUDA on a machine without it."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError(f"params.yaml: {key} is cuda but no CUDA device is visible; use auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s MFU is measured against, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_bf16_flops(name)
        return peak, (f"dense bf16 peak of {name}" if peak else f"{name} is not in the peak table")
    return measured_matmul_flops(), "fp32 matmul rate measured on this CPU (1024^2 x 1024, best of 3)"


def measured_matmul_flops(n: int = 1024, repeats: int = 3) -> float:
    """Best-of FLOP/s of an (n x n) @ (n x n) fp32 matmul on the CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up the BLAS thread pool
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of the run so far: allocated on the CUDA device, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


class LiveLog:
    """Step-wise metrics into dvclive TSVs under `folder` (one file per metric, `step` as x)."""

    def __init__(self, folder: str | Path):
        from dvclive import Live  # imports DVC: only when a run logs

        self.live = Live(dir=str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=False)

    def log(self, row: dict) -> None:
        """One row: {"step": n, "<metric>": value, ...}; non-numeric values are skipped."""
        self.live.step = int(row["step"])
        for name, value in row.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if name != "step" and numeric and math.isfinite(value):  # no 'nan' rows in the TSVs
                self.live.log_metric(name, value)

    def replay(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.log(row)
        self.live.make_summary()

    def close(self) -> None:
        self.live.make_summary()
