"""download stage: pretraining text from the configured source -> parquet text shards + manifest.

    python stages/download.py --out data/raw --cache .cache/download --metrics reports/metrics/download.json

Reads params.yaml's `download` section (sources: see daychat.data.sources). Writes data/raw/ as a whole
(shards `id, text, source`, the last one validation, and manifest.json with each shard's sha256 and size)
and flat metrics (see `Download.metrics`). The cache folder is not a pipeline output: it keeps complete
and partial downloads between runs, so an interrupted download resumes and more shards fetch only the new.
"""

from __future__ import annotations

import argparse

from daychat.cli import run, status
from daychat.data.sources import download
from daychat.data.textshards import write_manifest
from daychat.io import atomic_dir, write_metrics
from daychat.params import load_section

NAME = "download"


def main() -> None:
    args = parse_args()
    p = load_section(NAME)
    status(NAME, f"source {p.source} -> {args.out}")
    with atomic_dir(args.out) as tmp:
        result = download(p, tmp, args.cache)
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
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
