"""The report stage renders whatever ran (and says what did not), its plots are real PNGs, provenance records
the code's commit and dirty state, and two `dvc exp run -S` experiments on the ci recipe compare in
`dvc exp show`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daychat import provenance
from daychat.data import filter_ablation
from daychat.params import ReportParams, parse_section
from daychat.report import ReportInputs, collect, render
from workflow import workspace

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is only {len(data)} bytes: an empty plot?"


def report_stage(ws: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "stages" / "report.py"), "--metrics-dir", "reports/metrics",
           "--curves", "reports/pretrain/plots/metrics", "--base", "models/base", "--out", "reports/report",
           "--md", "reports/report.md", "--metrics", "reports/metrics/report.json", "--dvc-yaml", str(ROOT / "dvc.yaml"),
           *extra]
    result = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, env=workspace.tool_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


DATA_METRICS = {
    "download": {"docs": 900, "chars": 4_000_000, "bytes": 1_400_000, "seconds": 7.0},
    "dedup": {"docs_in": 900, "docs_out": 880, "exact_duplicates": 12, "near_duplicates": 8,
              "chars_in": 4_000_000, "chars_out": 3_900_000, "seconds": 0.8},
    "quality": {"docs_in": 880, "docs_out": 520, "dropped_too_short": 100, "dropped_language": 70,
                "dropped_dup_ngrams": 90, "dropped_classifier": 100, "chars_out": 2_000_000, "seconds": 10.2},
}


def write_curves(folder: Path, steps: int = 40) -> None:
    """dvclive's layout: one `step<TAB>name` TSV per metric."""
    curves = {"train/loss": lambda s: 8.0 - 3.0 * s / steps, "train/loss_smooth": lambda s: 8.2 - 3.0 * s / steps,
              "val/bpb": lambda s: 3.0 - s / steps, "perf/tok_per_s": lambda s: 9000.0 + 10 * (s % 7),
              "perf/mfu": lambda s: 0.3 + 0.001 * (s % 5), "perf/peak_mem_gib": lambda s: 1.5,
              "time/elapsed_h": lambda s: s / 3600.0, "train/lrm": lambda s: min(1.0, 2.0 - 2.0 * s / steps)}
    for name, f in curves.items():
        path = folder / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = range(0, steps + 1, 10) if name == "val/bpb" else range(1, steps + 1)
        path.write_text(f"step\t{name.split('/')[-1]}\n" + "".join(f"{s}\t{f(s)}\n" for s in rows))


def test_partial_workspace_reports_what_is_missing(tmp_path):
    for stage, metrics in DATA_METRICS.items():
        write_json(tmp_path / "reports" / "metrics" / f"{stage}.json", metrics)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"report": {"prompts": ["Hello"], "budget_h": 24.0}}))
    out = report_stage(tmp_path).stdout
    assert "report:" in out and "3 stages ran" in out  # the person running it sees where the report is

    md = (tmp_path / "reports" / "report.md").read_text()
    missing = md.split("## Missing stages")[1].split("##")[0]
    for stage in ("tokenizer", "pretokenize", "pretrain", "core_eval"):
        assert f"**{stage}**" in missing
    assert "**download**" not in missing
    assert "quality: too short" in md and "No base model to sample from" in md
    assert "![data funnel](report/funnel.png)" in md
    assert_png(tmp_path / "reports" / "report" / "funnel.png")
    assert_png(tmp_path / "reports" / "report" / "budget.png")
    assert not (tmp_path / "reports" / "report" / "training_steps.png").exists()
    summary = json.loads((tmp_path / "reports" / "metrics" / "report.json").read_text())
    assert summary["stages_done"] == 3 and summary["stages_missing"] >= 4 and summary["val_bpb"] is None


