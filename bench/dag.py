"""No-op rerun cost of the whole DAG under both engines, on the ci recipe: `python -m bench.dag`.

Goal (issue 2): a no-op rerun of the whole DAG under 2 s. Reference on the 2-core dev machine: a
10-stage no-op `snakemake --cores 2 all` takes 0.8 s and a no-op `dvc repro` 0.5 s. The Snakemake
figure includes the `dvc commit` that the Snakefile's onsuccess runs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import record
from workflow import dag, workspace

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench" / "data.json"


def timed(cmd: list[str], cwd: Path, repeats: int = 5) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=workspace.tool_env(), check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace.sync("ci", Path(tmp) / "ci")
        snakemake = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--cores", "2", "all"]
        t0 = time.perf_counter()
        subprocess.run(snakemake, cwd=ws, env=workspace.tool_env(), check=True, capture_output=True)
        first = time.perf_counter() - t0
        result = {
            "recipe": "ci",
            "stages": len(dag.load_stages(ws)),
            "first_run_s": first,
            "noop_snakemake": timed(snakemake, ws),
            "noop_dvc_repro": timed(["dvc", "repro"], ws),
            "goal_s": 2.0,
        }
    record(OUT, {"dag": result})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
