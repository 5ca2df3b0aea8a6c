"""Dedup stage throughput and memory on ../shared/data/corpus: `python -m bench.dedup`.

Goal (issue 3), on the 2-core dev machine: >= 10 MB/s of text on the Gutenberg shards with 2 workers and a
peak RSS under 1 GB. References on this kind of machine: datatrove 0.10's MinHash signature step (5-grams,
14x8 hashes, 2 workers) ~1.3 MB/s on Gutenberg and ~0.5 MB/s on mixed; datasketch with an xxhash hash
function ~9 MB/s in one process (measured again here, on one Gutenberg shard, as `datasketch_xxhash`).

The stage runs as the engines run it (its params section, default values, workers: 2), each run in its own
process; peak RSS is that of the largest process of its tree (wait4: pool workers included). Figures:
- gutenberg_{1,2,4,8}_shards: the first k shards as train plus an empty validation shard, so the work
  grows with k alone (1 shard keeps one worker busy: work is spread by shard);
- mixed: its 2 shards (3,719 short documents, ~16M characters).
mb_per_s / docs_per_s are the whole stage (read, sign, bucket, verify, write) over the text it read;
signature_mb_per_s the signature step alone, the one datatrove's figure measures. Results are merged into
reports/bench/data.json under "dedup"; other benchmarks own the other keys.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.data import link_dataset, measure, write_params
from bench import record
from daychat.data.textshards import ShardInfo, ShardWriter, verify_parquet, write_manifest
from daychat.params import defaults

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus"
OUT = ROOT / "reports" / "bench" / "data.json"
WORKERS = 2
REPEATS = 3  # each timing is the best of this many runs: the shared 2-core machine is noisy


def main() -> None:
    if not CORPUS.is_dir():
        sys.exit(f"error: {CORPUS} not found; the dedup benchmark needs ../shared beside the project")
    gutenberg = sorted((CORPUS / "gutenberg").resolve().glob("*.parquet"))
    # The dev machine's 2 cores are shared: the load average says how much of them this run had.
    results = {"workers": WORKERS, "params": {**defaults("dedup"), "workers": WORKERS},
               "load_average_1min_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        tmp = Path(tmp)
        for k in (1, 2, 4, 8):
            ws = tmp / f"gutenberg{k}"
            link_train_only(gutenberg[:k], ws / "data/raw")
            results[f"gutenberg_{k}_shards"] = run_stage(ws)
        ws = tmp / "mixed"
        link_dataset(sorted((CORPUS / "mixed").resolve().glob("*.parquet")), ws / "data/raw")
        results["mixed"] = run_stage(ws)
        results["datasketch_xxhash"] = json.loads(
            measure([sys.executable, "-m", "bench.dedup", "--datasketch", str(gutenberg[0])], ROOT)["stdout"])
    full = results["gutenberg_8_shards"]
    results.update({
        "load_average_1min_after": os.getloadavg()[0],
        "goal_mb_per_s": 10.0,
        "goal_peak_rss_mb": 1024,
        "meets_goal": full["mb_per_s"] >= 10.0 and full["peak_rss_mb"] < 1024,
        "reference_datatrove_signature_mb_per_s": {"gutenberg": 1.3, "mixed": 0.5},
        "reference_datasketch_xxhash_mb_per_s": 9.0,
    })
    record(OUT, {"dedup": results})
    print(json.dumps(results, indent=2))


def link_train_only(paths: list[Path], folder: Path) -> None:
    """A text dataset whose shards are all train (linked, not copied), plus the empty validation shard
    that a dataset needs."""
    folder.mkdir(parents=True)
    infos = []
    for path in paths:
        (folder / path.name).symlink_to(path)
        rows, chars = verify_parquet(path)
        infos.append(ShardInfo(file=path.name, split="train", rows=rows, chars=chars, origin=str(path)))
    with ShardWriter(folder / "val_empty.parquet", "val") as writer:
        pass
    write_manifest(folder, [*infos, writer.info])


def run_stage(ws: Path) -> dict:
    write_params(ws, dedup={**defaults("dedup"), "workers": WORKERS})
    cmd = [sys.executable, str(ROOT / "stages/dedup.py"), "--data", "data/raw", "--out", "data/dedup",
           "--metrics", "metrics/dedup.json"]
    runs = []
    for _ in range(REPEATS):
        run = measure(cmd, ws)
        runs.append((run, json.loads((ws / "metrics/dedup.json").read_text())))
    run, metrics = min(runs, key=lambda r: r[0]["seconds"])
    keys = ("docs_in", "docs_out", "exact_duplicates", "near_duplicates", "chars_in", "mb_per_s", "docs_per_s",
            "signature_mb_per_s", "seconds", "candidate_pairs", "verified_pairs")
    return {**{k: metrics[k] for k in keys}, "process_s": run["seconds"], "peak_rss_mb": run["peak_rss_mb"]}


def child_datasketch(path: Path) -> None:
    """The reference: datasketch MinHash (100 permutations) with xxhash over the same 5-word shingles,
    one document at a time in this one process."""
    import re

    import xxhash
    from datasketch import MinHash

    from daychat.data.textshards import iter_texts

    words = re.compile(r"\w+")
    text_bytes, t0 = 0, time.perf_counter()
    for text in iter_texts([path]):
        tokens = words.findall(text.lower())
        shingles = [" ".join(tokens[i:i + 5]).encode() for i in range(max(len(tokens) - 4, 1))]
        m = MinHash(num_perm=100, hashfunc=xxhash.xxh32_intdigest)
        m.update_batch(shingles)
        text_bytes += len(text.encode("utf-8"))
    seconds = time.perf_counter() - t0
    print(json.dumps({"file": path.name, "mb_per_s": text_bytes / 1e6 / seconds, "seconds": seconds}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--datasketch"]:
        child_datasketch(Path(sys.argv[2]))
    else:
        main()
