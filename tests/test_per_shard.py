"""Per-shard mode end to end on the ci recipe, in a temporary workspace: `snakemake --config per_shard=true`
runs pretokenize as one job per shard of data/filtered plus a gather, the token dataset is byte-identical to
what the stage's plain command (DVC's, one process) writes, and both engines then see the workspace as up to
date. Only the DAG up to pretokenize runs: the stages after it do not take part in the mechanism."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workflow import dag, remote, workspace

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # ~30 s on a 2-core CPU: download .. pretokenize


def run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=workspace.tool_env(), check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def snakemake(ws: Path, *args: str) -> str:
    # the targets go before --config, which takes every KEY=VALUE after it
    return run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(ws),
                "--cores", "2", *args], ws)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".snakemake_timestamp"}


def test_one_job_per_shard_then_a_gather_gives_the_plain_output(tmp_path):
    ws = workspace.sync("ci", tmp_path / "ci")
    out = snakemake(ws, "--printshellcmds", "pretokenize", "--config", "per_shard=true")
    shards = dag.shard_names(ws / "data/filtered")
    assert len(shards) >= 3  # the ci recipe: 2 train + 1 val
    assert len(re.findall(r"^(?:local)?rule pretokenize_shard:", out, re.MULTILINE)) == len(shards)
    assert set(re.findall(r"--shard (\S+) --parts", out)) == set(shards)
    assert len(re.findall(r"^(?:local)?rule pretokenize:", out, re.MULTILINE)) == 1 and "--gather --parts" in out
    assert not (ws / ".cache/shards/pretokenize").exists() or not any((ws / ".cache/shards/pretokenize").iterdir())

    # DVC's command, every shard in one process, into another folder: the same bytes
    stage = next(s for s in dag.load_stages(ws) if s.name == "pretokenize")
    plain = stage.cmd.replace("--out data/tokens", f"--out {tmp_path}/plain").replace(
        "--metrics reports/metrics/pretokenize.json", f"--metrics {tmp_path}/plain.json")
    run(plain.split(), ws)
    assert file_hashes(ws / "data/tokens") == file_hashes(tmp_path / "plain")

    # the onsuccess `dvc commit` recorded the gathered stage (and its upstream); no rule reruns
    assert remote.UP_TO_DATE in run(["dvc", "status", "--with-deps", "pretokenize"], ws)
    assert "Nothing to be done" in snakemake(ws, "--dry-run", "pretokenize", "--config", "per_shard=true")
