"""tokenizer stage: train a BPE tokenizer on the train split, save it where tiktoken can load it.

    python stages/tokenizer.py --data data/raw --out models/tokenizer --metrics reports/metrics/tokenizer.json

Reads params.yaml's `tokenizer` section. Writes models/tokenizer/ (tokenizer.tiktoken + tokenizer.json,
see daychat.tokenizer) as a whole, and flat metrics: vocab_size (what training produced),
vocab_size_requested, bytes_per_token (on up to eval_chars of the val split), train_chars, train_docs,
train_seconds (the BPE training call, text streaming included) and seconds (the whole stage).
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Iterable, Iterator

from daychat.cli import progress, run, status
from daychat.data.textshards import read_manifest, shard_paths, verify_shards
from daychat.io import atomic_dir, write_metrics
from daychat.params import load_section
from daychat.tokenizer import TextStream, Tokenizer

NAME = "tokenizer"


def main() -> None:
    t0 = time.perf_counter()
    args = parse_args()
    p = load_section(NAME)
    verify_shards(args.data)
    train = TextStream(shard_paths(args.data, "train"), p.max_chars, p.doc_cap)
    available = sum(s.chars for s in read_manifest(args.data) if s.split == "train")
    status(NAME, f"training a {p.vocab_size:,}-token BPE on up to {p.max_chars:,} characters of {args.data} (train split)")
    tok = Tokenizer.train(announce_merging(train, total=min(p.max_chars, available) or None), p.vocab_size, p.pattern)
    if tok.vocab_size < p.vocab_size:
        status(NAME, f"warning: the training text ran out of pairs to merge: vocab_size is {tok.vocab_size}, "
                     f"not the {p.vocab_size} asked for (give it more text: tokenizer.max_chars, doc_cap; "
                     "or lower tokenizer.vocab_size)")
    tok.info.update(train_chars=train.chars, train_docs=train.docs, max_chars=p.max_chars, doc_cap=p.doc_cap)

    val = TextStream(shard_paths(args.data, "val"), p.eval_chars)
    bytes_per_token = tok.bytes_per_token(val)
    tok.info.update(bytes_per_token=bytes_per_token, eval_chars=val.chars)
    status(NAME, f"vocab {tok.vocab_size:,}: {bytes_per_token:.3f} bytes/token on {val.chars:,} validation characters")

    with atomic_dir(args.out) as tmp:
        tok.save(tmp)
    write_metrics(args.metrics, {
        "vocab_size": tok.vocab_size,
        "vocab_size_requested": p.vocab_size,
        "bytes_per_token": bytes_per_token,
        "train_chars": train.chars,
        "train_docs": train.docs,
        "train_seconds": tok.train_seconds,
        "seconds": time.perf_counter() - t0,
    })


def announce_merging(texts: Iterable[str], total: int | None) -> Iterator[str]:
    """Pass `texts` through, with a progress bar over characters read; rustbpe computes the merges once
    its input is exhausted, a phase with no progress of its own, so say it has begun. No text, no bar:
    then the only thing printed is the error that follows."""
    texts = iter(texts)
    first = next(texts, None)
    if first is None:
        return
    with progress(total=total, desc="BPE input", unit="char", unit_scale=True) as bar:
        for text in itertools.chain([first], texts):
            bar.update(len(text))
            yield text
    status(NAME, "input read; computing merges")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="text dataset folder (manifest.json + parquet shards)")
    parser.add_argument("--out", required=True, help="tokenizer folder to write")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
