"""The run report: one markdown page and a few PNGs that show what every stage kept, learned, said and cost.

    collected = collect(ReportInputs(metrics_dir=Path("reports/metrics"), curves=..., models={...}))
    samples = sample_models(collected.models, params)        # optional: loads torch and the models
    summary = render(collected, samples, params, out_dir=Path("reports/report"), md=Path("reports/report.md"))

It renders whatever exists: each section reads the flat metrics files (reports/metrics/<stage>.json), the
dvclive TSV curves, model folders' meta.json and the optional detail files, and a stage whose metrics file
is absent is listed as missing instead of failing the report. Sections, in order: provenance header, stage
table, data funnel, tokenizer, training, CORE, chat eval, samples, time/FLOPs budget, missing stages, all
metrics. Plots are matplotlib on the Agg backend (no display), drawn only from numbers on disk.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daychat import provenance as prov
from daychat.data import filter_ablation
from daychat.errors import UserError

# The pipeline's stages in order with their metrics file: the ones not in dvc.yaml yet are listed as
# missing too, so a report of an early run says what is still to come. dvc.yaml's own entries win.
PIPELINE: list[tuple[str, str]] = [
    ("download", "download.json"), ("dedup", "dedup.json"), ("quality", "quality.json"),
    ("tokenizer", "tokenizer.json"), ("pretokenize", "pretokenize.json"), ("pretrain", "pretrain.json"),
    ("core_eval", "core.json"), ("sft", "sft.json"), ("chat_eval", "chat_eval.json"),
]
SELF = "report"

# CORE (DCLM, arXiv:2406.11794) of the four GPT-2 sizes, as nanochat measures them: the bar to clear.
GPT2_CORE = {"GPT-2 124M": 0.1139, "GPT-2 355M": 0.1849, "GPT-2 774M": 0.2146, "GPT-2 1.5B": 0.2565}

# The one number per stage that the stage table shows (all of them are in the appendix).
HEADLINES: dict[str, list[str]] = {
    "download": ["docs", "chars"], "dedup": ["removed_fraction", "docs_out"], "quality": ["docs_out", "chars_out"],
    "tokenizer": ["vocab_size", "bytes_per_token"], "pretokenize": ["train_tokens", "val_tokens"],
    "pretrain": ["val_bpb", "tok_per_s", "mfu"], "core_eval": ["core", "core_subset"],
    "sft": ["val_loss", "train_loss"], "chat_eval": ["chatcore", "chatcore_subset"],
    "export": ["weights_mb", "check_max_abs_logit_diff"],
}

# Training panels: (title, [curve names under plots/metrics/]); a panel with no data is left out.
PANELS: list[tuple[str, list[str]]] = [
    ("train loss (nats/token)", ["train/loss", "train/loss_smooth"]),
    ("validation bits per byte", ["val/bpb"]),
    ("throughput (tokens/s)", ["perf/tok_per_s"]),
    ("MFU", ["perf/mfu"]),
    ("peak memory (GiB)", ["perf/peak_mem_gib"]),
    ("lr multiplier", ["train/lrm"]),
]


@dataclass
class ReportInputs:
    metrics_dir: Path
    curves: Path | None = None  # pretrain's dvclive folder (…/plots/metrics)
    sft_curves: Path | None = None  # sft's dvclive folder (reports/sft/plots/metrics)
    core_tasks: Path | None = None  # core_eval's nested per-task details (reports/core/tasks.json)
    models: dict[str, Path] = field(default_factory=dict)  # {"base": models/base, "sft": models/sft}
    dropped: Path | None = None  # the quality stage's audit sample (data/filtered/dropped.parquet)
    ablation: Path | None = None  # the filters' downstream ablation results (daychat.data.filter_ablation)
    params_file: Path | None = None
    dvc_yaml: Path | None = None
    dvc_lock: Path | None = None
    benchmarks: Path | None = None  # Snakemake's benchmark of each rule, <folder>/<stage>.tsv (the Snakefile's benchmark:)


@dataclass
class Collected:
    stages: list[tuple[str, Path]]  # every expected stage and its metrics file
    metrics: dict[str, dict[str, Any]]  # stage -> flat metrics, for the stages that ran
    missing: list[str]
    planned: set[str]  # missing stages that dvc.yaml does not declare yet
    curves: dict[str, tuple[list[float], list[float]]]  # "val/bpb" -> (steps, values)
    sft_curves: dict[str, tuple[list[float], list[float]]]
    core_tasks: Any
    models: dict[str, Path]  # model folders that exist
    meta: dict[str, dict]  # model name -> meta.json
    dropped_examples: list[dict]
    filter_effects: dict[str, Any]  # comparison -> filter_ablation.Effect; empty when not measured
    ablation: Path | None  # where the results were looked for
    params_text: str
    params: dict
    provenance: dict
    benchmarks: dict[str, dict[str, float | None]] = field(default_factory=dict)  # stage -> {"s", "max_rss"}


# ----------------------------------------------------------------------------------------------------
# Collecting


def expected_stages(metrics_dir: Path, dvc_yaml: Path | None) -> tuple[list[tuple[str, Path]], set[str]]:
    """[(stage, metrics file)] in pipeline order: dvc.yaml's stages and the planned ones it lacks."""
    declared: dict[str, Path] = {}
    if dvc_yaml and dvc_yaml.is_file():
        for name, body in ((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}).items():
            if name == SELF:
                continue
            files = [next(iter(m)) if isinstance(m, dict) else m for m in body.get("metrics") or []]
            # the file's name from dvc.yaml, in --metrics-dir (the same folder in a workspace)
            declared[name] = metrics_dir / Path(files[0]).name if files else metrics_dir / f"{name}.json"
    order = [name for name, _ in PIPELINE] + [name for name in declared if name not in dict(PIPELINE)]
    stages = [(name, declared.get(name, metrics_dir / dict(PIPELINE).get(name, f"{name}.json"))) for name in order]
    planned = {name for name in order if name not in declared} if declared else set()
    return stages, planned


