"""CORE evaluation throughput on CPU: `python -m bench.core`.

A randomly initialised tiny GPT (2 layers of 64, context 256, a 400-token BPE trained on ARC-Easy text)
scores the first 20 items of every task of ../shared/data/eval_bundle (440 items; few-shot prompts are
scored uncropped, past the context as the reference does) in batches of 8,192 tokens, through the
memory-bounded scoring path (daychat.eval.scoring). Throughput = items / wall seconds of evaluate_core, tokenizing
and rendering included. Results are merged into reports/bench/core.json under "cpu_tiny".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench import record
from daychat.eval.bundle import load_bundle
from daychat.eval.core import evaluate_core
from daychat.model import GPT, GPTConfig
from daychat.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT.parent / "shared" / "data" / "eval_bundle"
OUT = ROOT / "reports" / "bench" / "core.json"
PER_TASK, BATCH_TOKENS, SEQ_LEN = 20, 8192, 256


def main() -> None:
    if not BUNDLE.is_dir():
        sys.exit(f"error: {BUNDLE} not found; the CORE benchmark needs ../shared beside the project")
    tasks = load_bundle(BUNDLE)
    lines = (BUNDLE / "eval_data/world_knowledge/arc_easy.jsonl").read_text().splitlines()[:300]
    tok = Tokenizer.train(lines, 400)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=SEQ_LEN, depth=2, aspect_ratio=32, head_dim=32))
    model.init_weights()
    model.eval()
    result = evaluate_core(model, tok, tasks, PER_TASK, "cpu", BATCH_TOKENS, model.max_positions)
    full_items = sum(len(t.items) for t in tasks)
    cpu_tiny = {"examples": result["examples"], "seconds": round(result["seconds"], 2),
                "examples_per_s": round(result["examples_per_s"], 1), "per_task": PER_TASK, "batch_tokens": BATCH_TOKENS,
                "model": "depth 2, dim 64, context 256, vocab 400", "threads": torch.get_num_threads(),
                "full_bundle_items": full_items,
                }
    record(OUT, {"cpu_tiny": cpu_tiny})
    print(json.dumps(cpu_tiny, indent=2))


if __name__ == "__main__":
    main()
