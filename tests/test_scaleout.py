"""Scale-out on the ci recipe, in temporary workspaces: the cluster path (every stage a batch job, through
Snakemake's cluster-generic executor and the stand-in scheduler of workflow/profiles/cluster-generic-local)
gives the same outputs as a local run; the profiles parse and size the stages; a run pushed to a DVC remote
and pulled into a fresh clone (no outputs, no cache) is up to date for both engines."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow import dag, remote, workspace

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "workflow" / "profiles"
pytestmark = pytest.mark.slow

# Metrics that measure the machine, not the result: timings, rates, utilisation, memory peaks.
VOLATILE = re.compile(r"(seconds|_s|_h|mfu|peak_mem_gib|budget_share)$")
# The stages that put the GPT on the accelerator (plan reads gpt.py for shapes only; report samples on CPU).
GPU_STAGES = {"pretrain", "core_eval", "sft", "chat_eval", "probe"}
# Outputs whose bytes are deterministic on CPU with the ci recipe (models/ hold timings in meta.json).
DATA_OUTS = ["data/raw", "data/dedup", "data/filtered", "models/quality", "data/tokens"]


def run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=workspace.tool_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def snakemake(ws: Path, *args: str) -> str:
    return run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(ws),
                *args], ws)


def out_hashes(ws: Path) -> dict[str, str]:
    """What dvc.lock recorded for every output (the Snakefile's onsuccess commits it)."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage["outs"]}


def stable_metrics(ws: Path) -> dict[str, dict]:
    return {p.stem: {k: v for k, v in json.loads(p.read_text()).items() if not VOLATILE.search(k)}
            for p in sorted((ws / "reports/metrics").glob("*.json"))}


def assert_dvc_clean(ws: Path) -> None:
    assert remote.UP_TO_DATE in run(["dvc", "status", *remote.pipeline(ws)], ws)


@pytest.fixture(scope="module")
def local_ws(tmp_path_factory) -> Path:
    ws = workspace.sync("ci", tmp_path_factory.mktemp("scaleout") / "local")
    snakemake(ws, "--cores", "2", "all")
    return ws


@pytest.fixture(scope="module")
def cluster_ws(tmp_path_factory) -> Path:
    ws = workspace.sync("ci", tmp_path_factory.mktemp("scaleout") / "cluster")
    out = snakemake(ws, "--profile", str(PROFILES / "cluster-generic-local"), "all")
    return ws, out


def test_cluster_path_gives_the_local_outputs(local_ws, cluster_ws):
    ws, out = cluster_ws
    all_stages = [s for s in dag.load_stages(ws) if not s.on_demand]
    # every stage went through the scheduler as its own job, a sharded stage (meta.shards; the profile
    # sets per_shard) as one job per shard of its shards folder plus its gather, and all of them exited 0
    # (`shards: self`, download: after a job that lists them)
    shard_jobs = {f"{s.name}:{name}" for s in all_stages if s.shards for name in dag.shard_names_of(ws, s)}
    jobs = len(all_stages) + len(shard_jobs) + sum(s.lists_shards for s in all_stages)
    assert len(re.findall(r"Submitted job \d+ with external jobid", out)) == jobs
    assert len(re.findall(r"--shard (\S+) --parts", out)) == len(shard_jobs) >= 3
    exit_codes = [p.read_text().strip() for p in (ws / ".snakemake/local-queue").glob("*.rc")]
    assert exit_codes == ["0"] * jobs
    assert_dvc_clean(ws)
    local, cluster = out_hashes(local_ws), out_hashes(ws)
    assert {p: cluster[p] for p in DATA_OUTS} == {p: local[p] for p in DATA_OUTS}
    assert (ws / "models/tokenizer/tokenizer.tiktoken").read_bytes() == \
        (local_ws / "models/tokenizer/tokenizer.tiktoken").read_bytes()
    metrics = stable_metrics(ws)
    assert set(metrics) == {s.name for s in all_stages} - {"core_eval"} | {"core"}
    assert metrics == stable_metrics(local_ws)
    # the comparison is not empty: the results that matter are in it
    assert {"val_bpb", "train_loss"} <= set(metrics["pretrain"]) and "core_subset" in metrics["core"]
    assert {"docs_out", "vocab_size", "train_tokens"} <= {k for m in metrics.values() for k in m}


def test_local_profile_agrees_with_the_run(local_ws):
    out = snakemake(local_ws, "--profile", str(PROFILES / "local"), "--dry-run", "all")
    assert "Nothing to be done" in out


def test_slurm_profile_sizes_the_stages(local_ws):
    profile = yaml.safe_load((PROFILES / "slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text()))  # every stage has its params section
    named = set(profile["set-threads"]) | set(profile["set-resources"])
    stages = dag.load_stages(ROOT)
    rules = sections | {rule for s in stages for rule in s.per_shard_rules}  # per_shard: the profile turns it on
    assert named <= rules and profile["config"]["per_shard"], f"slurm profile names no rule: {sorted(named - rules)}"
    for stage in stages:
        assert stage.on_demand or stage.name in profile["set-threads"], f"{stage.name}: no threads in the slurm profile"
        gpus = profile["set-resources"].get(stage.name, {}).get("gpu", 0)
        assert bool(gpus) == (stage.name in GPU_STAGES), f"{stage.name}: a GPU in the slurm profile iff it needs one"
        assert stage.name not in GPU_STAGES or "daychat/model/gpt.py" in stage.deps, stage.name
    # Snakemake takes the profile (the slurm plugin is installed, every key is valid) and sizes the jobs
    out = snakemake(local_ws, "--profile", str(PROFILES / "slurm"), "--dry-run", "--forceall", "all")
    block = out[out.index("rule pretrain:"):]
    assert re.search(r"resources: [^\n]*mem_mb=64000[^\n]*runtime=1560, gpu=1", block)  # pretrain's own line


def test_dvc_remote_push_then_pull_into_a_fresh_clone(local_ws, tmp_path):
    store = tmp_path / "store"
    run(["dvc", "remote", "add", "--force", "-d", "store", str(store)], local_ws)
    run([sys.executable, "-m", "workflow.remote", "push", str(local_ws)], ROOT)
    assert any(store.rglob("*")) and not run(["git", "status", "--porcelain"], local_ws).strip()
    # Machine B: a clone carries dvc.lock, params, metrics and the report; no outputs, no cache, no records.
    clone = tmp_path / "machine_b"
    run(["git", "clone", "-q", str(local_ws), str(clone)], tmp_path)
    assert not any((clone / p).exists() for p in DATA_OUTS + [".dvc/cache", ".snakemake"])
    run([sys.executable, "-m", "workflow.remote", "pull", str(clone)], ROOT)
    assert out_hashes(clone) == out_hashes(local_ws)
    assert all((clone / p).is_dir() for p in DATA_OUTS)
    assert "Nothing to be done" in snakemake(clone, "--cores", "1", "--dry-run", "all")
    assert_dvc_clean(clone)
    assert remote.UP_TO_DATE in run(["dvc", "repro", *remote.pipeline(clone)], clone)  # no stage reruns under DVC either