def read_curves(folder: Path | None) -> dict[str, tuple[list[float], list[float]]]:
    """Every dvclive TSV under `folder` (`step<TAB>value` rows) as name -> (steps, values)."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    if not folder or not folder.is_dir():
        return curves
    for path in sorted(folder.rglob("*.tsv")):
        steps, values = [], []
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                try:
                    step = float(row["step"])
                    value = float(next(v for k, v in row.items() if k not in ("step", "timestamp")))
                except (KeyError, StopIteration, TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    steps.append(step)
                    values.append(value)
        if steps:
            curves[path.relative_to(folder).with_suffix("").as_posix()] = (steps, values)
    return curves


def read_benchmarks(folder: Path | None, stages: list[tuple[str, Path]]) -> dict[str, dict[str, float | None]]:
    """Snakemake's measure of each stage, from its benchmark TSV (folder/<stage>.tsv: `s` wall seconds, `max_rss`
    peak resident memory in MB, ...), only where it measured the run whose metrics are on disk: the benchmark is
    written once the job ended, so one older than the stage's metrics file is of an earlier run (DVC reran the
    stage since). NA (not measured: Snakemake writes it, and so does workflow/guard.py for a stage DVC ran) and
    unreadable files (a write a kill cut short) are left out."""
    found: dict[str, dict[str, float | None]] = {}
    if not folder or not folder.is_dir():
        return found
    for name, metrics in stages:
        path = folder / f"{name}.tsv"
        try:
            if not metrics.is_file() or path.stat().st_mtime < metrics.stat().st_mtime:
                continue
            with open(path, newline="") as f:
                row = next(csv.DictReader(f, delimiter="\t"))
        except (OSError, StopIteration, csv.Error, UnicodeDecodeError):
            continue
        values = {key: _number(row.get(key)) for key in ("s", "max_rss")}
        if any(v is not None for v in values.values()):
            found[name] = values
    return found


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _read_json(path: Path | None) -> Any:
    """The file's JSON; None when it is not there (a stage not run yet). A file that is there but
    unreadable is damage, not absence: the report would otherwise show a finished stage as never run."""
    if not path or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it or rerun the stage that writes it") from None


def dropped_examples(path: Path | None, chars: int = 160) -> list[dict]:
    """One audited document per drop reason: what the quality filters actually threw away."""
    if not path or not path.is_file():
        return []
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "reason", "detail", "text"]).to_pylist()
    seen: dict[str, dict] = {}
    for row in table:
        if row["reason"] not in seen:
            text = " ".join((row["text"] or "").split())
            seen[row["reason"]] = {**row, "text": text[:chars] + ("…" if len(text) > chars else "")}
    return [seen[k] for k in sorted(seen)]


def collect(inputs: ReportInputs) -> Collected:
    stages, planned = expected_stages(inputs.metrics_dir, inputs.dvc_yaml)
    metrics, missing = {}, []
    for name, path in stages:
        data = _read_json(path)
        if isinstance(data, dict):
            metrics[name] = data
        else:
            missing.append(name)
    models = {name: path for name, path in inputs.models.items() if path.is_dir()}
    meta = {name: _read_json(path / "meta.json") or {} for name, path in models.items()}
    params_text = inputs.params_file.read_text() if inputs.params_file and inputs.params_file.is_file() else ""
    params = yaml.safe_load(params_text) or {} if params_text else {}
    # sha256 of what this report was drawn from (a model by its weights; a folder with a manifest by it)
    read = [path for name, path in stages if name in metrics]
    read += [inputs.curves, inputs.sft_curves, inputs.core_tasks, inputs.dropped, inputs.ablation,
             *(path / "model.pt" for path in models.values())]
    record = prov.provenance(inputs=[path for path in read if path and path.exists()], params=params)
    # DVC's own record of every stage's outputs, when asked for: current under `dvc repro` (written stage
    # by stage), a run behind under Snakemake (its onsuccess hook commits after the last rule)
    record["outputs"] = prov.dvc_lock_hashes(inputs.dvc_lock) if inputs.dvc_lock else {}
    return Collected(stages=stages, metrics=metrics, missing=missing, planned=planned & set(missing),
                     curves=read_curves(inputs.curves), sft_curves=read_curves(inputs.sft_curves), core_tasks=_read_json(inputs.core_tasks), models=models,
                     meta=meta, dropped_examples=dropped_examples(inputs.dropped),
                     filter_effects=filter_ablation.effects(filter_ablation.read_results(inputs.ablation)),
                     ablation=inputs.ablation, params_text=params_text,
                     params=params, provenance=record, benchmarks=read_benchmarks(inputs.benchmarks, stages))


def sample_models(models: dict[str, Path], p: Any) -> dict[str, list[tuple[str, str]] | str]:
    """{model: [(prompt, text)]}, or {model: why not} when it cannot load. The base model continues
    `p.prompts` as documents; the SFT model answers `p.chat_prompts` as user turns through the chat engine."""

    from daychat.chat.engine import Engine
    from daychat.sample import generate
    from daychat.tokenizer import Tokenizer
    from daychat.train.checkpoint import TOKENIZER_DIR, load_model_folder
    from daychat.train.metrics import pick_device

    device = pick_device(p.device, "report.device")
    out: dict[str, list[tuple[str, str]] | str] = {}
    for name, folder in models.items():
        try:
            model, _ = load_model_folder(folder, device)
            tok = Tokenizer.load(folder / TOKENIZER_DIR)
        except UserError as e:
            out[name] = str(e)
            continue
        rows = []
        if name == "sft":
            engine = Engine(model, tok)
            for prompt in p.chat_prompts:
                reply = engine.reply([{"role": "user", "content": prompt}], max_new_tokens=p.max_new_tokens,
                                     temperature=p.temperature, top_k=p.top_k, seed=p.seed)
                rows.append((prompt, reply))
        else:
            for prompt in p.prompts:
                ids = generate(model, tok.encode(prompt, prepend_bos=True), p.max_new_tokens,
                               temperature=p.temperature, top_k=p.top_k, seed=p.seed, stop=tok.bos_id)[0]
                if tok.bos_id in ids:  # a new document began: the continuation ended before it
                    ids = ids[:ids.index(tok.bos_id)]
                rows.append((prompt, tok.decode(ids)))
        out[name] = rows
    return out


# ----------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    from daychat.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _pyplot().close(fig)
    return path.name


def funnel_rows(m: dict[str, dict]) -> list[dict]:
    """Documents and characters after each data stage: download -> dedup -> quality -> tokens."""
    rows = []
    if "download" in m:
        d = m["download"]
        rows.append({"step": "download", "docs": d.get("docs"), "chars": d.get("chars"), "bytes": d.get("bytes")})
    if "dedup" in m:
        d = m["dedup"]
        if not rows:
            rows.append({"step": "dedup in", "docs": d.get("docs_in"), "chars": d.get("chars_in")})
        rows.append({"step": "dedup", "docs": d.get("docs_out"), "chars": d.get("chars_out")})
    if "quality" in m:
        d = m["quality"]
        if not rows:
            rows.append({"step": "quality in", "docs": d.get("docs_in")})
        rows.append({"step": "quality", "docs": d.get("docs_out"), "chars": d.get("chars_out")})
    if "pretokenize" in m:
        d = m["pretokenize"]
        docs = (d.get("train_docs") or 0) + (d.get("val_docs") or 0)
        rows.append({"step": "tokens", "docs": docs or None,
                     "tokens": (d.get("train_tokens") or 0) + (d.get("val_tokens") or 0) or None})
    return rows


def drop_reasons(m: dict[str, dict]) -> dict[str, int]:
    """Why documents left: dedup's duplicates and each quality filter's count (dropped_<reason>)."""
    reasons = {}
    for key in ("exact_duplicates", "near_duplicates"):
        if m.get("dedup", {}).get(key):
            reasons[f"dedup: {key.replace('_', ' ')}"] = m["dedup"][key]
    for key, value in m.get("quality", {}).items():
        if key.startswith("dropped_") and value:
            reasons[f"quality: {key[len('dropped_'):].replace('_', ' ')}"] = value
    return reasons


def plot_funnel(rows: list[dict], reasons: dict[str, int], path: Path) -> str | None:
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    for ax, key, title in ((axes[0], "docs", "documents"), (axes[1], "chars", "characters (M)")):
        shown = [r for r in rows if r.get(key) is not None]
        values = [r[key] / (1e6 if key == "chars" else 1) for r in shown]
        bars = ax.bar([r["step"] for r in shown], values, color="#4C72B0")
        ax.bar_label(bars, labels=[f"{v:,.0f}" if key == "docs" else f"{v:.3g}" for v in values], fontsize=8)
        ax.set_title(title)
    if reasons:
        items = sorted(reasons.items(), key=lambda kv: kv[1])
        axes[2].barh([k for k, _ in items], [v for _, v in items], color="#C44E52")
        axes[2].set_title("documents dropped, by reason")
        axes[2].tick_params(axis="y", labelsize=8)
    else:
        axes[2].text(0.5, 0.5, "nothing dropped", ha="center", va="center")
        axes[2].set_axis_off()
    fig.suptitle("data funnel: download -> dedup -> quality -> tokens")
    return _save(fig, path)


def _hours_of(curves: dict) -> Any:
    """step -> training wall-clock hours, interpolated from the time/elapsed_h curve (0 h at step 0)."""
    if "time/elapsed_h" not in curves:
        return None
    import numpy as np

    steps, hours = curves["time/elapsed_h"]
    xs, ys = np.array([0.0, *steps]), np.array([0.0, *hours])
    return lambda s: np.interp(s, xs, ys)


# SFT panels: the same loop logs the same names; val/loss is the mean loss on held-out conversations.
SFT_PANELS: list[tuple[str, list[str]]] = [
    ("SFT loss on assistant tokens (nats/token)", ["train/loss", "train/loss_smooth", "val/loss"]),
    ("throughput (tokens/s)", ["perf/tok_per_s"]),
]


def plot_training(curves: dict, path: Path, x: str = "step", panels: list | None = None,
                  title: str = "pretraining") -> str | None:
    """The training panels against the step, or (x="time") against wall-clock hours."""
    to_hours = _hours_of(curves)
    if x == "time" and to_hours is None:
        return None
    panels = [(name, [n for n in names if n in curves]) for name, names in (panels or PANELS)]
    panels = [(name, names) for name, names in panels if names]
    if not panels:
        return None
    plt = _pyplot()
    cols = 3
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    for ax, (panel, names) in zip(axes.flat, panels):
        for name in names:
            steps, values = curves[name]
            xs = to_hours(steps) if x == "time" else steps
            ax.plot(xs, values, marker="o" if len(steps) < 20 else None, markersize=3,
                    label=name.split("/")[-1], alpha=0.5 if name == "train/loss" and len(names) > 1 else 1.0)
        ax.set_title(panel)
        ax.set_xlabel("wall clock (h)" if x == "time" else "step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(f"{title} " + ("vs wall clock" if x == "time" else "vs step"))
    return _save(fig, path)


def core_scores(core: dict) -> tuple[str | None, float | None, list[dict]]:
    """(score key, score, [{task, acc, centered}]) from core_eval's flat metrics."""
    key = "core" if "core" in core else "core_subset" if "core_subset" in core else None
    tasks = sorted({k.split("_", 1)[1] for k in core if k.startswith(("acc_", "centered_"))})
    rows = [{"task": t, "acc": core.get(f"acc_{t}"), "centered": core.get(f"centered_{t}")} for t in tasks]
    return key, core.get(key) if key else None, rows


