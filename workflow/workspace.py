"""Recipe workspaces: run a recipe from workflow/recipes/ in runs/<recipe>/ without touching the root run.

A workspace is a small project of its own, so that both engines, DVC's locks and `dvc exp` work in it
exactly as at the root:

    runs/demo/
      params.yaml     <- workflow/recipes/demo.yaml (re-synced on every `sync`)
      dvc.yaml        <- the project's dvc.yaml, byte for byte
      planning/dvc.yaml  <- the on-demand stages (probe, plan), byte for byte
      stages/ daychat/ workflow/ Snakefile profiles/   symlinks to the project's code: code deps resolve, edits
                      rerun stages, and `snakemake` / `dvc` work from inside the workspace
      .git/ .dvc/     its own git and DVC repos (locks, cache, experiments stay inside)
      data/ models/ reports/   outputs

Usage (from the project root):
    python -m workflow.workspace run demo                 # sync + snakemake all + summary
    python -m workflow.workspace run ci --engine dvc      # sync + dvc repro
    python -m workflow.workspace sync demo                # just (re)create runs/demo/
    python -m workflow.workspace run demo --profile workflow/profiles/slurm   # one batch job per stage
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from daychat.params import SCHEMA_FILE, with_schema_line
from workflow import dag

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "workflow" / "recipes"
CODE_LINKS = ("stages", "daychat", "workflow", "Snakefile", "profiles")  # code deps, commands, the engine and its default profile
# logs/ and benchmarks/: Snakemake's per-job logs and benchmarks (the Snakefile's log: and benchmark:), not DVC's
GITIGNORE = ".snakemake/\n.cache/\n.snakemake_timestamp\nlogs/\nbenchmarks/\n"
DVCIGNORE = GITIGNORE  # the same scratch, for both tools


def recipe_path(recipe: str) -> Path:
    path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise SystemExit(f"error: recipe {recipe!r} not found (known: {known})")
    return path


def tool_env() -> dict[str, str]:
    """The environment stages run in: this interpreter's `python`, `dvc` and `snakemake` come first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def sync(recipe: str, workspace: str | Path | None = None, code_root: str | Path | None = None) -> Path:
    """Create or refresh the workspace of a recipe; return its path. Cheap when nothing changed.
    `code_root`: where the code links point (default: the project; workflow/ablate.py passes a frozen copy)."""
    src = recipe_path(recipe)
    ws = Path(workspace) if workspace else ROOT / "runs" / src.stem
    ws.mkdir(parents=True, exist_ok=True)
    # The recipe's first line names the schema from workflow/recipes/; the workspace's own `workflow` link
    # makes the root's path resolve from runs/<name>/ as from the project root.
    changed = _write_if_changed(ws / "params.yaml", with_schema_line(src.read_text(), SCHEMA_FILE))
    changed |= _copy_if_changed(ROOT / "dvc.yaml", ws / "dvc.yaml")
    (ws / "planning").mkdir(exist_ok=True)
    changed |= _copy_if_changed(ROOT / dag.PLANNING_FILE, ws / dag.PLANNING_FILE)
    for name in CODE_LINKS:
        link, target = ws / name, Path(code_root or ROOT) / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link)
        link.symlink_to(target, target_is_directory=True)
        changed = True
    changed |= _write_if_changed(ws / ".gitignore", GITIGNORE)
    env = tool_env()
    if not (ws / ".git").exists():
        _quiet(["git", "init", "-q"], ws, env)
        changed = True
    if not (ws / ".dvc").exists():
        _quiet(["dvc", "init", "-q"], ws, env)
        _quiet(["dvc", "config", "core.analytics", "false"], ws, env)
        _quiet(["dvc", "config", "core.check_update", "false"], ws, env)
        changed = True
    changed |= _write_if_changed(ws / ".dvcignore", DVCIGNORE)
    if changed:
        # `dvc exp run` needs a commit to branch from; the workspace's history is its own.
        _quiet(["git", "add", "params.yaml", "dvc.yaml", dag.PLANNING_FILE, ".gitignore", ".dvcignore", ".dvc", *CODE_LINKS], ws, env)
        _quiet(["git", "-c", "user.name=daychat", "-c", "user.email=daychat@localhost", "commit", "-q",
                "--allow-empty", "-m", f"daychat: sync recipe {src.stem}"], ws, env)
    return ws


