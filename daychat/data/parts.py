"""Per-shard parts: what a stage's `--shard NAME --parts DIR` job leaves for its `--gather --parts DIR` job
(Snakemake's per-shard mode, see workflow/dag.py).

A part is the folder DIR/NAME/, built under a temporary name and renamed into place by the shard job
(daychat.io.atomic_dir), so a part folder that exists is a finished one. It holds the stage's files for
that shard and part.json: what it was made from (checked by the gather against what the run needs now,
so a part left from other inputs is never taken) and when it ran.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, TypeVar

from daychat.errors import UserError

PART = "part.json"

S = TypeVar("S")


def find_shard(shards: Sequence[S], name: str, listed_in: str | os.PathLike) -> S:
    """The shard called `name` (its `.name`) among `shards`, the list read from `listed_in`."""
    for shard in shards:
        if shard.name == name:
            return shard
    raise UserError(f"shard {name!r} is not listed in {listed_in} (it lists {', '.join(s.name for s in shards)})")


def read_part(parts: str | os.PathLike, name: str, stage: str, of: str | os.PathLike | None = None) -> dict:
    """part.json of shard `name` in `parts`; a missing or unreadable one is a one-line error that says
    which shard job to run (`stage`.py) again. `of` names the dataset the shard belongs to."""
    path = Path(parts) / name / PART
    if not path.is_file():
        shard = f"shard {name} of {of}" if of else f"shard {name}"
        raise UserError(f"{path} not found: {shard} has no finished part "
                        f"(run `{stage}.py --shard {name} --parts {parts}` first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise corrupt(path, e) from None


def corrupt(path: Path, error: Exception) -> UserError:
    """The error for a part whose files do not read back: delete it and rerun its shard job."""
    return UserError(f"{path} is corrupt ({error}); delete {path.parent} and rerun its shard job")