def core_crop_note(core: dict) -> str:
    """What the score's prompts were: uncropped as the reference scores them, or how many items were cut."""
    longest, cropped = core.get("longest_tokens"), core.get("cropped")
    if cropped is None:
        return "_Prompt lengths not recorded (core_eval ran before daychat recorded them)._"
    if cropped:
        return (f"**{cropped} items had prompts longer than the model can read and were cut to their last tokens**: "
                f"the reference scores them whole, so this score is not exactly comparable.")
    return f"Every prompt scored uncropped, as the reference scores them (the longest: {longest:,} tokens)."


def plot_core(core: dict, path: Path) -> str | None:
    key, score, rows = core_scores(core)
    rows = [r for r in rows if isinstance(r["centered"], (int, float))]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, max(3.5, 0.32 * len(rows) + 1.5)))
    ax.barh([r["task"] for r in rows], [r["centered"] for r in rows], color="#55A868")
    colors = ["#999999", "#777777", "#555555", "#333333"]
    for (name, value), color in zip(GPT2_CORE.items(), colors):
        ax.axvline(value, color=color, linestyle="--", linewidth=1, label=f"{name} CORE {value}")
    if score is not None:
        label = "this model, CORE on a SUBSET of tasks" if key == "core_subset" else "this model, CORE"
        ax.axvline(score, color="#C44E52", linewidth=2, label=f"{label} {score:.4f}")
    ax.set_xlabel("centered accuracy (0 = random guessing, 1 = perfect)")
    ax.set_title("CORE per task" + (" (subset of tasks)" if key == "core_subset" else ""))
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def budget_rows(m: dict[str, dict], stages: list[tuple[str, Path]], budget_h: float,
                benchmarks: dict[str, dict] | None = None) -> list[dict]:
    """Wall seconds (wall_s, else seconds), share of the budget and FLOPs of each stage that ran, and Snakemake's
    measure of its job where there is one (`job_s`: the whole process, start-up included; `rss_mb`: peak RSS)."""
    rows = []
    for name, _ in stages:
        d = m.get(name)
        if d is None:
            continue
        seconds = d.get("wall_s", d.get("seconds"))
        seconds = seconds if isinstance(seconds, (int, float)) else None
        share = seconds / (budget_h * 3600) if seconds is not None and budget_h else None
        bench = (benchmarks or {}).get(name) or {}
        rows.append({"stage": name, "seconds": seconds, "share": share, "flops": d.get("flops"),
                     "job_s": bench.get("s"), "rss_mb": bench.get("max_rss")})
    return rows


