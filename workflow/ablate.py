"""Seeded ablations: variants x seeds at a fixed FLOP budget on a fixed corpus, through DVC's queue.

    make ablate                                          # workflow/ablate.yaml: the recipe changes of issue 17
    python -m workflow.ablate --config my-ablation.yaml  # your own variants (see workflow/ablate.yaml)

A config (YAML) names a base recipe, the params that fix the corpus and the evaluation (`data`, `base`),
the scales (model shape + a FLOP budget each), the seeds, the variants (params overrides, `section.key:
value`) and a proxy check. For every scale x variant x seed the harness queues one DVC experiment
(`dvc exp run --queue -n NAME -S ... pretrain`) in its own workspace (runs/ablate/, a copy of the recipe
with the project's stages), then runs the queue with one worker (`dvc queue start -j 1`), so that runs
never share the CPU or the GPU, and waits for it. Each run trains for the scale's budget: tokens =
FLOPs / (FLOPs per token x total_batch) steps of total_batch tokens (the same for every variant at that
scale); `pretrain.seed` sets the init and the data order. Then it reads each run's metrics from its
experiment commit and writes:

- `reports/ablate.md`: per scale, every variant's mean and 95% interval over the seeds, and its paired
  difference to the first variant (the baseline; same seed, same data order) with a 95% interval and a
  verdict; the proxy check: the Spearman rank correlation of the variants' means at the short budget
  against a `factor` x longer budget on one scale;
- `reports/ablate/ablate.png` (the differences and the proxy scatter), `reports/ablate/results.json`
  (every run: its overrides, metrics, code hash).

Finished runs are kept in results.json and in the workspace's experiment refs and are not run again; a
run's name holds a hash of its overrides, of the pretrain stage's code (its code deps in dvc.yaml), of the
base recipe and of the config's data and base settings (with the content of the files they name, e.g. a
held-out text), so changing any of them reruns it. The code is frozen for the whole queue: the workspace links to a copy of
stages/, daychat/, workflow/ taken when the harness starts, so editing the project while the queue runs
changes nothing in it.

Data-filter variants (e.g. dedup on/off, quality thresholds): override `dedup.*`, `quality.*` params in a
variant; its experiment then reruns those stages, the tokenizer and pretokenize before pretraining. Their
val splits then differ, so compare them on one held-out text that none of them trained on: set
`pretrain.eval_text` in `base` (a parquet/jsonl/txt file or folder) and `metric: heldout_bpb`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from workflow import dag, workspace

ROOT = workspace.ROOT
CONFIG = ROOT / "workflow" / "ablate.yaml"
CODE = ("stages", "daychat", "workflow", "Snakefile")
PATH_KEYS = ("path", "eval_text", "core_path")  # params whose values name files, relative to the project root
# Two-sided 95% Student t quantiles by degrees of freedom (1..30); above, 1.96.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


class AblateError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"error: [ablate] {message}")


# ----------------------------------------------------------------------------------------------------
# Statistics


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% interval) by Student's t; the half-width is nan for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T95[n - 2] if n - 1 <= len(T95) else 1.96
    return mean, t * sd / math.sqrt(n)


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (the Pearson correlation of the ranks; nan for fewer than 3 points)."""
    if len(a) != len(b) or len(a) < 3:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else float("nan")


def verdict(delta: float, half: float) -> str:
    """Reading of a paired difference variant - baseline (lower is better) with its 95% half-width."""
    if not math.isfinite(half):
        return "one seed"
    if delta - half > 0:
        return "baseline better"
    if delta + half < 0:
        return "variant better"
    return "within noise"


# ----------------------------------------------------------------------------------------------------
# The config


