"""Share a finished run through a DVC remote: push it from the machine that ran it, pull it on another one,
and tell Snakemake that what was pulled is up to date, so that nothing reruns.

Git carries the small things: dvc.lock (the hash of every output, and of the code, data and params each
stage was run on), params.yaml, and the outputs dvc.yaml marks `cache: false` (metrics, curves, the
report). The DVC remote carries the rest (data/, models/, reports/core) by content hash: a directory all
machines can see, or S3 (`pip install dvc-s3`).

    dvc remote add -d store /shared/daychat-store        # once: a shared directory ...
    dvc remote add -d store s3://my-bucket/daychat       # ... or a bucket; commit .dvc/config
    python -m workflow.remote push                       # machine A, after a run (root or runs/<recipe>)
    python -m workflow.remote pull                       # machine B, after `git pull` / `git clone`

`pull` is `dvc pull` then `snakemake --touch all`: Snakemake keeps its own records (file times, and the
params each output was made with, under .snakemake/), which a fresh checkout does not have, so without the
touch it would rerun every stage. A recipe workspace (runs/<recipe>/, see workflow/workspace.py) is a git
repository of its own: `push` commits its dvc.lock and small outputs there, and machine B clones it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from workflow import dag
from workflow.workspace import ROOT, _rel, tool_env

UP_TO_DATE = "Data and pipelines are up to date"


def resolve(where: str | None) -> Path:
    """The project root (default), a folder, or a recipe name meaning runs/<recipe>/."""
    if where is None:
        return ROOT
    path = Path(where)
    if path.is_dir():
        return path.resolve()
    ws = ROOT / "runs" / where
    if ws.is_dir():
        return ws
    raise SystemExit(f"error: [remote] {where!r} is neither a folder nor a recipe workspace in {_rel(ROOT / 'runs')}/")


def pipeline(ws: Path) -> list[str]:
    """The stages of `all`: on-demand ones (probe, plan) need not have run, and are neither pushed nor checked."""
    return [s.name for s in dag.load_stages(ws) if not s.on_demand]


def push(ws: Path, remote: str | None = None) -> None:
    """Upload a finished run's cached outputs; in a recipe workspace, also commit what git carries."""
    status = _out(["dvc", "status", *pipeline(ws)], ws)
    if UP_TO_DATE not in status:
        # Pushing now would share outputs that dvc.lock does not describe (or describe outputs not there).
        raise SystemExit(f"error: [remote] {_rel(ws)} is not up to date, finish the run first "
                         f"(snakemake all, or dvc repro):\n{status.strip()}")
    _check(["dvc", "push", *(["-r", remote] if remote else []), *pipeline(ws)], ws)
    if ws.resolve() == ROOT.resolve():
        print("[remote] pushed. Now commit dvc.lock, params.yaml and reports/ to git and push them: "
              "another machine needs them to know what to pull.")
        return
    # A workspace's git is its own (workflow/workspace.py): its .gitignore files (ours and those DVC
    # writes for cached outputs) leave exactly what git should carry.
    _check(["git", "add", "-A"], ws)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=ws).returncode != 0:
        _check(["git", "-c", "user.name=daychat", "-c", "user.email=daychat@localhost", "commit", "-q",
                "-m", "daychat: results (dvc.lock, metrics, report)"], ws)
    print(f"[remote] pushed. On another machine: git clone {ws} && python -m workflow.remote pull <the clone>")


def pull(ws: Path, remote: str | None = None) -> None:
    """Download the outputs dvc.lock names, then mark them up to date for Snakemake (nothing reruns)."""
    _check(["dvc", "pull", *(["-r", remote] if remote else []), *pipeline(ws)], ws)
    # --touch walks the DAG in order, setting file times and Snakemake's records (params included) as if
    # each stage had just run; it runs no stage. The Snakefile's onsuccess then `dvc commit`s, which
    # re-hashes the touched outputs and finds dvc.lock unchanged.
    _check([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(ws),
            "--cores", "1", "--touch", "all"], ws)
    status = _out(["dvc", "status", *pipeline(ws)], ws)
    if UP_TO_DATE not in status:
        raise SystemExit(f"error: [remote] pulled, but {_rel(ws)} is still not up to date:\n{status.strip()}")
    print(f"[remote] {_rel(ws)} is up to date: `snakemake all` and `dvc repro` have nothing to do.")


def _out(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: [remote] `{' '.join(cmd)}` failed in {_rel(cwd)}: "
                         f"{(result.stderr or result.stdout).strip()}")
    return result.stdout + result.stderr


def _check(cmd: list[str], cwd: Path) -> None:
    print(f"[remote] {_rel(cwd)}$ {' '.join(cmd if cmd[0] != sys.executable else ['snakemake', *cmd[3:]])}",
          flush=True)
    if subprocess.run(cmd, cwd=cwd, env=tool_env()).returncode != 0:
        raise SystemExit(f"error: [remote] `{' '.join(cmd)}` failed in {_rel(cwd)}; see the messages above")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.remote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("push", "check the run is up to date, dvc push (and commit a workspace's results)"),
                        ("pull", "dvc pull, then snakemake --touch all: nothing reruns")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("where", nargs="?", help="project root (default), a folder, or a recipe (runs/<recipe>/)")
        p.add_argument("-r", "--remote", help="DVC remote name (default: the one set with `dvc remote add -d`)")
    args = parser.parse_args(argv)
    (push if args.command == "push" else pull)(resolve(args.where), args.remote)


if __name__ == "__main__":
    main()