def plot_budget(rows: list[dict], budget_h: float, path: Path) -> str | None:
    rows = [r for r in rows if r["seconds"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1.4, 1]})
    left = 0.0
    palette = plt.get_cmap("tab10")
    for i, r in enumerate(rows):  # left: the stages end to end against the budget
        hours = r["seconds"] / 3600
        ax.barh([0], [hours], left=left, color=palette(i % 10), label=r["stage"])
        left += hours
    if budget_h:
        ax.axvline(budget_h, color="black", linestyle="--", label=f"budget {budget_h:g} h")
    ax.set_xlim(0, max(left, budget_h or 0) * 1.02 or 1)
    ax.set_yticks([])
    ax.set_xlabel("hours")
    ax.set_title(f"time budget: {left:.2f} h used of {budget_h:g} h")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    # right: each stage on its own scale, so that minutes-long stages are visible beside a 20 h one
    bars = ax2.barh([r["stage"] for r in rows], [r["seconds"] / 60 for r in rows],
                    color=[palette(i % 10) for i in range(len(rows))])
    ax2.bar_label(bars, labels=[_duration(r["seconds"]) for r in rows], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("minutes")
    ax2.set_title("wall time per stage")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.4g}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _megabytes(mb: float | None) -> str:
    if mb is None:
        return "–"
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v.replace("|", "\\|") for v in row) + " |"
              for row in rows]
    return lines + [""]