def test_each_quality_filter_shows_its_downstream_effect_or_not_measured(tmp_path):
    for stage, metrics in DATA_METRICS.items():
        write_json(tmp_path / "reports" / "metrics" / f"{stage}.json", metrics)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"report": {"prompts": []}}))
    report_stage(tmp_path, "--ablation", "reports/ablate.json")
    md = (tmp_path / "reports" / "report.md").read_text()
    assert "| classifier | 100 | not measured |" in md and "| dup ngrams | 90 | not measured |" in md
    assert "_Not measured: `reports/ablate.json` does not exist." in md

    # the harness's results: eval bpb per seed of each data variant (daychat/data/filter_ablation.py)
    write_json(tmp_path / "reports" / "ablate.json", {"metric": "eval_bpb", "lower_is_better": True, "variants": {
        "dedup_only": {"values": [2.10, 2.12, 2.11]}, "heuristics": {"values": [2.00, 2.01, 2.02]},
        "heuristics_classifier": {"values": [2.01, 2.00, 2.03]}, "random_drop": {"values": [2.08, 2.08, 2.09]}}})
    report_stage(tmp_path, "--ablation", "reports/ablate.json")
    md = (tmp_path / "reports" / "report.md").read_text()
    heuristics = "eval_bpb -0.1000 [-0.1248, -0.0752] over 3 seeds: helps"
    assert f"| dup ngrams | 90 | {heuristics} |" in md and f"| too short | 100 | {heuristics} |" in md
    classifier = md.split("| classifier | 100 | ")[1].split("\n")[0]
    assert classifier.startswith("eval_bpb +0.0033") and "within noise; vs a random drop: eval_bpb -0.0700" in classifier
    assert classifier.endswith("helps |")
    assert json.loads((tmp_path / "reports/metrics/report.json").read_text())["filters_measured"] == 3


def test_filter_ablation_variants_and_effects():
    assert filter_ablation.overrides("dedup_only") == ["quality.lid=false", "quality.heuristics=[]",
                                                       "quality.strip_gutenberg=false", "quality.classifier=false"]
    assert filter_ablation.overrides("random_drop") == ["quality.classifier=true", "quality.classifier_keep=random"]
    for variant in filter_ablation.VARIANTS:  # every override is a valid quality param
        section = {k.split(".", 1)[1]: v for k, v in filter_ablation.VARIANTS[variant].items()}
        parse_section("quality", section)
    assert filter_ablation.read_results(None) is None and filter_ablation.effects(None) == {}
    only_means = {"variants": {"heuristics": {"mean": 2.0, "seeds": 2}, "dedup_only": {"mean": 2.5, "seeds": 2}}}
    (effect,) = filter_ablation.effects(only_means).values()
    assert effect.diff == -0.5 and effect.ci95 is None and effect.helps() is None
    assert filter_ablation.effect_of_reason("score", {"language ID + heuristics": effect}) == "not measured"
    assert filter_ablation.effect_of_reason("score", {"heuristic score": effect}).startswith("eval_bpb -0.5000")
    assert filter_ablation.effect_of_reason("too_short", {"language ID + heuristics": effect}).startswith("eval_bpb -0.5000")


def test_filter_ablation_reads_the_harness_list_of_runs(tmp_path):
    """The ablation harness's own results.json: one record per run; the short budget of the scale that has
    the filter variants, paired on the seeds every variant has, by heldout_bpb when all runs report it; the
    runs of older code that the harness keeps in the file are left out."""
    runs = [{"variant": v, "seed": seed, "scale": "d4x128", "budget": "short",
             "metrics": {"val_bpb": 9.0, "heldout_bpb": base + 0.01 * seed}}
            for v, base in (("dedup-only", 2.2), ("heuristics", 2.1)) for seed in (0, 1, 2)]  # the harness's '-' names
    runs += [{"variant": "heuristics", "seed": 3, "scale": "d4x128", "budget": "short", "metrics": {"heldout_bpb": 0.0}},
             {"variant": "dedup_only", "seed": 0, "scale": "d4x128", "budget": "long", "metrics": {"heldout_bpb": 0.0}},
             {"variant": "baseline", "seed": 0, "scale": "d4x128", "budget": "short", "metrics": {"heldout_bpb": 0.0}}]
    old = [{"variant": v, "seed": 5, "scale": "d4x128", "budget": "short", "metrics": {"heldout_bpb": 7.0},
            "code": "before"} for v in ("dedup-only", "heuristics")]  # a seed only older code ran: kept by the harness
    (tmp_path / "results.json").write_text(json.dumps(old + [{**r, "code": "now"} for r in runs]))
    results = filter_ablation.read_results(tmp_path / "results.json")
    assert results["metric"] == "heldout_bpb" and results["variants"]["heuristics"]["values"] == [2.1, 2.11, 2.12]
    (effect,) = filter_ablation.effects(results).values()
    assert effect.diff == pytest.approx(-0.1) and effect.seeds == 3 and effect.helps()
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert filter_ablation.read_results(tmp_path / "bad.json") is None


