"""download stage: pretraining text from the configured source -> parquet text shards + manifest.

    python stages/download.py --out data/raw --cache .cache/download --metrics reports/metrics/download.json

Reads params.yaml's `download` section (sources: see daychat.data.sources). Writes data/raw/ as a whole
(shards `id, text, source`, the last one validation, and manifest.json with each shard's sha256 and size)
and flat metrics (see `Download.metrics`). The cache folder is not a pipeline output: it keeps complete
and partial downloads between runs, so an interrupted download resumes and more shards fetch only the new.

Per shard (what `snakemake --config per_shard=true` runs; dvc.yaml says `meta: {shards: self}`: this
stage lists its own shards, see workflow/dag.py), the same command with
    --list --parts DIR          writes DIR/shards.json: the output shards and what each is made from
                                (no network: hf/url shards follow from the params)
    --shard NAME --parts DIR    makes only shard NAME into DIR/NAME/ (through the same --cache)
    --gather --parts DIR        writes --out and --metrics from the finished parts, byte for byte what the
                                plain command writes; `seconds` is then the span of the shard jobs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from daychat.cli import parse_args_with_parts, run, status
from daychat.data.sources import PLAN, download, download_part, gather_parts, plan_shards
from daychat.data.textshards import write_manifest
from daychat.io import atomic_dir, write_json, write_metrics
from daychat.params import load_section

NAME = "download"


def main() -> None:
    args = parse_args()
    p = load_section(NAME)
    if args.list:
        plan = plan_shards(p)
        write_json(Path(args.parts) / PLAN, plan)
        status(NAME, f"source {p.source}: {len(plan['shards'])} shards listed in {Path(args.parts) / PLAN}")
        return
    if args.shard:
        status(NAME, f"shard {args.shard} of source {p.source} -> {Path(args.parts) / args.shard}")
        with atomic_dir(Path(args.parts) / args.shard) as tmp:
            part = download_part(p, args.parts, args.shard, tmp, args.cache)
        status(NAME, f"shard {args.shard}: {part['shard']['rows']:,} docs, {part['shard']['chars']:,} chars "
                     f"in {part['finished'] - part['started']:.1f}s")
        return
    status(NAME, f"source {p.source} -> {args.out}" + (f" from the parts in {args.parts}" if args.gather else ""))
    with atomic_dir(args.out) as tmp:
        result = gather_parts(p, args.parts, tmp) if args.gather else download(p, tmp, args.cache)
        write_manifest(tmp, result.shards, **result.about)
    write_metrics(args.metrics, result.metrics())
    for note in result.notes:
        status(NAME, note)
    status(NAME, result.summary())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="text dataset folder to write (manifest.json + parquet shards)")
    parser.add_argument("--cache", required=True, help="download cache kept across runs (resumes, reuse)")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parse_args_with_parts(
        parser, listing=f"write --parts/{PLAN}: the shards and their sources",
        shard="make only this listed shard (its file name without suffix) into --parts",
        gather="write --out and --metrics from the parts in --parts")


if __name__ == "__main__":
    run(main, NAME)
