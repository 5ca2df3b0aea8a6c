"""End to end on the ci recipe, in a temporary workspace: the DAG runs under both engines, a rerun does
nothing, editing one knob reruns exactly that stage and what is downstream of it, each engine agrees with
what the other did, and after a kill -9 or a bad params.yaml the same command recovers with the same bytes
(the fast subset of `make faults`, bench/faults.py)."""


import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench import faults
from workflow import dag, workspace

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


SNAKEMAKE = [sys.executable, "-m", "snakemake", "--cores", "2"]


def env() -> dict[str, str]:
    # Both engines give a stage the same threads (Snakemake sets OMP_NUM_THREADS to a job's threads, here
    # --cores 2): CPU float sums depend on the thread count, and the kill tests compare bytes across engines.
    return {**workspace.tool_env(), "OMP_NUM_THREADS": "2"}


def snakemake(ws: Path, *args: str) -> str:
    cmd = [*SNAKEMAKE[:3], "--snakefile", str(ROOT / "Snakefile"), "--directory", str(ws), *SNAKEMAKE[3:], *args]
    result = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, env=env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def dvc(ws: Path, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=ws, capture_output=True, text=True, env=env())
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
    for stage in all_stages:  # each job's own output in its log, Snakemake's measure of it in its benchmark
        assert f"[{stage}] done in " in (ws / f"logs/{stage}.log").read_text()
        header, row = (ws / f"benchmarks/{stage}.tsv").read_text().splitlines()[:2]
        measured = dict(zip(header.split("\t"), row.split("\t")))
        assert float(measured["s"]) > 0 and float(measured["max_rss"]) > 0, (stage, measured)
    assert "| job time | peak RSS |" in (ws / "reports/report.md").read_text()  # the report's budget reads them


def test_second_snakemake_run_does_nothing(ws):
    before = stamps(ws)
    out = snakemake(ws, "all")
    assert "Nothing to be done" in out
    assert ran(before, stamps(ws)) == set()
    assert_dvc_clean(ws)


def test_snakemakes_html_report_shows_the_plots_in_a_browser(ws, tmp_path):
    before = stamps(ws)
    page = tmp_path / "report.html"
    snakemake(ws, "--report", str(page))
    assert ran(before, stamps(ws)) == set()  # a report runs nothing
    html = page.read_text()
    plots = sorted(p.name for p in (ws / "reports/report").glob("*.png"))
    assert len(plots) >= 5 and html.count("data:image/png;") == len(plots)  # self-contained: every plot inside
    assert all(f"reports/metrics/{s.metrics[0].split('/')[-1]}" in html for s in dag.load_stages(ws) if not s.on_demand)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    assert chromium.exists() and driver.exists(), "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(driver)), options=options)
    try:
        browser.get(page.as_uri())
        wait = WebDriverWait(browser, 20, poll_frequency=0.05)
        # the report's own app: Results > Plots lists the report stage's PNGs; the eye button shows one
        wait.until(lambda d: d.find_elements(By.XPATH, "//span[normalize-space(text())='Plots']"))[0].click()
        for name in plots:
            row = wait.until(lambda d: d.find_elements(By.XPATH, f"//td[normalize-space(text())='reports/report/{name}']"))[0]
            row.find_element(By.XPATH, "..//a[@iconname='eye']").click()

            def shown(d):  # decoded and laid out: a real image, not a broken icon
                return [i for i in d.find_elements(By.CSS_SELECTOR, f"img[src*='filename={name};']")
                        if i.is_displayed() and d.execute_script("return arguments[0].naturalWidth", i) > 300]
            assert wait.until(shown)[0].size["width"] > 300, name
    finally:
        browser.quit()
    assert "Nothing to be done" in snakemake(ws, "--dry-run", "all")
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


def test_snakemake_agrees_after_dvc_repro_without_being_told(ws):
    # After `dvc repro` (the test above), Snakemake's own records still hold the old params: the Snakefile
    # adopts what DVC brought up to date (workflow/guard.py), with no --touch for anyone to type.
    contents = {p.name: p.read_text() for p in (ws / "reports/metrics").glob("*.json")}
    assert "Nothing to be done" in snakemake(ws, "--dry-run", "all")
    assert "Nothing to be done" in snakemake(ws, "all")
    # nothing was recomputed: a rerun would rewrite its metrics (timings differ run to run)
    assert {p.name: p.read_text() for p in (ws / "reports/metrics").glob("*.json")} == contents
    assert_dvc_clean(ws)


