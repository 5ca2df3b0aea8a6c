"""Time-to-quality projection: a family of small runs sized by the scaling rule, a fit of val_bpb against
compute, and its extrapolation (with a band) to the budget of the real run.

The runs themselves are driven by workflow/sweep.py (it knows the workspaces and DVC); this module is the
pure part: which model for a compute budget, the fits, the report. A test drives it on synthetic points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from daychat.model.accounting import flops_per_token, param_counts
from daychat.model.gpt import GPTConfig
from daychat.plan.scaling import LossFit, ScalingRule, fit_loss_curve


@dataclass(frozen=True)
class SweepPoint:
    """One finished run: its measured training FLOPs and final validation bits per byte."""

    name: str
    depth: int
    params_matmul: int
    tokens: int
    compute: float
    val_bpb: float
    wall_s: float = 0.0
    epochs: float = 0.0


def size_for_compute(compute: float, rule: ScalingRule, vocab_size: int, aspect_ratio: int, head_dim: int,
                     seq_len: int, depths=range(1, 33)) -> tuple[int, int]:
    """(depth, tokens) for a budget: the depth whose matmul params are closest (in log) to rule.params(C),
    and the tokens that spend C at that depth's FLOPs per token."""
    target = rule.params(compute)
    best = None
    for depth in depths:
        cfg = GPTConfig(vocab_size=vocab_size, sequence_len=seq_len, depth=depth, aspect_ratio=aspect_ratio,
                        head_dim=head_dim)
        gap = abs(math.log(param_counts(cfg)["matmul"] / target))
        if best is None or gap < best[0] - 1e-12:
            best = (gap, depth, flops_per_token(cfg, seq_len))
    _, depth, fpt = best
    return depth, int(compute / fpt)


@dataclass(frozen=True)
class Projection:
    fits: dict[str, LossFit]  # form -> fit
    target_compute: float
    points: tuple[SweepPoint, ...]

    def at_target(self, form: str) -> tuple[float, float, float]:
        """(central, low, high) val_bpb projected at the target compute (5-95% bootstrap band)."""
        fit = self.fits[form]
        lo, hi = fit.band([self.target_compute])
        return float(fit.predict([self.target_compute])[0]), float(lo[0]), float(hi[0])


def project(points: list[SweepPoint], target_compute: float, n_boot: int = 1000, seed: int = 0) -> Projection:
    """Fit val_bpb(C) as a power law (and, with >= 4 points, with an irreducible term) and extrapolate."""
    pts = tuple(sorted(points, key=lambda p: p.compute))
    c = [p.compute for p in pts]
    y = [p.val_bpb for p in pts]
    fits = {"power": fit_loss_curve(c, y, "power", n_boot=n_boot, seed=seed)}
    if len(pts) >= 4:
        fits["saturating"] = fit_loss_curve(c, y, "saturating", n_boot=n_boot, seed=seed)
    return Projection(fits, target_compute, pts)