def load_config(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise AblateError(f"{path} cannot be read ({e})") from None
    need = ("recipe", "seeds", "scales", "variants", "metric")
    missing = [k for k in need if k not in (cfg or {})]
    if missing:
        raise AblateError(f"{path} lacks {', '.join(missing)}")
    names = [v["name"] for v in cfg["variants"]]
    if len(set(names)) != len(names) or any(not re.fullmatch(r"[a-z0-9][a-z0-9-]*", n) for n in names):
        raise AblateError(f"{path}: variant names must be unique, lowercase letters, digits and '-', got {names}")
    for v in cfg["variants"]:
        for key in v.get("overrides") or {}:
            if "." not in key:
                raise AblateError(f"{path}: variant {v['name']}: override {key!r} must be section.key")
    proxy = cfg.get("proxy")
    if proxy and proxy["scale"] not in cfg["scales"]:
        raise AblateError(f"{path}: proxy.scale {proxy['scale']!r} is not one of the scales {list(cfg['scales'])}")
    return cfg


def resolve_paths(overrides: dict) -> dict:
    """Values of keys that name files (…path, eval_text) are taken relative to the project root."""
    out = {}
    for key, value in overrides.items():
        if isinstance(value, str) and value and key.split(".")[-1] in PATH_KEYS:
            value = str((ROOT / value).resolve())
        out[key] = value
    return out


def apply(params: dict, overrides: dict) -> dict:
    """A copy of params.yaml's dict with `section.key: value` overrides set."""
    out = json.loads(json.dumps(params))
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def budget_tokens(pretrain: dict, vocab: int, flops: float) -> int:
    """Tokens that spend `flops` at this shape: whole steps of total_batch, at least one."""
    from daychat.model.accounting import flops_per_token
    from daychat.model.gpt import GPTConfig

    seq_len = max(int(t) for _, t in pretrain["seq_len"])
    config = GPTConfig(vocab_size=vocab, sequence_len=seq_len, depth=pretrain["depth"],
                       aspect_ratio=pretrain["aspect_ratio"], head_dim=pretrain["head_dim"],
                       n_kv_head=pretrain.get("n_kv_head") or None, window_pattern=pretrain.get("window_pattern", "L"),
                       short_window=pretrain.get("short_window", 1024))
    batch = int(pretrain["total_batch"])
    return max(1, round(flops / (flops_per_token(config, seq_len) * batch))) * batch


def plan_runs(cfg: dict, params: dict, code_hash: str) -> list[dict]:
    """Every run: scale x variant x seed at the short budget, plus the proxy's longer runs."""
    vocab = int(params["tokenizer"]["vocab_size"])
    runs = []
    proxy = cfg.get("proxy") or {}
    for scale, spec in cfg["scales"].items():
        budgets = [("short", float(spec["flops"]), cfg["seeds"])]
        if proxy.get("scale") == scale:
            budgets.append(("long", float(spec["flops"]) * float(proxy.get("factor", 4)), proxy.get("seeds", cfg["seeds"][:1])))
        for budget, flops, seeds in budgets:
            for variant in cfg["variants"]:
                overrides = {**spec.get("overrides", {}), **resolve_paths(variant.get("overrides") or {})}
                merged = apply(params, overrides)
                tokens = budget_tokens(merged["pretrain"], vocab, flops)
                for seed in seeds:
                    run = {**overrides, "pretrain.horizon": "tokens", "pretrain.tokens": tokens, "pretrain.seed": seed}
                    digest = hashlib.sha256(json.dumps([run, code_hash], sort_keys=True).encode()).hexdigest()[:8]
                    runs.append({"name": f"{scale}-{budget}-{variant['name']}-s{seed}-{digest}".lower(),
                                 "scale": scale, "budget": budget, "flops": flops, "variant": variant["name"],
                                 "seed": seed, "tokens": tokens, "overrides": run})
    return runs


# ----------------------------------------------------------------------------------------------------
# The workspace, the frozen code, the queue


def code_hash() -> str:
    """sha256 of the pretrain stage's code deps (dvc.yaml): what decides what a run trains."""
    stage = next(s for s in dag.load_stages(ROOT) if s.name == "pretrain")
    digest = hashlib.sha256()
    for dep in sorted(d for d in stage.deps if d.endswith(".py")):
        digest.update(dep.encode() + (ROOT / dep).read_bytes())
    return digest.hexdigest()[:12]


def setup_hash(cfg: dict, code: str) -> str:
    """What decides every run's result besides its own overrides: the pretrain code (`code`), the base
    recipe, the config's `data` and `base` settings and the content of the files they name (a held-out
    text rewritten in place is another measurement). Part of each run's name and its `code` in the
    results, so that a changed setup reruns everything and the report reads only the new runs."""
    digest = hashlib.sha256(code.encode() + workspace.recipe_path(cfg["recipe"]).read_bytes())
    settings = resolve_paths({**cfg.get("data", {}), **cfg.get("base", {})})
    digest.update(json.dumps(settings, sort_keys=True).encode())
    files = sorted((key, value) for key, value in settings.items()
                   if isinstance(value, str) and value and key.split(".")[-1] in PATH_KEYS)
    for key, value in files:
        path = Path(value)
        if not path.exists():
            raise AblateError(f"{key}: {value} not found" + (f"; make it with `{cfg['setup']}`" if cfg.get("setup") else ""))
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def freeze_code(into: Path) -> Path:
    """A copy of the project's code (the working tree, uncommitted edits included) under `into`/<hash>."""
    files = []
    for name in CODE:
        src = ROOT / name
        files += [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    dest = into / f"code-{digest.hexdigest()[:12]}"
    if not dest.is_dir():
        tmp = into / f".{dest.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for f in files:
            target = tmp / f.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        tmp.rename(dest)
    return dest


def env_for(code: Path) -> dict[str, str]:
    # One thread per run (a second OpenMP thread on a shared 2-core box mostly waits, tests/conftest.py);
    # the frozen code first on the path, before the editable install of the live tree.
    env = {**workspace.tool_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = str(code) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def sh(cmd: list[str], ws: Path, env: dict, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ws, env=env, capture_output=capture, text=True)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip()[-2000:] if capture else "see the messages above"
        raise AblateError(f"`{' '.join(cmd)}` failed in {ws}: {detail}")
    return result


def prepare_workspace(cfg: dict, ws: Path, code: Path, env: dict) -> dict:
    """The workspace with the fixed corpus's data stages done and committed; returns its params."""
    params = yaml.safe_load(workspace.recipe_path(cfg["recipe"]).read_text())
    params = apply(params, resolve_paths({**cfg.get("data", {}), **cfg.get("base", {})}))
    recipe = ws.parent / f".{ws.name}.recipe.yaml"
    ws.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(f"# written by workflow/ablate.py from {cfg['recipe']} + the config's data and base\n"
                      + yaml.safe_dump(params, sort_keys=False))
    workspace.sync(str(recipe), ws, code_root=code)
    print(f"[ablate] data stages in {_rel(ws)} (dvc repro pretokenize)", flush=True)
    sh(["dvc", "repro", "pretokenize"], ws, env, capture=False)
    sh(["git", "add", "-A", "."], ws, env)
    if sh(["git", "status", "--porcelain"], ws, env).stdout.strip():
        sh(["git", "-c", "user.name=daychat", "-c", "user.email=daychat@localhost", "commit", "-q", "-m",
            "ablate: data stages"], ws, env)
    return params


def experiment_names(ws: Path, env: dict) -> set[str]:
    """Names of the experiments committed in the workspace (DVC makes the ref when a run succeeds)."""
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], ws, env).stdout.split()
    return {ref.rsplit("/", 1)[-1] for ref in refs}


def finished_runs(ws: Path, env: dict, metrics_file: str) -> dict[str, dict]:
    """name -> metrics of every experiment in the workspace that wrote its metrics file."""
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], ws, env).stdout.split()
    done = {}
    for ref in refs:
        name = ref.rsplit("/", 1)[-1]
        shown = sh(["git", "show", f"{ref}:{metrics_file}"], ws, env, check=False)
        if shown.returncode == 0:
            done[name] = json.loads(shown.stdout)
    return done


