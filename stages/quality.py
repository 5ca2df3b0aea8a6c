"""quality stage: language ID, heuristic filters and a fastText quality classifier over a text dataset.

    python stages/quality.py --data data/dedup --model-out models/quality --out data/filtered \
        --cache .cache/download --metrics reports/metrics/quality.json

Reads params.yaml's `quality` section (see daychat.data.quality for the three parts). Writes, each as a
whole: data/filtered/ (the kept documents, same shards and split as the input, stripped of Gutenberg
framing and boilerplate, + manifest.json, + dropped.parquet: the dropped documents with reason, value
and detail, all or a seeded sample), models/quality/ (model.ftz or model.bin + meta.json; only
meta.json when the classifier is off) and flat metrics: docs_in, docs_out, dropped_<reason> for every
reason, stripped_chars, classifier_precision/recall on the held-out windows, classifier_spearman_length
and classifier_spearman_line_chars (the score against words and characters per line, over every scored
document: near 0 means the classifier is not a length or layout detector), docs_per_s, mb_per_s, seconds.
The cache folder (the download stage's) keeps classifier sources fetched over http(s).

Per shard (what `snakemake --config per_shard=true` runs, one job per shard, see workflow/dag.py), the
same command with
    --shard NAME --parts DIR    runs language ID and the heuristics on shard NAME of --data into DIR/NAME/
                                (its survivors, audit rows and counts; writes nothing else)
    --gather --parts DIR        trains the classifier on the parts' survivors, scores them and writes
                                --out, --model-out and --metrics, byte for byte what the plain command
                                writes (timings aside); `seconds` then runs from the first part's start.
Scoring stays in the gather: it needs the classifier, trained on a sample across every shard.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from daychat.cli import parse_args_with_parts, run, status
from daychat.data.quality import filter_dataset, filter_part
from daychat.data.textshards import verify_shards
from daychat.io import atomic_dir, ensure_space, tree_bytes, write_metrics
from daychat.params import load_section

NAME = "quality"


def main() -> None:
    args = parse_args()
    p = load_section(NAME)
    if not args.gather:  # what this job reads: every shard, or its own (a gather's shard jobs checked theirs)
        verify_shards(args.data, args.shard)
    if args.shard:
        t0 = time.perf_counter()
        status(NAME, f"filtering shard {args.shard} of {args.data} into {args.parts}/{args.shard}")
        with atomic_dir(Path(args.parts) / args.shard) as tmp:
            part = filter_part(p, args.data, args.shard, tmp)
        tally = part["tally"]
        status(NAME, f"shard {args.shard}: kept {tally['kept']:,} of {tally['docs']:,} docs before the classifier "
                     f"in {time.perf_counter() - t0:.1f}s")
        return
    parts = [name for name, on in (("language ID", p.lid), (f"{len(p.heuristics)} heuristics", p.heuristics),
                                   ("classifier", p.classifier)) if on]
    status(NAME, f"{args.data} -> {args.out}: {', '.join(parts) or 'no filter'}")
    ensure_space(args.out, tree_bytes(args.data), "the filtered shards")  # at most the input again
    with atomic_dir(args.model_out) as model_tmp, atomic_dir(args.out) as out_tmp:
        result = filter_dataset(p, args.data, out_tmp, model_tmp, args.cache, args.parts if args.gather else None)
    write_metrics(args.metrics, result.metrics())
    status(NAME, result.summary())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="text dataset to filter (manifest.json + parquet shards)")
    parser.add_argument("--model-out", required=True, help="classifier folder to write (model + meta.json)")
    parser.add_argument("--out", required=True, help="filtered text dataset folder to write")
    parser.add_argument("--cache", default=".cache/download", help="download cache for http(s) classifier sources")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parse_args_with_parts(parser, shard="filter only this shard (its manifest file name without suffix) into --parts",
                                 gather="write the outputs from the parts in --parts")


if __name__ == "__main__":
    run(main, NAME)
