"""Measuring peak memory of a piece of work, on a CUDA card or a CPU, each in its own child process.

    meter = Meter(device)        # in the child, after imports and any warm-up
    meter.reset()                # the peak from here on
    ... work ...
    meter.peak()                 # bytes above the baseline taken by Meter() (or the last rebase())

    result = run_child("daychat.plan.rehearse", spec, device="cpu", timeout_s=600)   # in the parent

CUDA: torch.cuda.max_memory_allocated (reset_peak_memory_stats), which is what the memory model's
`allocated` figures compare with (the CUDA context and the allocator's slack are outside it).

CPU (Linux; torch has no max_memory_allocated there): the kernel's resident-set high-water mark VmHWM
(/proc/self/status), reset with `echo 5 > /proc/self/clear_refs`, minus the RSS when the Meter was made.
For RSS to follow live tensor bytes the child runs with MALLOC_MMAP_THRESHOLD_=65536 (run_child sets it):
glibc then serves every block of 64 KiB or more with its own mmap and unmaps it on free, instead of keeping
freed memory in its arenas, which would make the high-water mark depend on reuse order.

A child is a fresh process so that its peak is its own and an out-of-memory error or a crash cannot take
the next measurement down; its result is the last line of its stdout, as JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB (Linux)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)), int(re.search(r"VmHWM:\s+(\d+)", text).group(1))


class Meter:
    """Peak memory above a baseline, for one device (see the module docstring)."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rebase()

    def rebase(self) -> None:
        """Take the current usage as the baseline (before the model is built: the model is measured too)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = rss_kib()[0] * 1024
        self.reset()

    def reset(self) -> None:
        """Start a new peak from the current usage."""
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        """Bytes at the peak since the last reset, above the baseline."""
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return rss_kib()[1] * 1024 - self.base

    def reserved(self) -> int | None:
        """What the CUDA caching allocator holds at its peak (None on a CPU)."""
        import torch

        return torch.cuda.max_memory_reserved(self.device) if self.cuda else None


def run_child(module: str, spec: dict, *, device: str, timeout_s: float, threads: int = 0) -> dict:
    """`python -m module '<json spec>'` in a fresh process; its last stdout line parsed as JSON. A crash,
    an out-of-memory kill or a timeout is returned as {"error": ..., "oom": bool}, never raised."""
    root = Path(__file__).resolve().parents[2]  # the folder that holds the daychat package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "PYTORCH_ALLOC_CONF": os.environ.get("PYTORCH_ALLOC_CONF", "expandable_segments:True")}
    if device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # RSS follows live tensors (see the module docstring)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
    try:
        out = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], env=env, capture_output=True,
                             text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"oom": False, "error": f"timed out after {timeout_s:g} s"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
        oom = "out of memory" in out.stderr.lower() or out.returncode in (-9, 137)
        return {"oom": oom, "error": lines[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])