def worker_pids(ws: Path) -> list[int]:
    """PIDs of the DVC queue workers still running in `ws` (DVC keeps one .pid file per worker under
    .dvc/tmp/exps/celery/; a worker exits when the queue is empty)."""
    pids = []
    for f in (ws / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        try:
            pid = int(f.read_text().strip())
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except (ValueError, OSError):
            continue
    return pids


def start_worker(ws: Path, env: dict) -> None:
    # not captured: the worker it starts keeps the pipes open until the queue is empty
    started = subprocess.run(["dvc", "queue", "start", "-j", "1"], cwd=ws, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    if started.returncode != 0:
        raise AblateError(f"`dvc queue start -j 1` failed in {ws} (exit {started.returncode})")


def run_queue(runs: list[dict], ws: Path, env: dict, poll_s: float) -> None:
    """Queue the runs, start one worker, wait until it has run them all (or stops making progress).

    Progress is read from the experiment refs, never from `dvc queue status` while the worker runs: that
    command talks to the worker through the queue's broker files, and the race can kill the worker
    (treeverse/dvc#7903, dvc-task#73; seen here after ~40 runs). A worker that died with runs left is
    restarted as long as the previous one finished something."""
    sh(["dvc", "queue", "remove", "--queued", "--failed"], ws, env, check=False)
    for run in runs:
        cmd = ["dvc", "exp", "run", "--queue", "-n", run["name"]]
        for key, value in run["overrides"].items():
            cmd += ["-S", f"++{key}={_hydra(value)}"]  # ++: set the key whether or not the recipe has it
        sh(cmd + ["pretrain"], ws, env)
    print(f"[ablate] queued {len(runs)} runs; `dvc queue start -j 1` in {_rel(ws)} (follow one with "
          f"`dvc queue logs NAME`)", flush=True)
    names = {r["name"] for r in runs}
    t0, reported, restarts = time.time(), -1, 0
    start_worker(ws, env)
    done_at_start = 0
    try:
        while True:
            done = len(names & experiment_names(ws, env))
            if done != reported:
                eta = (time.time() - t0) / done * (len(names) - done) if done else float("nan")
                print(f"[ablate] {done}/{len(names)} runs done, {(time.time() - t0) / 60:.1f} min, "
                      f"eta {eta / 60:.0f} min", flush=True)
                reported = done
            if done == len(names):
                break
            if not worker_pids(ws):
                time.sleep(5)  # a worker that is just starting has not written its pid yet
                if worker_pids(ws):
                    continue
                if done == done_at_start or restarts >= 20:
                    break  # what is left failed (or keeps killing the worker): reported by the caller
                restarts += 1
                done_at_start = done
                print(f"[ablate] the queue worker stopped with {len(names) - done} runs left; restarting it", flush=True)
                start_worker(ws, env)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        sh(["dvc", "queue", "stop", "--kill"], ws, env, check=False)
        raise AblateError("interrupted: the queue was stopped; finished runs are kept, rerun to continue") from None
    if worker_pids(ws):
        sh(["dvc", "queue", "stop"], ws, env, check=False)


# ----------------------------------------------------------------------------------------------------
# The report


def summarise(cfg: dict, results: list[dict]) -> dict:
    """Per scale and budget: each variant's values over seeds, mean/CI and the paired difference to the baseline."""
    metric = cfg["metric"]
    baseline = cfg["variants"][0]["name"]
    out = {}
    for scale in cfg["scales"]:
        for budget in ("short", "long"):
            rows = [r for r in results if r["scale"] == scale and r["budget"] == budget and metric in r["metrics"]]
            if not rows:
                continue
            by = {}
            for r in rows:
                by.setdefault(r["variant"], {})[r["seed"]] = r["metrics"][metric]
            table = []
            for v in cfg["variants"]:
                values = by.get(v["name"], {})
                if not values:
                    continue
                mean, half = mean_ci(list(values.values()))
                paired = [values[s] - by.get(baseline, {})[s] for s in values if s in by.get(baseline, {})]
                d_mean, d_half = mean_ci(paired) if paired else (float("nan"), float("nan"))
                table.append({"variant": v["name"], "about": v.get("about", ""), "evidence": v.get("evidence", ""),
                              "n": len(values), "mean": mean, "ci": half, "delta": d_mean, "delta_ci": d_half,
                              "verdict": "baseline" if v["name"] == baseline else verdict(d_mean, d_half),
                              "values": values})
            out[f"{scale}/{budget}"] = table
    return out


def proxy_check(cfg: dict, summary: dict) -> dict | None:
    proxy = cfg.get("proxy")
    if not proxy or f"{proxy['scale']}/long" not in summary:
        return None
    short = {r["variant"]: r["mean"] for r in summary[f"{proxy['scale']}/short"]}
    long_ = {r["variant"]: r["mean"] for r in summary[f"{proxy['scale']}/long"]}
    common = [v["name"] for v in cfg["variants"] if v["name"] in short and v["name"] in long_]
    rho = spearman([short[v] for v in common], [long_[v] for v in common])
    best_short = min(common, key=short.get) if common else None
    best_long = min(common, key=long_.get) if common else None
    return {"scale": proxy["scale"], "factor": proxy.get("factor", 4), "n": len(common), "spearman": rho,
            "variants": common, "short": [short[v] for v in common], "long": [long_[v] for v in common],
            "best_short": best_short, "best_long": best_long}


def decisions(cfg: dict, summary: dict) -> list[dict]:
    """Per variant, its verdicts at every scale (short budget) and what they say about the baseline's
    value: measured better here, or within noise here and so resting on the variant's `evidence`."""
    keys = [k for k in summary if k.endswith("/short")]
    out = []
    for v in cfg["variants"][1:]:
        verdicts = {}
        for key in keys:
            row = next((r for r in summary[key] if r["variant"] == v["name"]), None)
            if row:
                verdicts[key.split("/")[0]] = row["verdict"]
        found = set(verdicts.values())
        evidence = v.get("evidence", "")
        if "variant better" in found:
            reading = "the variant measured better at " + ", ".join(s for s, x in verdicts.items() if x == "variant better")
        elif found == {"baseline better"}:
            reading = "the default measured better at every scale"
        elif "baseline better" in found:
            reading = ("the default measured better at " + ", ".join(s for s, x in verdicts.items() if x == "baseline better")
                       + ", within noise elsewhere")
        elif found == {"within noise"}:
            reading = "within noise here" + (f"; the default rests on {evidence}" if evidence else "")
        else:
            reading = "not enough seeds to tell"
        out.append({"variant": v["name"], "verdicts": verdicts, "reading": reading})
    return out


def plot(cfg: dict, summary: dict, proxy: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in summary if k.endswith("/short")]
    ncols = len(panels) + (1 if proxy else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 0.32 * len(cfg["variants"]) + 1.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        rows = summary[key][1:]
        ys = range(len(rows))
        ax.errorbar([r["delta"] for r in rows], list(ys), xerr=[0 if not math.isfinite(r["delta_ci"]) else r["delta_ci"] for r in rows],
                    fmt="o", ms=4, capsize=3, color="C0")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(list(ys), [r["variant"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{cfg['metric']} - baseline (95% CI); > 0: baseline better", fontsize=8)
        ax.set_title(f"{key.split('/')[0]}: paired difference", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    if proxy:
        ax = axes[0][-1]
        ax.scatter(proxy["short"], proxy["long"], s=14)
        for name, x, y in zip(proxy["variants"], proxy["short"], proxy["long"]):
            ax.annotate(name, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel(f"{cfg['metric']}, short budget (mean over seeds)", fontsize=8)
        ax.set_ylabel(f"{proxy['factor']}x longer budget", fontsize=8)
        ax.set_title(f"proxy check, {proxy['scale']}: Spearman {proxy['spearman']:.2f}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(cfg: dict, summary: dict, proxy: dict | None, results: list[dict], context: dict, path: Path,
                 png: Path) -> None:
    metric, baseline = cfg["metric"], cfg["variants"][0]["name"]
    lines = [f"# Ablation: {cfg.get('title', 'variants against a baseline')}", "",
             "Written by `python -m workflow.ablate` (`make ablate`); the raw results are in "
             f"`{_rel(context['results'])}`. Lower {metric} is better.", ""]
    lines += [f"- {k}: {v}" for k, v in context["about"].items()]
    lines += ["", "How to read it: each run is one DVC experiment of the pretrain stage at a fixed FLOP budget; a "
              "variant differs from the baseline by the overrides listed. *delta* is the variant minus the baseline "
              "on the same seed (same init draw and data order), averaged over seeds, with a 95% t-interval; "
              "*baseline better* / *variant better* mean the interval excludes 0, *within noise* that it does not.",
              ""]
    for key, table in summary.items():
        scale, budget = key.split("/")
        spec = cfg["scales"][scale]
        some = next(r for r in results if r["scale"] == scale and r["budget"] == budget)
        lines += [f"## {scale}, {budget} budget: {some['flops']:.3g} FLOPs ({some['tokens']:,} tokens a run)", "",
                  f"Shape: {', '.join(f'{k.split(chr(46))[1]} {v}' for k, v in spec.get('overrides', {}).items())}.", "",
                  f"| variant | what it changes | seeds | {metric} mean | 95% CI | delta vs {baseline} | 95% CI | verdict | evidence |",
                  "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for r in table:
            delta = "" if r["variant"] == baseline else f"{r['delta']:+.4f}"
            dci = "" if r["variant"] == baseline else _pm(r["delta_ci"])
            lines.append(f"| {r['variant']} | {r['about']} | {r['n']} | {r['mean']:.4f} | {_pm(r['ci'])} | {delta} | "
                         f"{dci} | {r['verdict']} | {r['evidence']} |")
        lines.append("")
    table = decisions(cfg, summary)
    if table:
        scales = list(table[0]["verdicts"])
        lines += ["## What the measurements say about each default", "",
                  f"| variant (the previous value) | {' | '.join(scales)} | reading |",
                  "|---|" + "---|" * len(scales) + "---|"]
        for d in table:
            lines.append(f"| {d['variant']} | " + " | ".join(d["verdicts"].get(s, "") for s in scales)
                         + f" | {d['reading']} |")
        lines.append("")
    if proxy:
        lines += [f"## Proxy check: is the short budget's ranking the {proxy['factor']}x longer budget's?", "",
                  f"On {proxy['scale']}, {proxy['n']} variants: Spearman rank correlation of the means at the short "
                  f"budget against the {proxy['factor']}x longer one = **{proxy['spearman']:.2f}** (1: the same order). "
                  f"Best at the short budget: {proxy['best_short']}; at the long one: {proxy['best_long']}. "
                  "Differences smaller than the short budget's seed noise cannot keep their order; read the rank "
                  "correlation together with the intervals above.", ""]
    if context.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in context["notes"]] + [""]
    lines += [f"![paired differences and the proxy check]({png.relative_to(path.parent).as_posix()})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _pm(half: float) -> str:
    return f"±{half:.4f}" if math.isfinite(half) else "n/a"


def _hydra(value) -> str:
    if isinstance(value, str):
        return f"'{value}'"
    return json.dumps(value).replace(" ", "")


def _rel(path: Path) -> Path:
    try:
        return Path(path).resolve().relative_to(ROOT)
    except ValueError:
        return Path(path)


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--workspace", type=Path, help="default: the config's workspace, else runs/ablate")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "ablate.md")
    parser.add_argument("--results", type=Path, help="default: reports/<report name>/results.json")
    parser.add_argument("--only", help="comma-separated variant names to run (the baseline is always run)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the results file, run nothing")
    parser.add_argument("--poll", type=float, default=20.0, help="seconds between queue status checks")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    if args.only:
        keep = {cfg["variants"][0]["name"], *args.only.split(",")}
        cfg["variants"] = [v for v in cfg["variants"] if v["name"] in keep]
    ws = (args.workspace or ROOT / cfg.get("workspace", "runs/ablate")).resolve()
    folder = args.report.with_suffix("")
    results_path = args.results or folder / "results.json"
    png = folder / f"{args.report.stem}.png"
    recorded = {r["name"]: r for r in json.loads(results_path.read_text())} if results_path.is_file() else {}
    t0 = time.time()

    if args.report_only:
        runs = list(recorded.values())  # the latest setup's runs: the file keeps older ones, not to be mixed in
        code_version = runs[-1].get("code", "unknown") if runs else "unknown"
        runs = [r for r in runs if r.get("code", "unknown") == code_version]
    else:
        code_version = setup_hash(cfg, code_hash())
        code = freeze_code(ws.parent / f".{ws.name}-code")
        env = env_for(code)
        params = prepare_workspace(cfg, ws, code, env)
        runs = plan_runs(cfg, params, code_version)
        done = finished_runs(ws, env, "reports/metrics/pretrain.json")
        todo = [r for r in runs if r["name"] not in recorded and r["name"] not in done]
        print(f"[ablate] {len(runs)} runs: {len(runs) - len(todo)} already done, {len(todo)} to run "
              f"(code {code_version}, frozen in {_rel(code)})", flush=True)
        if todo:
            run_queue(todo, ws, env, args.poll)
            done = finished_runs(ws, env, "reports/metrics/pretrain.json")
        for run in runs:
            if run["name"] in done and run["name"] not in recorded:
                recorded[run["name"]] = {**run, "metrics": done[run["name"]], "code": code_version}
        missing = [r["name"] for r in runs if r["name"] not in recorded]
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(list(recorded.values()), indent=1) + "\n")
        if missing:
            raise AblateError(f"{len(missing)} runs failed or did not finish, e.g. {missing[0]} "
                              f"(`dvc queue logs {missing[0]}` in {_rel(ws)}); the others are in {_rel(results_path)}")
        runs = [recorded[r["name"]] for r in runs]

    summary = summarise(cfg, runs)
    proxy = proxy_check(cfg, summary)
    walls = [r["metrics"].get("wall_s", 0.0) for r in runs]
    context = {"results": results_path, "about": {
        "config": f"`{_rel(args.config)}` (base recipe `{cfg['recipe']}`; {cfg.get('corpus', 'its data')})",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), one thread per run, torch {_torch()}",
        "runs": f"{len(runs)} ({sum(walls) / 3600:.2f} h of training wall clock in all); code hash {code_version}",
        "seeds": ", ".join(map(str, cfg["seeds"])), "metric": cfg["metric"]}, "notes": cfg.get("notes", [])}
    plot(cfg, summary, proxy, png)
    write_report(cfg, summary, proxy, runs, context, args.report, png)
    print(f"[ablate] {len(runs)} runs in {(time.time() - t0) / 60:.1f} min; report {_rel(args.report)}, plot {_rel(png)}",
          flush=True)


def _torch() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