def run(recipe: str, engine: str = "snakemake", cores: int | None = 2, targets: list[str] | None = None,
        workspace: str | Path | None = None, profile: str | None = None) -> Path:
    """`profile`: a Snakemake profile folder (workflow/profiles/...); it then sets the cores unless given."""
    if cores is None and not profile:
        cores = min(8, os.cpu_count() or 1)
    ws = sync(recipe, workspace)
    print(f"[workspace] recipe {recipe} in {_rel(ws)} with {engine}", flush=True)
    t0 = time.time()
    if engine == "snakemake":
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(ws),
               *(["--profile", str(Path(profile).resolve())] if profile else []),
               *(["--cores", str(cores)] if cores else []), *(targets or ["all"])]
    else:
        address = {s.name: s.address for s in dag.load_stages(ws)}  # probe -> planning/dvc.yaml:probe
        cmd = ["dvc", "repro", *(address.get(t, t) for t in targets or [])]
    result = subprocess.run(cmd, cwd=ws, env=tool_env())
    if result.returncode != 0:
        raise SystemExit(f"error: [workspace] {engine} failed in {_rel(ws)} (exit {result.returncode}); see the messages above")
    print(summary(ws, time.time() - t0), flush=True)
    return ws


def summary(ws: Path, seconds: float) -> str:
    """Where the outputs are and the headline number of each stage's metrics."""
    lines = [f"\n[workspace] finished in {seconds:.0f}s; outputs in {_rel(ws)}/:"]
    for path in ("data", "models"):
        for child in sorted(c for c in (ws / path).glob("*") if c.is_dir()):
            lines.append(f"  {path}/{child.name}/")
    metrics = sorted((ws / "reports" / "metrics").glob("*.json"))
    if metrics:
        lines.append(f"  metrics in {_rel(ws)}/reports/metrics/:")
    for path in metrics:
        data = json.loads(path.read_text())
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(data.items())[:6])
        lines.append(f"    {path.stem:<12} {shown}")
    if (ws / "reports" / "report.md").is_file():
        lines.append(f"  report: {_rel(ws / 'reports' / 'report.md')}  (open it: what each stage kept, learned, said and cost)")
    for child in sorted(c for c in (ws / "exports").glob("*") if c.is_dir() and not c.name.startswith(".")):
        lines.append(f"  export: {_rel(child)}/  (load it with transformers: AutoModelForCausalLM.from_pretrained"
                     f"('{_rel(child)}', trust_remote_code=True))")
    if (ws / "models" / "sft").is_dir():
        lines.append(f"  chat with it: make serve MODEL={_rel(ws / 'models' / 'sft')}  (a web chat and an "
                     "OpenAI-compatible API on http://127.0.0.1:8000)")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _copy_if_changed(src: Path, dst: Path) -> bool:
    return _write_if_changed(dst, src.read_text())


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


def _quiet(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: [workspace] `{' '.join(cmd)}` failed in {cwd}: {result.stderr.strip() or result.stdout.strip()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.workspace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_sync = sub.add_parser("sync", help="create or refresh runs/<recipe>/")
    p_sync.add_argument("recipe")
    p_sync.add_argument("--workspace", help="folder to use instead of runs/<recipe>/")
    p_run = sub.add_parser("run", help="sync, then run the DAG (or some targets) in the workspace")
    p_run.add_argument("recipe")
    p_run.add_argument("targets", nargs="*", help="stages to bring up to date (default: all)")
    p_run.add_argument("--engine", choices=("snakemake", "dvc"), default="snakemake")
    p_run.add_argument("--cores", type=int, help="default: min(8, all), or the profile's")
    p_run.add_argument("--workspace", help="folder to use instead of runs/<recipe>/")
    p_run.add_argument("--profile", help="Snakemake profile, e.g. workflow/profiles/slurm (see workflow/profiles/)")
    args = parser.parse_args(argv)
    if args.command == "sync":
        print(_rel(sync(args.recipe, args.workspace)))
    else:
        run(args.recipe, args.engine, args.cores, args.targets, args.workspace, args.profile)


if __name__ == "__main__":
    main()
