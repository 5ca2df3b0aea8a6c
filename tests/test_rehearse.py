"""The rehearsal (daychat/plan/rehearse.py) and the prepared GPU check (bench/gpu_check.py): every GPU phase of
the real recipe is planned and fits the card; the CPU fits a phase by lowering the depth and says so; the
GPU check runs end to end in its CPU mode."""

import json
import sys

import pytest

from conftest import ROOT
from daychat.errors import UserError
from daychat.plan import rehearse
from daychat.plan.cards import get_card
from daychat.plan.memory import GiB

LENGTHS = {"core_longest": 2600, "proxy_longest": 2400, "chat_longest": 1100, "gsm8k_prompt": 260,
           "lengths_from": "a test"}


@pytest.fixture()
def lengths(tmp_path):
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps(LENGTHS))
    return path


def test_every_phase_of_the_real_recipe_is_planned_and_fits_the_card(lengths):
    shapes = rehearse.recipe_shapes(str(ROOT / "params.yaml"), tokenizer=None, bundle=None, chat_data=None,
                                    lengths=str(lengths))
    card = get_card("rtx4090")
    planned = rehearse.estimates(shapes, card.memory_bytes)
    names = [name for job, _ in planned for name in job.phases]
    for t in shapes.curriculum:
        assert f"train step T={t}" in names and f"optimizer step T={t}" in names
    for phase in ("val bpb", "CORE proxy", "CORE scoring", "sft train step", "sft optimizer step", "sft val loss",
                  "letter scoring", "generation"):
        assert phase in names
    usable = card.memory_bytes * (1 - shapes.pretrain.memory_margin)
    for job, phases in planned:
        for phase in phases:
            assert phase.total_bytes <= usable, (job.stage, phase.describe())
    # the CORE phases are sized at the bundle's longest prompt, uncropped, with the batch the preflight gives
    core = next(job for job, _ in planned if job.phases == ["CORE scoring"])
    assert core.width == LENGTHS["core_longest"] and core.tokens >= core.width


def test_a_cpu_rehearses_the_recipe_shallower_and_says_what_it_reduced(lengths):
    shapes = rehearse.recipe_shapes(str(ROOT / "params.yaml"), tokenizer=None, bundle=None, chat_data=None,
                                    lengths=str(lengths), longest_only=True)
    job, _ = rehearse.estimates(shapes, get_card("rtx4090").memory_bytes)[0]
    fitted, (step, _) = rehearse.fit_to_cpu(job, available=8 * GiB, threads=1)
    assert fitted.device == "cpu" and fitted.precision == "fp32" and not fitted.compile
    assert fitted.config["depth"] < job.config["depth"]
    assert fitted.gpt_config().model_dim == job.gpt_config().model_dim  # the width is the recipe's
    assert fitted.seq_len == job.seq_len and fitted.config["vocab_size"] == job.config["vocab_size"]
    assert fitted.reduced[0].startswith(f"depth {job.config['depth']} -> ")
    assert step.total_bytes <= rehearse.CPU_MEMORY_SHARE * 8 * GiB


def test_lengths_must_come_from_a_rehearsal(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(UserError, match=r"--lengths .*: not an earlier rehearsal's metrics"):
        rehearse.recipe_shapes(str(ROOT / "params.yaml"), tokenizer=None, bundle=None, chat_data=None, lengths=str(bad))


def test_the_committed_rehearsal_of_the_real_recipe():
    """reports/rehearse.md is the real recipe's: every phase fits the 4090 and this CPU's measured peaks
    agreed with the memory model within 10% (rerun `make rehearse` after changing a GPU phase)."""
    metrics = json.loads((ROOT / "reports" / "metrics" / "rehearse.json").read_text())
    assert metrics["all_fit_card"] and metrics["failed"] == 0
    assert metrics["max_abs_error"] <= 0.10
    assert set(rehearse.LENGTH_KEYS) <= set(metrics)


def test_the_gpu_check_runs_in_its_cpu_mode(tmp_path, lengths):
    """bench/gpu_check.sh --cpu: the checks pass on the CPU, the rehearsal and the throughput run, and the
    report is written as it goes."""
    import subprocess

    out = tmp_path / "gpu-cpu.json"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out), "--params",
                           str(ROOT / "workflow" / "recipes" / "ci.yaml"), "--lengths", str(lengths),
                           "--budget-s", "600"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("compile_bf16", "flex_windows", "fp8", "pinned_loader", "eval_scoring"):
        assert report[f"check/{name}"]["ok"], report[f"check/{name}"]
    assert report["rehearsal"]["returncode"] == 0 and report["rehearsal"]["phases"]
    assert all(p["measured_gib"] is not None for p in report["rehearsal"]["phases"])
    assert report["throughput/ci"]["tok_per_s"] > 0
    assert report["summary"]["failed_checks"] == []


def test_the_gpu_check_stops_at_once_naming_a_missing_package(tmp_path):
    """A GPU machine's image without pydantic: the check says so in seconds, before any compile (a first
    visit lost its recipe figures to a package nobody had checked for)."""
    import os
    import subprocess

    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'pydantic':\n"
        "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {**os.environ, "PYTHONPATH": f"{block}:{ROOT}"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu", "--out", str(tmp_path / "g.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2
    assert "missing Python packages on this machine: pydantic" in done.stderr
    assert "bench/gpu_wheels.sh" in done.stderr and not (tmp_path / "g.json").exists()


def test_a_rehearsal_past_its_budget_skips_the_rest_and_keeps_what_it_measured(lengths, monkeypatch):
    shapes = rehearse.recipe_shapes(str(ROOT / "workflow" / "recipes" / "ci.yaml"), tokenizer=None, bundle=None,
                                    chat_data=None, lengths=str(lengths), longest_only=True)
    clock = iter(range(0, 10_000, 100))  # each job "takes" 100 s
    monkeypatch.setattr(rehearse.time, "monotonic", lambda: next(clock))
    ran, partial = [], []

    def fake_run(job, timeout_s):
        ran.append((job.phases, timeout_s))
        return {name: {"peak_bytes": GiB, "seconds": 1.0} for name in job.phases}

    monkeypatch.setattr(rehearse, "_run", fake_run)
    card = get_card("rtx4090")
    report = rehearse.rehearse(shapes, card, device="cpu", timeout_s=900, threads=1, budget_s=250,
                               after_job=partial.append, say=lambda line: None)
    jobs = len(rehearse.estimates(shapes, card.memory_bytes, "cuda"))
    assert len(ran) == 2 < jobs and all(timeout <= 250 for _, timeout in ran)
    skipped = [r for r in report["phases"] if r["failure"]]
    assert len(skipped) == len(report["phases"]) - sum(len(phases) for phases, _ in ran)
    assert all("time budget" in r["failure"] for r in skipped)
    assert len(partial) == jobs  # the report so far, after every job: a run cut off keeps what it measured
    assert all(r["measured_gib"] == 1.0 for r in partial[1]["phases"])
