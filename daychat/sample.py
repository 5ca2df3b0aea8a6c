"""Print a few continuations of a prompt from a trained model folder.

    python -m daychat.sample --model models/base -p "The meaning of" -n 64 [--temperature 0.8 --top-k 50 --seed 0]

Loads models/base (model.pt, config.json and the tokenizer copied beside them; see
daychat.train.checkpoint) and samples token by token, recomputing the whole context at every step: simple
and plenty fast for a few short samples (the KV-cache engine belongs to the chat stage). The prompt is
preceded by <|bos|>, as every training document was. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from daychat.errors import UserError
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import TOKENIZER_DIR, load_model_folder


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int = 50, num_samples: int = 1, seed: int = 0, stop: int | None = None) -> list[list[int]]:
    """`num_samples` continuations (new token ids only) of `prompt`, each at most `max_new_tokens` long."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    window = model.config.sequence_len
    idx = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)  # (N, T)
    finished = torch.zeros(num_samples, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        # (N, V): only the last position predicts the next token, so only its logits are made
        logits = model.head(model.hidden(idx[:, -window:])[:, -1, :])
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, next_id], dim=1)
        if stop is not None:
            finished |= next_id.squeeze(1) == stop
            if finished.all():
                break
    return [row[len(prompt):] for row in idx.tolist()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, _ = load_model_folder(args.model, args.device)
    tokenizer = Tokenizer.load(args.tokenizer or Path(args.model) / TOKENIZER_DIR)
    prompt = tokenizer.encode(args.prompt, prepend_bos=True)
    samples = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       num_samples=args.num_samples, seed=args.seed, stop=tokenizer.bos_id)
    for i, ids in enumerate(samples):
        if tokenizer.bos_id in ids:  # a new document began: the continuation ended before it
            ids = ids[:ids.index(tokenizer.bos_id)]
        print(f"--- sample {i + 1}\n{args.prompt}{tokenizer.decode(ids)}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base", help="model folder (from the pretrain stage)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the copy inside the model folder)")
    parser.add_argument("-p", "--prompt", default="The meaning of")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: [sample] {e}", file=sys.stderr)
        sys.exit(2)