def test_curves_and_core_subset_render(tmp_path):
    metrics = tmp_path / "metrics"
    for stage, data in DATA_METRICS.items():
        write_json(metrics / f"{stage}.json", data)
    write_json(metrics / "pretrain.json", {"val_bpb": 2.0, "flops": 1e13, "wall_s": 90.0, "tok_per_s": 8000.0})
    write_json(metrics / "core.json", {"core_subset": 0.12, "acc_hellaswag": 0.3, "centered_hellaswag": 0.07,
                                       "acc_arc_easy": 0.5, "centered_arc_easy": 0.33, "seconds": 60.0,
                                       "cropped": 0, "longest_tokens": 2417})
    write_json(tmp_path / "core" / "tasks.json", {"hellaswag": {"acc": 0.3, "shots": 10, "examples": 500},
                                                  "arc_easy": {"acc": 0.5, "shots": 10, "examples": 300}})
    write_curves(tmp_path / "curves")
    collected = collect(ReportInputs(metrics_dir=metrics, curves=tmp_path / "curves",
                                     core_tasks=tmp_path / "core" / "tasks.json", dvc_yaml=ROOT / "dvc.yaml"))
    assert collected.curves["val/bpb"][0][:2] == [0.0, 10.0]
    out, md = tmp_path / "report", tmp_path / "report.md"
    summary = render(collected, {}, ReportParams(), out, md)

    for name in ("funnel", "training_steps", "training_time", "core", "budget"):
        assert_png(out / f"{name}.png")
    assert summary["plots"] == 5 and summary["core"] == 0.12
    text = md.read_text()
    assert "CORE on a subset of the tasks: 0.12" in text
    assert "Every prompt scored uncropped, as the reference scores them (the longest: 2,417 tokens)" in text
    assert "| hellaswag | 0.3 | 0.07 | 500 | 10 |" in text  # tasks.json's details beside the scores
    assert "**core_eval**" not in text.split("## Missing stages")[1]
    budget = text.split("## Time and compute budget")[1].split("##")[0]
    assert "| pretrain | 1.5 min | 0.10% | 1.000e+13 |" in budget


