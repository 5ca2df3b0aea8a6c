"""Validation bits per byte: a loss that does not depend on the tokenizer.

    bpb = sum over target tokens of the loss in nats / (ln 2 x sum of the UTF-8 bytes of those tokens)

Special tokens (<|bos|> and the chat tokens) are 0 bytes long and are left out of both sums, and so are
ignored targets (-1), as in nanochat's loss_eval.evaluate_bpb. Two tokenizers, or two vocab sizes, then
compare on the same scale: the cost of the text in bits per byte of text.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import numpy as np
import torch

from daychat.data.loader import PackedLoader
from daychat.eval.scoring import DEFAULT_CHUNK_ROWS, losses_at
from daychat.data.tokens import TokenShards


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 token_bytes: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
    """Bits per byte of `model` over `batches` of (inputs, targets); `token_bytes` is (vocab,) on its device.

    The losses come from daychat.eval.scoring.losses_at: the trunk once per batch, the head `chunk_rows`
    positions at a time, so no batch's fp32 logits are ever whole in memory. A GPT's FP8 linears run in bf16
    here (daychat.model.fp8: no grad, no FP8), so the curve compares with core_eval's numbers."""
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    try:
        for x, y in batches:
            with autocast():
                losses, _ = losses_at(model, x, y, chunk_rows=chunk_rows)  # (B*T,) nats per target, 0 if ignored
            y = y.reshape(-1)
            valid = y >= 0
            n_bytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)  # ignored targets index 0 safely
            total_nats += (losses.reshape(-1).double() * (n_bytes > 0)).sum()
            total_bytes += n_bytes.sum()
    finally:
        model.train(was_training)
    n_bytes = total_bytes.item()
    return total_nats.item() / (math.log(2) * n_bytes) if n_bytes else float("nan")


def val_batches(shards: TokenShards, rows: int, seq_len: int, tokens: int,
                device: str | torch.device = "cpu") -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches every time: the split packed in order, `tokens` worth (at least one batch,
    at most one pass over the split)."""
    loader = PackedLoader(shards, shuffle=False, device=device)
    per_batch = rows * seq_len
    steps = max(1, min(tokens, loader.tokens_per_epoch) // per_batch)
    return (loader.next_batch(rows, seq_len) for _ in range(steps))


def unigram_bpb(shards: TokenShards, token_bytes: np.ndarray) -> float:
    """Entropy of the split's token frequencies, in bits per byte: what a model that ignores context scores
    at best (special tokens excluded, as in evaluate_bpb). A trained model must come in well below it."""
    counts = np.zeros(len(token_bytes), dtype=np.int64)
    for tokens in shards.shards:
        counts += np.bincount(tokens, minlength=len(token_bytes))[:len(token_bytes)]
    counts[token_bytes == 0] = 0
    p = counts[counts > 0] / counts.sum()
    bits_per_token = -(p * np.log2(p)).sum()
    bytes_per_token = (counts * token_bytes).sum() / counts.sum()
    return float(bits_per_token / bytes_per_token)
