"""End to end on the ci recipe, in a temporary workspace: the DAG runs under both engines, a rerun does
nothing, and editing one knob reruns exactly that stage and what is downstream of it."""


import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow import dag, workspace

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def snakemake(ws: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(ws),
           "--cores", "2", *args]
    result = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, env=workspace.tool_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def dvc(ws: Path, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=ws, capture_output=True, text=True, env=workspace.tool_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def stamps(ws: Path) -> dict[str, float]:
    """When each stage last ran: the mtime of its metrics file (every stage writes one)."""
    return {s.name: (ws / s.metrics[0]).stat().st_mtime_ns for s in dag.load_stages(ws) if not s.on_demand}


def ran(before: dict, after: dict) -> set[str]:
    return {name for name in after if after[name] != before.get(name)}


def set_param(ws: Path, section: str, key: str, value) -> None:
    path = ws / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def assert_dvc_clean(ws: Path) -> None:
    # the pipeline's dvc.yaml; planning/dvc.yaml's on-demand stages never ran here
    assert "Data and pipelines are up to date" in dvc(ws, "status", "dvc.yaml")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return workspace.sync("ci", tmp_path_factory.mktemp("e2e") / "ci")


def test_snakemake_runs_the_dag_and_dvc_agrees(ws):
    snakemake(ws, "all")
    all_stages = {s.name for s in dag.load_stages(ws) if not s.on_demand}
    assert set(stamps(ws)) == all_stages
    for stage in (s for s in dag.load_stages(ws) if not s.on_demand):
        metrics = json.loads((ws / stage.metrics[0]).read_text())
        assert metrics and all(not isinstance(v, (dict, list)) for v in metrics.values())
    assert json.loads((ws / "reports/metrics/tokenizer.json").read_text())["vocab_size"] == 512
    assert_dvc_clean(ws)  # the Snakefile's onsuccess committed what it ran into dvc.lock


def test_second_snakemake_run_does_nothing(ws):
    before = stamps(ws)
    out = snakemake(ws, "all")
    assert "Nothing to be done" in out
    assert ran(before, stamps(ws)) == set()
    assert_dvc_clean(ws)


def downstream_of(ws: Path, stage: str) -> set[str]:
    expected = dag.downstream(dag.load_stages(ws), stage)
    assert expected >= {stage}
    return expected


@pytest.mark.parametrize("section, key, value", [
    ("tokenizer", "vocab_size", 600),       # -> tokenizer, pretokenize and everything after
    ("sft", "warmup_steps", 3),             # -> sft, chat_eval, report; not core_eval beside it
    ("chat_eval", "max_new_tokens", 6),     # -> chat_eval and report only
])
def test_param_edit_reruns_exactly_its_stage_and_downstream_under_snakemake(ws, section, key, value):
    before = stamps(ws)
    set_param(ws, section, key, value)
    snakemake(ws, "all")
    assert ran(before, stamps(ws)) == downstream_of(ws, section)
    assert_dvc_clean(ws)


def test_vocab_edit_reruns_exactly_tokenizer_and_downstream_under_dvc(ws):
    before = stamps(ws)
    set_param(ws, "tokenizer", "vocab_size", 700)
    out = dvc(ws, "repro")
    expected = downstream_of(ws, "tokenizer")
    assert {"pretokenize", "pretrain"} <= expected and not expected & {"download", "dedup", "quality"}
    assert set(re.findall(r"Running stage '(\w+)'", out)) == expected
    assert ran(before, stamps(ws)) == expected
    assert "didn't change, skipping" in out  # download, dedup, quality
    assert json.loads((ws / "reports/metrics/tokenizer.json").read_text())["vocab_size"] == 700
    assert_dvc_clean(ws)
    assert "Data and pipelines are up to date" in dvc(ws, "repro")


def test_snakemake_adopts_dvc_results_with_touch(ws):
    # After `dvc repro` (or `dvc pull`), Snakemake's own records still hold the old params:
    # `snakemake --touch` adopts what DVC produced instead of recomputing it.
    assert "Nothing to be done" not in snakemake(ws, "--dry-run", "all")  # params differ from its records
    contents = {p.name: p.read_text() for p in (ws / "reports/metrics").glob("*.json")}
    snakemake(ws, "--touch", "all")
    assert "Nothing to be done" in snakemake(ws, "--dry-run", "all")
    # nothing was recomputed: a rerun would rewrite its metrics (timings differ run to run)
    assert {p.name: p.read_text() for p in (ws / "reports/metrics").glob("*.json")} == contents
    assert_dvc_clean(ws)
