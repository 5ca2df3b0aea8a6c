"""What every stage entry point shares: one-line errors, progress bars, status lines.

A stage's `main()` raises `UserError` for anything a person can fix; `run()` turns it into
`error: <line>` on stderr and exit status 2. An unexpected exception keeps its traceback (it is a bug
to report) and is followed by a one-line summary, so the last line of a failed stage always says what
happened.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

from daychat.errors import UserError

T = TypeVar("T")


def run(main: Callable[[], object], name: str) -> None:
    """Call a stage's `main()` and exit the process with a status a workflow engine understands."""
    t0 = time.time()
    try:
        main()
    except UserError as e:
        print(f"error: [{name}] {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"error: [{name}] interrupted; nothing half-written was kept", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: keep the traceback, then say it in one line
        traceback.print_exc()
        print(f"error: [{name}] failed with {type(e).__name__}: {e} (traceback above)", file=sys.stderr, flush=True)
        sys.exit(1)
    status(name, f"done in {time.time() - t0:.1f}s")


def status(name: str, message: str) -> None:
    """One compact line a person can follow in a long log: `[stage] message`."""
    print(f"[{name}] {message}", flush=True)


def progress(iterable: Iterable[T] | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", unit_scale: bool = False) -> tqdm:
    """A progress bar with rate and ETA on stderr; refreshes at most every half second in logs."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                mininterval=0.5, dynamic_ncols=True, file=sys.stderr, leave=True)


def parse_args_with_parts(parser: argparse.ArgumentParser, *, shard: str, gather: str,
                          listing: str | None = None) -> argparse.Namespace:
    """Add a data stage's per-shard options (Snakemake's per-shard mode, see workflow/dag.py) and parse:
    `--shard NAME --parts DIR` makes one shard's part, `--gather --parts DIR` the outputs from the parts,
    and with `listing`, `--list --parts DIR` writes the stage's own shard list. The help texts say what
    this stage does in each mode."""
    mode = parser.add_mutually_exclusive_group()
    modes = []
    if listing:
        mode.add_argument("--list", action="store_true", help=listing)
        modes.append("--list")
    mode.add_argument("--shard", help=shard)
    mode.add_argument("--gather", action="store_true", help=gather)
    modes += ["--shard NAME", "--gather"]
    parser.add_argument("--parts", help=f"folder of per-shard parts, one subfolder per shard (with "
                                        f"{'/'.join(m.split()[0] for m in modes)})")
    args = parser.parse_args()
    if bool(getattr(args, "list", False) or args.shard or args.gather) != bool(args.parts):
        parser.error(f"--parts goes with {', '.join(modes[:-1])} or {modes[-1]}, and they need it")
    return args
