"""dedup stage: remove exact and MinHash near-duplicate documents from a text dataset.

    python stages/dedup.py --data data/raw --out data/dedup --metrics reports/metrics/dedup.json

Reads params.yaml's `dedup` section (the method, its four steps and the threshold math: daychat.data.dedup).
Writes data/dedup/ as a whole: the kept documents in shards of the same names and splits as the input,
manifest.json, and removed.parquet (one row per removed document: id, file, row, split, reason
exact|near, jaccard, cluster, and the id/file/row of the document kept in its place). Flat metrics: see
`DedupResult.metrics` (docs_in, docs_out, exact_duplicates, near_duplicates, docs_per_s, mb_per_s, the
S-curve's est_false_positive_rate / est_false_negative_rate, candidate_pairs, verified_pairs, ...).

Per shard (what `snakemake --config per_shard=true` runs, one job per shard, see workflow/dag.py), the
same command with
    --shard NAME --parts DIR    computes the exact keys and MinHash band keys of shard NAME of --data into
                                DIR/NAME/ (writes nothing else)
    --gather --parts DIR        loads every shard's part, then buckets, verifies, clusters and writes --out
                                and --metrics, byte for byte what the plain command writes; signatures_seconds
                                is then the span from the first part's start to the last part's end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from daychat.cli import parse_args_with_parts, run, status
from daychat.data.dedup import dedup, lsh_error_rates, sign_part
from daychat.data.textshards import verify_shards
from daychat.io import atomic_dir, ensure_space, tree_bytes, write_metrics
from daychat.params import load_section

NAME = "dedup"


def main() -> None:
    args = parse_args()
    p = load_section(NAME)
    if not args.gather:  # what this job reads: every shard, or its own (a gather's shard jobs checked theirs)
        verify_shards(args.data, args.shard)
    if args.shard:
        t0 = time.perf_counter()
        status(NAME, f"signing shard {args.shard} of {args.data} into {args.parts}/{args.shard}")
        with atomic_dir(Path(args.parts) / args.shard) as tmp:
            part = sign_part(args.data, args.shard, tmp, p)
        status(NAME, f"shard {args.shard}: {part['docs']:,} documents in {time.perf_counter() - t0:.1f}s")
        return
    fp, fn = lsh_error_rates(p.threshold, p.bands, p.rows)
    status(NAME, f"{args.data} -> {args.out}: {p.ngram}-{p.shingle} shingles, Jaccard >= {p.threshold}, "
                 f"{p.bands} bands x {p.rows} rows (S-curve estimates: false positives {fp:.3f}, "
                 f"false negatives {fn:.4f}){', verified exactly' if p.verify else ''}")
    ensure_space(args.out, tree_bytes(args.data), "the deduplicated shards")  # at most the input again
    with atomic_dir(args.out) as tmp:
        result = dedup(args.data, tmp, p, parts=args.parts if args.gather else None)
    metrics = result.metrics(p)
    write_metrics(args.metrics, metrics)
    status(NAME, result.summary())
    status(NAME, f"{metrics['mb_per_s']:.1f} MB/s, {metrics['docs_per_s']:,.0f} docs/s "
                 f"(signatures {metrics['signature_mb_per_s']:.1f} MB/s)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="text dataset folder to read (manifest.json + parquet shards)")
    parser.add_argument("--out", required=True, help="text dataset folder to write, with removed.parquet")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parse_args_with_parts(parser, shard="sign only this shard (its manifest file name without suffix) into --parts",
                                 gather="write --out and --metrics from the parts in --parts")


if __name__ == "__main__":
    run(main, NAME)
