"""What every stage entry point shares: one-line errors, progress bars, status lines, and a clean start.

A stage's `main()` raises `UserError` for anything a person can fix; `run()` turns it into
`error: <line>` on stderr and exit status 2. A full disk is one of those, however deep it was raised
(`disk full: ...`). An unexpected exception keeps its traceback (it is a bug to report) and is followed
by a one-line summary, so the last line of a failed stage always says what happened.

Before `main()`, in a workspace (a folder with dvc.yaml), `run()` makes the start clean whatever killed the
last attempt (kill -9, a reboot, a full disk):
- it takes the stage's lock (`.cache/locks/<stage>.lock`, a `flock` the kernel releases when the process
  dies, so it is never stale): a second copy of the same stage, e.g. one left running by a killed engine,
  makes this one refuse in one line instead of both writing the same outputs;
- it deletes the temporaries killed writers left beside the stage's outputs (daychat.io.clean_stale_temps);
- it validates the whole params.yaml, not only its own section (`daychat.params.validate_all`): under
  `dvc repro` this is the earliest point a bad key anywhere can be caught, before hours of upstream work
  (under Snakemake the Snakefile did it already, before the first job).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from daychat.errors import UserError
from daychat.io import disk_full, disk_full_message
from daychat.progress import progress, status  # noqa: F401  (the stages take them from here)


def run(main: Callable[[], object], name: str) -> None:
    """Call a stage's `main()` and exit the process with a status a workflow engine understands."""
    t0 = time.time()
    try:
        start_clean(name, sys.argv[1:])
        main()
        note_finished(name, sys.argv[1:])
    except UserError as e:
        print(f"error: [{name}] {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"error: [{name}] interrupted; nothing half-written was kept", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: keep the traceback, then say it in one line
        if (full := disk_full(e)) is not None:  # not a bug: say it plainly (torch, pyarrow... wrap ENOSPC)
            print(f"error: [{name}] {disk_full_message(full)}", file=sys.stderr, flush=True)
            sys.exit(2)
        traceback.print_exc()
        print(f"error: [{name}] failed with {type(e).__name__}: {e} (traceback above)", file=sys.stderr, flush=True)
        sys.exit(1)
    status(name, f"done in {time.time() - t0:.1f}s")


# A file (named by whoever started the stage: the Snakefile) where a stage that finished appends its name, so
# that the engine can record it even if the engine itself is killed before it could (see workflow/guard.py).
JOURNAL_ENV = "DAYCHAT_JOURNAL"


def note_finished(name: str, argv: list[str]) -> None:
    """Append `name` to the journal, if one is kept, once the stage's outputs are whole (its per-shard
    and listing jobs are not the stage)."""
    journal = os.environ.get(JOURNAL_ENV)
    if journal and "--shard" not in argv and "--list" not in argv:
        Path(journal).parent.mkdir(parents=True, exist_ok=True)
        with open(journal, "a") as f:  # one short line: appends of a few bytes do not interleave
            f.write(name + "\n")


# Set in the environment of a stage that holds its lock, so that the processes it becomes or starts (the
# torchrun re-exec of a data-parallel stage and its ranks) know the lock is theirs already.
LOCK_ENV = "DAYCHAT_STAGE_LOCK"
LOCK_DIR = ".cache/locks"
_held: list = []  # the open lock files: a flock lives as long as its file stays open


def start_clean(name: str, argv: list[str], root: str | os.PathLike = ".") -> None:
    """Lock the stage, delete its stale temporaries and validate params.yaml (see the module docstring).
    Outside a workspace (no dvc.yaml: a stage run by hand in a scratch folder, the tests) only the params
    check runs, and only when there is a params.yaml."""
    from daychat.io import clean_stale_temps
    from daychat.params import PARAMS_FILE, validate_all

    root = Path(root)
    if os.environ.get(LOCK_ENV):  # a parent process of this very stage did all of it
        return
    if (root / "dvc.yaml").is_file():
        job = _job_name(name, argv)
        _lock(root / LOCK_DIR / f"{job}.lock", job)
        removed = [p for out in _outputs_of(root, name, argv) for p in clean_stale_temps(root / out)]
        if removed:
            status(name, "deleted what a killed run left: " + ", ".join(str(p) for p in removed))
    # Under the Snakefile (which sets JOURNAL_ENV for its jobs, and only its per-shard jobs pass --shard or
    # --list) the whole file was checked at DAG build: no need to import torch again for it in every job.
    if (root / PARAMS_FILE).is_file() and not (os.environ.get(JOURNAL_ENV) or "--shard" in argv or "--list" in argv):
        validate_all(root / PARAMS_FILE)


def _job_name(name: str, argv: list[str]) -> str:
    """The stage, or one of its per-shard jobs (`--shard NAME`, `--list`): jobs of one stage may run at once."""
    if "--shard" in argv and argv.index("--shard") + 1 < len(argv):
        return f"{name}.shard.{argv[argv.index('--shard') + 1]}"
    return f"{name}.list" if "--list" in argv else name


def _outputs_of(root: Path, name: str, argv: list[str]) -> list[str]:
    """What this job writes: its shard's part folder, its shard list, or the stage's outputs in dvc.yaml."""
    parts = argv[argv.index("--parts") + 1] if "--parts" in argv and argv.index("--parts") + 1 < len(argv) else None
    if parts and "--shard" in argv:
        return [os.path.join(parts, _job_name(name, argv).split(".shard.", 1)[1])]
    if parts and "--list" in argv:
        return [os.path.join(parts, "shards.json")]
    import yaml

    outputs = []
    for file in ("dvc.yaml", "planning/dvc.yaml"):
        try:
            stage = ((yaml.safe_load((root / file).read_text()) or {}).get("stages") or {}).get(name)
        except (OSError, yaml.YAMLError):
            continue
        for key in ("outs", "metrics", "plots"):
            for entry in (stage or {}).get(key) or []:
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                if isinstance(path, str) and "${" not in path:
                    outputs.append(path)
    return outputs


def _lock(path: Path, job: str) -> None:
    """Hold `path` locked for the life of this process (and of what it execs), or refuse in one line."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{job} is already running in this workspace ({holder}), maybe left behind by a killed "
                        "run; wait for it to end (or stop it), then rerun the same command") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    os.set_inheritable(fd, True)  # kept across the exec into torchrun (daychat.train.distributed.relaunch)
    _held.append(fd)
    os.environ[LOCK_ENV] = str(path)


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
