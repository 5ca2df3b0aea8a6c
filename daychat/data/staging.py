"""Host-to-device copies of token batches that overlap the GPU's work: pinned staging, two slots.

    staging = PinnedStaging(device)
    inputs, targets = staging.to_device(inputs_np, targets_np)    # (rows, T) int64 arrays -> device tensors

On CUDA each batch is written into page-locked (pinned) host memory and copied with non_blocking=True as
one (2, rows, T) transfer, so the copy runs while the GPU is still busy with the previous micro-batch, and
the host never waits on it. Two slots alternate; before a slot is written again, the event recorded after
its last copy is waited on, so the host never overwrites memory a copy may still be reading. Off CUDA the
arrays are simply wrapped (no copy on a CPU).

The pretraining loader and the SFT batches both hand their batches over through this.
"""

from __future__ import annotations

import numpy as np
import torch


class PinnedStaging:
    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._slots: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # pinned buffers, CUDA only
        self._slot = 0

    def to_device(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (rows, T) int64 on the device (sliced views are fine: copied here)."""
        if self.device.type != "cuda":
            return (torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device),
                    torch.from_numpy(np.ascontiguousarray(targets)).to(self.device))
        staging, done = self._staging(inputs.shape)
        done.synchronize()  # the copy that last read this slot has finished (a no-op for a fresh event)
        staging[0].copy_(torch.from_numpy(inputs))
        staging[1].copy_(torch.from_numpy(targets))
        batch = staging.to(self.device, non_blocking=True)  # (2, rows, T): one transfer
        done.record()
        return batch[0], batch[1]

    def _staging(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.cuda.Event]:
        if not self._slots or self._slots[0][0].shape != (2, *shape):
            self._slots = [(torch.empty((2, *shape), dtype=torch.int64, pin_memory=True), torch.cuda.Event())
                           for _ in range(2)]
        self._slot = (self._slot + 1) % len(self._slots)
        return self._slots[self._slot]