def plot(projection: Projection, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pts = projection.points
    lo_c = min(p.compute for p in pts) / 2
    grid = np.logspace(math.log10(lo_c), math.log10(projection.target_compute * 2), 200)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([p.compute for p in pts], [p.val_bpb for p in pts], color="black", zorder=3, label="sweep runs (CPU)")
    for p in pts:
        ax.annotate(f"d{p.depth}", (p.compute, p.val_bpb), textcoords="offset points", xytext=(4, 4), fontsize=8)
    colors = {"power": "tab:blue", "saturating": "tab:orange"}
    for form, fit in projection.fits.items():
        lo, hi = fit.band(grid)
        ax.plot(grid, fit.predict(grid), color=colors[form], label=fit.describe())
        ax.fill_between(grid, lo, hi, color=colors[form], alpha=0.15, label=f"{form}: 5-95% bootstrap band")
        mid, a, b = projection.at_target(form)
        ax.errorbar([projection.target_compute], [mid], yerr=[[mid - a], [b - mid]], fmt="o", color=colors[form],
                    capsize=4)
    ax.axvline(projection.target_compute, color="gray", ls="--", lw=1)
    ax.text(projection.target_compute, ax.get_ylim()[1], " target", va="top", fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("val_bpb vs compute: CPU sweep, extrapolated to the real budget")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(projection: Projection, png_name: str, context: dict) -> str:
    """reports/scaling.md. `context`: recipe, machine, target description, rule, seq_len, notes (strings)."""
    pts = projection.points
    span = math.log10(projection.target_compute / max(p.compute for p in pts))
    lines = [
        "# Time-to-quality projection (scaling sweep)",
        "",
        f"Written by `{context.get('command', 'python -m workflow.sweep')}` on {context.get('machine', 'this machine')}. "
        "Recipe base: "
        f"`{context.get('recipe', '?')}` (workspace `{context.get('workspace', '?')}`), one `dvc exp run -S ...` per "
        "point, so `dvc exp show` in that workspace lists them.",
        "",
        "**Read this first: this is a weak projection.** The points are tiny models trained on "
        f"{context.get('data', 'the offline demo text (Python docs and package descriptions, not FineWeb-Edu)')} "
        "on a CPU, for seconds to minutes. The target "
        f"is {span:.1f} orders of magnitude further out. Over such a span a small error in the exponent becomes a large "
        "error in the loss, the two fitted forms disagree, and the data (text, tokenizer, repetition) differ from "
        "the real run's, so the absolute bits per byte do not transfer. What it is good for: checking that loss "
        "falls as a power of compute when the model is sized by the plan's rule, the order of the exponent, and "
        "a band that says how little a handful of CPU points constrains.",
        "",
        "## Points",
        "",
        f"Each budget C gets the depth whose matmul params are closest to N_opt(C) ({context.get('rule', '')}) "
        f"and the tokens that spend C; context {context.get('seq_len', '?')} throughout. FLOPs are what the run "
        "measured (reports/metrics/pretrain.json: flops).",
        "",
        "| run | depth | matmul params | tokens | FLOPs | epochs of the data | wall | val_bpb |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in pts:
        lines.append(f"| {p.name} | {p.depth} | {p.params_matmul:,} | {p.tokens:,} | {p.compute:.2e} | {p.epochs:.1f} "
                     f"| {p.wall_s:.0f} s | {p.val_bpb:.4f} |")
    lines += ["", "## Fits and projection", "",
              f"Target: {context.get('target', '')} = **{projection.target_compute:.2e} FLOPs**.", "",
              "| form | fit | val_bpb at target | 5-95% band |", "|---|---|---:|---|"]
    for form, fit in projection.fits.items():
        mid, lo, hi = projection.at_target(form)
        lines.append(f"| {form} | {fit.describe()} | {mid:.3f} | {lo:.3f} - {hi:.3f} |")
    lines += [
        "",
        "- power: L = A C^-alpha, a straight line in log-log; with no floor it keeps falling forever, so far out it "
        "is optimistic.",
        "- saturating: L = E + A C^-alpha (Kaplan et al. 2020; Chinchilla's form in C); the floor E is barely "
        "constrained by points this close together, which is why its band is wide.",
        *([f"- The saturating fit put its floor at E = {projection.fits['saturating'].E:.3g}: these points show no "
           "curvature, so it is the power law again; the upper tail of its band is the refits that did find a floor."]
          if "saturating" in projection.fits and projection.fits["saturating"].E < 1e-3 else []),
        "- Band: residual bootstrap (1000 refits on the fitted curve plus resampled log residuals, scaled for the "
        "degrees of freedom), 5th-95th percentile of the projection. It covers the scatter of these points only, "
        "not the systematic differences listed above.",
        "",
        f"![val_bpb vs compute]({png_name})",
        "",
    ]
    for note in context.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def write_report(points: list[SweepPoint], target_compute: float, md_path: Path, png_path: Path, context: dict,
                 n_boot: int = 1000) -> Projection:
    from daychat.io import write_text

    projection = project(points, target_compute, n_boot=n_boot)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    plot(projection, png_path)
    write_text(md_path, markdown(projection, png_path.name if png_path.parent == md_path.parent
                                 else str(png_path.relative_to(md_path.parent)), context))
    return projection