def _headline(name: str, d: dict) -> str:
    keys = [k for k in HEADLINES.get(name, []) if k in d] or [k for k, v in d.items() if isinstance(v, (int, float))][:2]
    return ", ".join(f"{k} {_fmt(d[k])}" for k in keys)


def _readable_tools(text: str) -> str:
    """A chat reply with its calculator call shown as [calculator: expr = result] instead of special tokens."""
    for token, shown in (("<|tool_call_start|>", "[calculator: "), ("<|tool_call_end|>", ""),
                         ("<|tool_output_start|>", " = "), ("<|tool_output_end|>", "]")):
        text = text.replace(token, shown)
    return text


def _header(c: Collected, lines: list[str]) -> None:
    p = c.provenance
    code, lib, hw = p["code"], p["libraries"], p["hardware"]
    lines += ["# daychat run report", "",
              f"Generated {p['date']} by `stages/report.py`. Every number below is read from the files the stages "
              "wrote (reports/metrics/*.json, the dvclive curves, the model folders' meta.json); nothing is re-measured "
              "except the sample generations.", ""]
    dirty = {True: " **(uncommitted changes)**", False: " (clean)", None: ""}[code.get("dirty")]
    rows = [["code", f"`{(code.get('commit') or 'not a git checkout')[:12]}`{dirty}"]]
    base = c.meta.get("base") or {}
    if base.get("code"):
        trained = base["code"]
        same = " (same)" if trained.get("commit") == code.get("commit") else ""
        rows.append(["base model trained by", f"`{(trained.get('commit') or '?')[:12]}`"
                     + (" (uncommitted changes)" if trained.get("dirty") else "") + same])
    if base.get("hardware"):
        h = base["hardware"]
        libs = {**h, **(base.get("libraries") or {})}  # pretrain's meta: libraries once it uses daychat.provenance
        rows.append(["trained on", f"{h.get('device')} (torch {libs.get('torch')}, CUDA {libs.get('cuda') or 'none'}); "
                                   f"MFU against {h.get('peak_flops_source', '?')}"])
    rows.append(["this machine", prov.hardware_line(hw)])
    rows.append(["libraries", ", ".join(f"{k} {v}" for k, v in lib.items() if v)])
    if c.params:
        sections = ", ".join(f"{s} `{prov.params_digest(v)}`" for s, v in c.params.items())
        rows.append(["params.yaml", f"digest `{p.get('params_digest')}` (per section: {sections})"])
    lines += _table(["", ""], rows)
    if c.params_text:
        lines += ["<details><summary>params.yaml</summary>", "", "```yaml", c.params_text.rstrip(), "```", "",
                  "</details>", ""]
    if p.get("inputs"):
        lines += ["<details><summary>inputs of this report (sha256)</summary>", ""]
        lines += _table(["path", "sha256"], [[f"`{k}`", f"`{v}`"] for k, v in p["inputs"].items()])
        if (base.get("data") or {}):
            lines += ["The base model's own inputs (its meta.json): "
                      + ", ".join(f"{k} `{v}`" for k, v in base["data"].items() if "sha256" in k), ""]
        lines += ["</details>", ""]
    if p.get("outputs"):
        lines += ["<details><summary>output hashes (dvc.lock md5)</summary>", ""]
        lines += _table(["path", "md5"], [[f"`{k}`", f"`{v}`"] for k, v in p["outputs"].items()])
        lines += ["</details>", ""]


