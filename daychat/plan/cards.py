"""The GPUs a plan can be made for: dense tensor-core peaks and memory.

The bf16 peak of each card is NOT written here: it comes from daychat.model.accounting.PEAK_BF16_TFLOPS (the
table the training loop's MFU uses, with its datasheet citations), looked up by the card's device name, so the
planner and the MFU a run logs can never disagree. This table adds what only the planner needs: the FP8 dense
peak (for reference; the recipes train in bf16) and the memory.

All peaks are DENSE (no 2:4 sparsity), with fp32 accumulate: the numbers vendors print first are often the
sparse ones, twice as large.
"""

from __future__ import annotations

from dataclasses import dataclass

from daychat.model.accounting import peak_bf16_flops

GIB = 2**30


@dataclass(frozen=True)
class Card:
    key: str  # what --card takes
    device_name: str  # as torch.cuda.get_device_name() spells it (matched against accounting's table)
    memory_gib: float  # memory the card reports (nvidia-smi total), GiB
    fp8_tflops: float | None  # dense FP8 tensor peak with fp32 accumulate; None: no FP8 tensor cores

    @property
    def bf16_flops(self) -> float:
        """Dense bf16 peak in FLOP/s, from daychat.model.accounting."""
        peak = peak_bf16_flops(self.device_name)
        if peak is None:
            raise KeyError(f"{self.device_name!r} has no bf16 peak in daychat.model.accounting.PEAK_BF16_TFLOPS")
        return peak

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def describe(self) -> str:
        fp8 = f"{self.fp8_tflops:g} TFLOPS FP8" if self.fp8_tflops else "no FP8"
        return f"{self.device_name}: {self.bf16_flops / 1e12:g} TFLOPS bf16 dense, {fp8}, {self.memory_gib:g} GiB"


CARDS: dict[str, Card] = {card.key: card for card in [
    # NVIDIA Ampere GA102 whitepaper (GeForce RTX 3090): 24 GB GDDR6X; FP8 tensor cores arrived with Ada/Hopper.
    Card("rtx3090", "NVIDIA GeForce RTX 3090", 24.0, None),
    # NVIDIA Ada GPU Architecture whitepaper, Appendix A (GeForce RTX 4090): 24 GB GDDR6X; peak FP8 tensor
    # TFLOPS with FP32 accumulate 330.3 dense (660.6 sparse).
    Card("rtx4090", "NVIDIA GeForce RTX 4090", 24.0, 330.3),
    # NVIDIA RTX Blackwell GPU Architecture whitepaper (GeForce RTX 5090): 32 GB GDDR7; FP8 tensor with FP32
    # accumulate 419 dense (838 sparse).
    Card("rtx5090", "NVIDIA GeForce RTX 5090", 32.0, 419.0),
    # NVIDIA A100 Tensor Core GPU datasheet: 40 GB HBM2 / 80 GB HBM2e; no FP8.
    Card("a100-40gb", "NVIDIA A100-SXM4-40GB", 40.0, None),
    Card("a100-80gb", "NVIDIA A100-SXM4-80GB", 80.0, None),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM): 80 GB HBM3; FP8 3,958 TFLOPS with sparsity -> 1,979 dense.
    Card("h100", "NVIDIA H100 80GB HBM3", 80.0, 1979.0),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e (nvidia-smi: 143,771 MiB = 140.4 GiB);
    # FP8 3,958 TFLOPS with sparsity -> 1,979 dense.
    Card("h200", "NVIDIA H200", 140.4, 1979.0),
]}


def get_card(key: str) -> Card:
    try:
        return CARDS[key.lower()]
    except KeyError:
        raise KeyError(f"unknown card {key!r} (known: {', '.join(CARDS)})") from None