def test_a_cropped_core_score_says_so_beside_the_score():
    from daychat.report import core_crop_note

    assert "3 items had prompts longer than the model can read" in core_crop_note({"cropped": 3, "longest_tokens": 9})
    assert "not recorded" in core_crop_note({})


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_provenance_records_commit_dirty_versions_hardware(tmp_path):
    assert provenance.code_version(tmp_path)["commit"] is None  # not a checkout: None, no exception
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "a")
    clean = provenance.code_version(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "scratch.txt").write_text("untracked files do not make the code dirty")
    assert provenance.code_version(tmp_path)["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.code_version(tmp_path) == {**clean, "dirty": True, "describe": clean["describe"] + "-dirty"}

    versions = provenance.library_versions()
    for name in ("python", "torch", "numpy", "tiktoken", "snakemake", "dvc"):
        assert versions[name], name
    assert "cuda" in versions  # None on a CPU build of torch, the CUDA version otherwise
    hw = provenance.hardware()
    assert hw["cpu"] and hw["cpu_cores"] >= 1 and hw["ram_gib"] > 0
    assert "GiB RAM" in provenance.hardware_line(hw)

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    (tmp_path / "data" / "shard.bin").write_bytes(b"0" * 10)
    hashes = provenance.input_hashes([tmp_path / "data", tmp_path / "a.py", tmp_path / "absent"])
    assert hashes[str(tmp_path / "data")] == provenance.sha256_path(tmp_path / "data" / "manifest.json")
    assert hashes[str(tmp_path / "absent")] is None
    assert provenance.params_digest({"a": 1, "b": [2]}) == provenance.params_digest({"b": [2], "a": 1})
    record = provenance.provenance(params={"a": 1}, gpu=False)
    assert {"date", "code", "libraries", "hardware", "params_digest"} <= set(record)


# ----------------------------------------------------------------------------------------------------
# End to end on the ci recipe (slow): two experiments, then the report of the finished workspace.


def dvc(ws: Path, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=ws, capture_output=True, text=True, env=workspace.tool_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def experiments(node, found: dict) -> dict:
    """{experiment name or rev: its pretrain metrics}, from `dvc exp show --json`'s nested records."""
    if isinstance(node, list):
        for item in node:
            experiments(item, found)
    elif isinstance(node, dict):
        metrics = ((node.get("data") or {}).get("metrics") or {}).get("reports/metrics/pretrain.json")
        if metrics and node.get("rev") != "workspace":
            found[node.get("name") or node.get("rev")] = metrics.get("data") or {}
        for value in node.values():
            if isinstance(value, (dict, list)):
                experiments(value, found)
    return found


@pytest.fixture(scope="module")
def ci_with_experiments(tmp_path_factory) -> tuple[Path, dict]:
    ws = workspace.sync("ci", tmp_path_factory.mktemp("report") / "ci")
    # 10 steps each (the recipe trains 80), evaluated once at the end: the experiments differ, fast. Only
    # pretrain and what it depends on run (the first experiment runs the data stages, the second reuses them).
    short = ["-S", "pretrain.tokens=20480", "-S", "pretrain.eval_every=0", "-S", "pretrain.save_every=0"]
    for lr in ("0.01", "0.08"):
        dvc(ws, "exp", "run", "pretrain", "--name", f"lr{lr.replace('.', '')}", *short, "-S", f"pretrain.matrix_lr={lr}")
    return ws, experiments(json.loads(dvc(ws, "exp", "show", "--json")), {})


@pytest.mark.slow
def test_two_experiments_show_different_val_bpb(ci_with_experiments):
    _, found = ci_with_experiments
    assert {"lr001", "lr008"} <= set(found), found.keys()
    bpb = {name: found[name]["val_bpb"] for name in ("lr001", "lr008")}
    assert all(isinstance(v, float) for v in bpb.values()) and bpb["lr001"] != bpb["lr008"], bpb
    for key in ("tok_per_s", "mfu", "peak_mem_gib", "wall_s"):  # the columns `dvc exp show` lists
        assert key in found["lr001"]


@pytest.mark.slow
def test_report_on_the_full_ci_workspace(ci_with_experiments):
    ws, _ = ci_with_experiments
    out = report_stage(ws, "--dropped", "data/filtered/dropped.parquet", "--dvc-lock", "dvc.lock").stdout
    assert "val bpb" in out
    md = (ws / "reports" / "report.md").read_text()
    assert "### base model (`models/base`)" in md and "**def main():**" in md
    assert "one dropped document per reason" in md and "output hashes (dvc.lock md5)" in md
    missing = md.split("## Missing stages")[1].split("##")[0]
    for stage in ("download", "dedup", "quality", "tokenizer", "pretokenize", "pretrain"):
        assert f"**{stage}**" not in missing
    for name in ("funnel", "training_steps", "training_time", "budget"):
        assert_png(ws / "reports" / "report" / f"{name}.png")


def test_the_budget_shows_snakemakes_benchmarks_only_where_they_measured_the_run_on_disk(tmp_path):
    import os

    metrics, benchmarks = tmp_path / "metrics", tmp_path / "benchmarks"
    for stage, data in DATA_METRICS.items():
        write_json(metrics / f"{stage}.json", data)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    benchmarks.mkdir()
    (benchmarks / "download.tsv").write_text(header + "7.5\t0:00:07\t2048.5\t3000\t1900\t1950\t1\t2\t50\t3.1\n")
    (benchmarks / "dedup.tsv").write_text(header + "\t".join(["NA"] * 10) + "\n")  # not measured (DVC ran it)
    (benchmarks / "quality.tsv").write_text(header + "9.9\t0:00:09\t300.0\t1\t1\t1\t1\t1\t1\t1\n")
    old = (metrics / "quality.json").stat().st_mtime - 60  # measured a run before the one on disk
    os.utime(benchmarks / "quality.tsv", (old, old))
    collected = collect(ReportInputs(metrics_dir=metrics, dvc_yaml=ROOT / "dvc.yaml", benchmarks=benchmarks))
    assert collected.benchmarks == {"download": {"s": 7.5, "max_rss": 2048.5}}
    md = tmp_path / "report.md"
    render(collected, {}, ReportParams(), tmp_path / "report", md)
    budget = md.read_text().split("## Time and compute budget")[1].split("##")[0]
    assert "| stage | wall time | share of budget | FLOPs | job time | peak RSS |" in budget
    assert "| download | 7.0 s | 0.01% | – | 7.5 s | 2.00 GiB |" in budget
    assert "| dedup | 0.8 s | 0.00% | – | – | – |" in budget and "| quality | 10.2 s | 0.01% | – | – | – |" in budget