def _filter_effects(c: Collected, m: dict[str, dict]) -> list[str]:
    """Per quality filter: what it dropped and its measured downstream effect (or "not measured")."""
    dropped = {k[len("dropped_"):]: v for k, v in (m.get("quality") or {}).items() if k.startswith("dropped_") and v}
    if not dropped:
        return []
    lines = ["Each quality filter, and what it does to a model trained on what it leaves (the downstream ablation):", ""]
    lines += _table(["quality filter", "documents dropped", "downstream effect"],
                    [[reason.replace("_", " "), n, filter_ablation.effect_of_reason(reason, c.filter_effects)]
                     for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1])])
    if c.filter_effects:
        lines += [f"Downstream effects from `{c.ablation}`: the difference of the variant with the filter minus the "
                  "variant without it, paired by seed, with its 95% interval.", ""]
    else:
        where = f"`{c.ablation}` does not exist" if c.ablation else "no ablation results were given"
        lines += [f"_Not measured: {where}. The ablation harness (`make ablate`) trains tiny models on each data "
                  f"variant of daychat/data/filter_ablation.py and writes them._", ""]
    return lines


def render(c: Collected, samples: dict, p: Any, out_dir: Path, md: Path, link_dir: Path | None = None) -> dict[str, Any]:
    """Write the PNGs into `out_dir` and the markdown to `md`, its images linked under `link_dir` (default:
    `out_dir`; the stage draws into a temporary folder that becomes `link_dir`). Returns a flat summary."""
    from daychat.io import write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    link, base = (link_dir or out_dir).resolve(), md.parent.resolve()
    rel = link.relative_to(base) if link.is_relative_to(base) else link
    m = c.metrics
    plots: list[str] = []

    def image(name: str | None, alt: str) -> list[str]:
        if not name:
            return []
        plots.append(name)
        return [f"![{alt}]({(rel / name).as_posix()})", ""]

    lines: list[str] = []
    _header(c, lines)

    lines += ["## Stages", ""]
    lines += _table(["stage", "status", "wall time", "headline"],
                    [[name, "done" if name in m else "**missing**" + (" (not in dvc.yaml yet)" if name in c.planned else ""),
                      _duration((m.get(name) or {}).get("wall_s", (m.get(name) or {}).get("seconds"))),
                      _headline(name, m[name]) if name in m else ""] for name, _ in c.stages])

    lines += ["## Data: what was kept and why the rest was dropped", ""]
    rows, reasons = funnel_rows(m), drop_reasons(m)
    if rows:
        lines += _table(["after", "documents", "characters", "tokens", "bytes on disk"],
                        [[r["step"], r.get("docs"), r.get("chars"), r.get("tokens"), r.get("bytes")] for r in rows])
        if rows[0].get("docs") and rows[-1].get("docs"):
            lines += [f"{rows[-1]['docs'] / rows[0]['docs']:.1%} of the downloaded documents reach training.", ""]
        if reasons:
            lines += _table(["dropped by", "documents"], [[k, v] for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])])
        lines += image(plot_funnel(rows, reasons, out_dir / "funnel.png"), "data funnel")
        lines += _filter_effects(c, m)
        if c.dropped_examples:
            lines += ["<details><summary>one dropped document per reason (quality audit sample)</summary>", ""]
            lines += _table(["reason", "why", "document", "text"],
                            [[e["reason"], e["detail"] or "", f"`{e['id']}`", e["text"]] for e in c.dropped_examples])
            lines += ["</details>", ""]
    else:
        lines += ["_No data stage has run yet._", ""]

    lines += ["## Tokenizer", ""]
    if "tokenizer" in m:
        t = m["tokenizer"]
        lines += _table(["vocab size", "bytes per token (validation text)", "trained on characters", "train time"],
                        [[t.get("vocab_size"), t.get("bytes_per_token"), t.get("train_chars"), _duration(t.get("train_seconds"))]])
        if "pretokenize" in m:
            k = m["pretokenize"]
            lines += [f"Pretokenized: {_fmt(k.get('train_tokens'))} train and {_fmt(k.get('val_tokens'))} validation "
                      f"tokens ({k.get('dtype', '?')}).", ""]
    else:
        lines += ["_The tokenizer stage has not run._", ""]

    lines += ["## Pretraining", ""]
    if "pretrain" in m:
        t = m["pretrain"]
        keys = ["val_bpb", "train_loss", "params", "tokens", "steps", "flops", "tok_per_s", "mfu", "peak_mem_gib", "wall_s"]
        lines += _table([k for k in keys if k in t], [[t[k] for k in keys if k in t]])
        run = (c.meta.get("base") or {}).get("run") or {}
        if run.get("schedule"):
            lines += [f"Schedule: {run['schedule']}.", ""]
    lines += image(plot_training(c.curves, out_dir / "training_steps.png", "step"), "training curves vs step")
    lines += image(plot_training(c.curves, out_dir / "training_time.png", "time"), "training curves vs wall clock")
    if "pretrain" not in m and not c.curves:
        lines += ["_The pretrain stage has not run._", ""]

    lines += ["## CORE", ""]
    if "core_eval" in m:
        key, score, rows_core = core_scores(m["core_eval"])
        if key == "core_subset":
            lines += [f"**CORE on a subset of the tasks: {_fmt(score)}** (not comparable with a full CORE score).", ""]
        elif key:
            lines += [f"**CORE: {_fmt(score)}** (GPT-2: " + ", ".join(f"{k} {v}" for k, v in GPT2_CORE.items()) + ")", ""]
        lines += [core_crop_note(m["core_eval"]), ""]
        details = c.core_tasks if isinstance(c.core_tasks, dict) else {}
        extra = sorted({k for d in details.values() if isinstance(d, dict) for k, v in d.items()
                        if not isinstance(v, (dict, list)) and k not in ("acc", "centered", "accuracy")})[:4]
        lines += _table(["task", "accuracy", "centered", *extra],
                        [[r["task"], r["acc"], r["centered"], *[(details.get(r["task"]) or {}).get(k) for k in extra]]
                         for r in rows_core])
        lines += image(plot_core(m["core_eval"], out_dir / "core.png"), "CORE per task")
    else:
        lines += ["_No CORE evaluation yet (core_eval stage)._", ""]

    lines += ["## SFT", ""]
    if "sft" in m:
        t = m["sft"]
        keys = ["val_loss", "val_loss_base", "train_loss", "conversations", "trained_tokens", "tokens", "steps",
                "tok_per_s", "peak_mem_gib", "wall_s"]
        lines += _table([k for k in keys if k in t], [[t[k] for k in keys if k in t]])
        skipped = {k: v for k, v in t.items() if k.startswith("skipped_") and v}
        if skipped:
            lines += ["Conversations skipped: " + ", ".join(f"{k[8:]} {v}" for k, v in skipped.items()) + ".", ""]
        lines += image(plot_training(c.sft_curves, out_dir / "sft_steps.png", "step", SFT_PANELS, "SFT"), "SFT curves")
    else:
        lines += ["_The sft stage has not run._", ""]

    lines += ["## Chat evaluation", ""]
    if "chat_eval" in m:
        t = m["chat_eval"]
        key = "chatcore" if "chatcore" in t else "chatcore_subset"
        lines += [f"**{t.get('label', key)}: {_fmt(t.get(key))}** (mean centered accuracy over the tasks)", ""]
        tasks = sorted({k.split("_", 1)[1] for k in t if k.startswith("acc_")})
        lines += _table(["task", "accuracy", "baseline", "centered", "items", "skipped"],
                        [[task, t.get(f"acc_{task}"), t.get(f"baseline_{task}"), t.get(f"centered_{task}"),
                          t.get(f"n_{task}"), t.get(f"skipped_{task}")] for task in tasks])
    else:
        lines += ["_No chat evaluation yet (chat_eval stage)._", ""]

    lines += ["## Samples", ""]
    n_samples = 0
    for name in ("base", "sft"):
        got = samples.get(name)
        if got is None:
            lines += [f"_No {name} model to sample from._", ""]
            continue
        lines += [f"### {name} model (`{c.models[name]}`)", ""]
        if isinstance(got, str):
            lines += [f"_Could not load it: {got}_", ""]
            continue
        how = "greedy" if p.temperature == 0 else f"temperature {p.temperature}, top-k {p.top_k}, seed {p.seed}"
        if name == "sft":
            lines += [f"Each prompt asked as a user turn; {p.max_new_tokens} new tokens at most, {how}.", ""]
        else:
            lines += [f"{p.max_new_tokens} new tokens at most, {how}; the prompt is in bold.", ""]
        for prompt, text in got:
            shown = f"**user:** {prompt}\n\n**assistant:** {_readable_tools(text)}" if name == "sft" else f"**{prompt}**{text}"
            quoted = "\n".join("> " + line for line in shown.splitlines())
            lines += [quoted, ""]
            n_samples += 1

    lines += [f"## Time and compute budget ({p.budget_h:g} h)", ""]
    budget = budget_rows(m, c.stages, p.budget_h, c.benchmarks)
    total_s = sum(r["seconds"] or 0 for r in budget)
    total_flops = sum(r["flops"] or 0 for r in budget if isinstance(r["flops"], (int, float)))
    measured = any(r["job_s"] is not None or r["rss_mb"] is not None for r in budget)
    if budget:
        # Snakemake's columns only when it measured a stage (benchmarks/<stage>.tsv): a DVC run has none
        extra = lambda r: [_duration(r["job_s"]), _megabytes(r["rss_mb"])] if measured else []
        lines += _table(["stage", "wall time", "share of budget", "FLOPs"] + (["job time", "peak RSS"] if measured else []),
                        [[r["stage"], _duration(r["seconds"]), f"{r['share']:.2%}" if r["share"] is not None else "–",
                          r["flops"], *extra(r)] for r in budget]
                        + [["**total**", _duration(total_s), f"{total_s / (p.budget_h * 3600):.2%}" if p.budget_h else "–",
                            total_flops or None] + (["", ""] if measured else [])])
        if measured:
            lines += ["Job time and peak RSS: Snakemake's benchmark of each stage's job (benchmarks/<stage>.tsv; the "
                      "whole process, start-up included); – where it did not measure the run on disk (DVC ran it).", ""]
        lines += image(plot_budget(budget, p.budget_h, out_dir / "budget.png"), "time budget")
    else:
        lines += ["_No stage has run yet._", ""]

    lines += ["## Missing stages", ""]
    if c.missing:
        for name in c.missing:
            how = "not in dvc.yaml yet" if name in c.planned else f"run `snakemake {name}` or `dvc repro {name}`"
            lines += [f"- **{name}**: no metrics file ({how})"]
        lines += [""]
    else:
        lines += ["None: every stage has run.", ""]

    lines += ["## All metrics", ""]
    for name, _ in c.stages:
        if name in m:
            lines += [f"<details><summary>{name}</summary>", ""]
            lines += _table(["metric", "value"], [[k, v] for k, v in m[name].items()])
            lines += ["</details>", ""]

    write_text(md, "\n".join(lines).rstrip() + "\n")
    pretrain = m.get("pretrain", {})
    return {"stages_done": len(m), "stages_missing": len(c.missing), "plots": len(plots), "samples": n_samples,
            "budget_used_h": total_s / 3600, "budget_share": total_s / (p.budget_h * 3600) if p.budget_h else None,
            "val_bpb": pretrain.get("val_bpb"),
            "core": (m.get("core_eval") or {}).get("core", (m.get("core_eval") or {}).get("core_subset")),
            "filters_measured": len(c.filter_effects)}
