"""pretokenize stage: encode every text shard into a token shard with <|bos|> before each document.

    python stages/pretokenize.py --data data/raw --tokenizer models/tokenizer --out data/tokens \
        --metrics reports/metrics/pretokenize.json

Reads params.yaml's `pretokenize` section. Writes data/tokens/ as a whole (layout in daychat.data.tokens)
and flat metrics: train_tokens, val_tokens, train_docs, val_docs, dtype, tokens_per_s and mb_per_s
(tokens and UTF-8 text megabytes per second of encoding), seconds (the whole stage).

Per shard (what `snakemake --config per_shard=true` runs, one job per shard, see workflow/dag.py), the
same command with
    --shard NAME --parts DIR    encodes only shard NAME of --data into DIR/NAME/ (writes nothing else)
    --gather --parts DIR        writes --out and --metrics from the finished parts, byte for byte what the
                                plain command writes; encoding time is then the span from the first part's
                                start to the last part's end (the wall time of the shard jobs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from daychat.cli import parse_args_with_parts, run, status
from daychat.data.textshards import read_manifest, verify_shards
from daychat.data.tokens import (
    gather_parts,
    plan_workers,
    pretokenize,
    pretokenize_part,
    token_dtype,
)
from daychat.io import atomic_dir, ensure_space, write_metrics
from daychat.params import load_section
from daychat.tokenizer import Tokenizer

NAME = "pretokenize"


def main() -> None:
    t0 = time.perf_counter()
    args = parse_args()
    p = load_section(NAME)
    if not args.gather:  # what this job reads: every shard, or its own (a gather's shard jobs checked theirs)
        verify_shards(args.data, args.shard)
    if args.shard:
        status(NAME, f"encoding shard {args.shard} of {args.data} into {args.parts}/{args.shard}")
        ensure_space(args.parts, token_bytes_estimate(args.data, args.tokenizer, p.dtype, args.shard),
                     f"the token shard {args.shard}")
        with atomic_dir(Path(args.parts) / args.shard) as tmp:
            part = pretokenize_part(args.data, args.tokenizer, args.shard, tmp, p.dtype, p.workers, p.batch_docs)
        status(NAME, f"shard {args.shard}: {part['shard']['tokens']:,} tokens in {time.perf_counter() - t0:.1f}s")
        return
    if args.gather:
        status(NAME, f"gathering the parts in {args.parts} into {args.out}")
        with atomic_dir(args.out) as tmp:
            meta, parts = gather_parts(args.data, args.tokenizer, args.parts, tmp, p.dtype)
        started = min(part["started"] for part in parts)
        encode_seconds = max(part["finished"] for part in parts) - started
        seconds = time.time() - started
    else:
        processes, threads = plan_workers(p.workers, len(read_manifest(args.data)))
        status(NAME, f"encoding {args.data} with {args.tokenizer} on {processes} process(es) x {threads} thread(s)")
        ensure_space(args.out, token_bytes_estimate(args.data, args.tokenizer, p.dtype), "the token shards")
        with atomic_dir(args.out) as tmp:
            t_encode = time.perf_counter()
            meta = pretokenize(args.data, args.tokenizer, tmp, p.dtype, p.workers, p.batch_docs)
            encode_seconds = time.perf_counter() - t_encode
        seconds = time.perf_counter() - t0
    report(meta, encode_seconds, seconds, args.metrics)


def token_bytes_estimate(data: str, tokenizer: str, dtype: str, shard: str | None = None) -> float:
    """About the bytes the token shards of `data` (or of one shard) will take: its characters / the
    tokenizer's bytes_per_token (measured on its validation text; characters stand in for UTF-8 bytes, so
    a corpus far from ASCII needs more) x the id size, plus one BOS per document."""
    tok = Tokenizer.load(tokenizer)
    per_token = tok.info.get("bytes_per_token") or 1.0
    itemsize = token_dtype(tok.vocab_size, dtype).itemsize
    shards = [s for s in read_manifest(data) if shard is None or s.name == shard]
    return sum(s.chars / per_token + s.rows for s in shards) * itemsize


def report(meta: dict, encode_seconds: float, seconds: float, metrics: str) -> None:
    totals = {f"{split}_{key}": 0 for split in ("train", "val") for key in ("tokens", "docs")}
    for shard in meta["shards"]:
        totals[f"{shard['split']}_tokens"] += shard["tokens"]
        totals[f"{shard['split']}_docs"] += shard["docs"]
    tokens = totals["train_tokens"] + totals["val_tokens"]
    text_mb = sum(shard["text_bytes"] for shard in meta["shards"]) / 1e6
    status(NAME, f"{tokens:,} tokens ({meta['dtype']}) from {text_mb:,.1f} MB of text in {encode_seconds:.1f}s: "
                 f"{text_mb / encode_seconds:.1f} MB/s")
    write_metrics(metrics, {
        **totals,
        "dtype": meta["dtype"],
        "tokens_per_s": tokens / encode_seconds,
        "mb_per_s": text_mb / encode_seconds,
        "seconds": seconds,
    })


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="text dataset folder (manifest.json + parquet shards)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (from the tokenizer stage)")
    parser.add_argument("--out", required=True, help="token dataset folder to write")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parse_args_with_parts(parser, shard="encode only this shard (its manifest file name without suffix) into --parts",
                                 gather="write --out and --metrics from the parts in --parts")


if __name__ == "__main__":
    run(main, NAME)