# ----------------------------------------------------------------------------------------------------
# Faults (the fast subset of `make faults`)


def same_bytes(ws: Path) -> dict[str, str]:
    """sha256 of every output that must be byte-identical when identical work is redone."""
    stages = [s for s in dag.load_stages(ws) if not s.on_demand]
    return {rel: digest for rel, digest in faults.hashes(ws, stages).items() if faults.deterministic(stages, rel)}


def start(ws: Path, cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ws, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_when(proc: subprocess.Popen, ready) -> None:
    deadline = time.time() + 600
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill point"
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group, engine and stage, as a power cut would
    except ProcessLookupError:  # it ended meanwhile: nothing to recover, the checks below hold all the same
        pass
    proc.wait()


def checkpoints(ws: Path, stage: str) -> int:
    return len(list((ws / ".cache" / stage).rglob("step_*.pt")))


def test_bad_params_stop_snakemake_before_anything_is_deleted(ws):
    before, saved = faults.hashes(ws, dag.load_stages(ws)), (ws / "params.yaml").read_text()
    for key, value, says in (("pretrain.n_kv_head", 3, "params.yaml: pretrain.n_kv_head does not make a valid model"),
                             ("pretrain.depth", 0, "params.yaml: pretrain.depth must be >= 1, got 0"),
                             ("pretrian", {"depth": 2}, "params.yaml: pretrian is not a known section")):
        faults._set_param(ws, key, value)
        result = subprocess.run([*SNAKEMAKE, "all"], cwd=ws, capture_output=True, text=True, env=env())
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.lower().startswith("error")]
        assert result.returncode == 2 and errors == [errors[0]] and errors[0].startswith(f"error: [snakemake] {says}"), errors
        assert faults.hashes(ws, dag.load_stages(ws)) == before  # no output deleted, none rewritten
        (ws / "params.yaml").write_text(saved)
    assert "Nothing to be done" in snakemake(ws, "--dry-run", "all")


def test_killed_anywhere_the_same_command_finishes_with_the_same_bytes(ws):
    before = same_bytes(ws)
    faults.force(ws, next(s for s in dag.load_stages(ws) if s.name == "pretrain"))
    kill_when(start(ws, [*SNAKEMAKE, "all"]), lambda: checkpoints(ws, "pretrain") >= 1)
    assert (ws / ".snakemake/locks").is_dir()  # what made the next run refuse before (LockException)
    out = snakemake(ws, "all")
    assert re.search(r"\[pretrain\] run \S+: resuming after step \d+", out)
    assert same_bytes(ws) == before
    assert "Nothing to be done" in snakemake(ws, "--dry-run", "all")
    assert_dvc_clean(ws)


def test_two_runs_refuse_and_dvc_finishes_what_a_killed_snakemake_began(ws):
    before = same_bytes(ws)
    faults.force(ws, next(s for s in dag.load_stages(ws) if s.name == "sft"))
    run = start(ws, [*SNAKEMAKE, "all"])
    kill_when(run, lambda: checkpoints(ws, "sft") >= 1 and refuses_a_second_run(ws))
    dvc(ws, "repro")  # recovery by the other engine
    assert same_bytes(ws) == before
    assert "Nothing to be done" in snakemake(ws, "--dry-run", "all")
    assert_dvc_clean(ws)


def refuses_a_second_run(ws: Path) -> bool:
    """While a run is under way: a second Snakemake and a dvc repro both refuse, in one line each."""
    second = subprocess.run([*SNAKEMAKE, "all"], cwd=ws, capture_output=True, text=True, env=env())
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1].startswith("error: [snakemake] another run is using this workspace: snakemake")
    concurrent = subprocess.run(["dvc", "repro"], cwd=ws, capture_output=True, text=True, env=env())
    assert concurrent.returncode != 0 and "Unable to acquire lock" in concurrent.stderr
    return True
