"""What a long step shows a person: one-line status messages and progress bars with rate and ETA.

Library code (the data passes, the training loop) reports through these; `daychat.cli`, the stages' entry
layer, re-exports them. They live here, below every other daychat module, so that the library never
imports the entry layer (which validates params.yaml, and so imports the domains that check it).
"""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def status(name: str, message: str) -> None:
    """One compact line a person can follow in a long log: `[stage] message`."""
    print(f"[{name}] {message}", flush=True)


def progress(iterable: Iterable[T] | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", unit_scale: bool = False) -> tqdm:
    """A progress bar with rate and ETA on stderr; refreshes at most every half second in logs."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                mininterval=0.5, dynamic_ncols=True, file=sys.stderr, leave=True)
