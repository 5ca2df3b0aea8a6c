"""Memory-bounded scoring: per-token losses, argmax predictions and chosen logit columns of a model, without
ever holding the fp32 logits of a whole batch.

Everything that scores text (CORE and its in-training proxy, val bits-per-byte, chat_eval, the SFT
validation loss, generation) goes through here or through the model's `hidden`/`head` pair directly:

    h = model.hidden(ids)                   # (B, T, C): the trunk, run once for the batch
    logits = model.head(h[chunk])           # (n, V) fp32 softcapped, n <= chunk_rows positions at a time

Why: the plain forward returns (B, T, V) fp32 logits, and cross-entropy then adds its log-softmax, about
3 x B x T x V x 4 bytes alive at once: 25 GB for 32 rows of 2,048 tokens at a 32k vocab (measured +6.1 GiB
for 8 x 2048), more than a 24 GB card has beside the model. Here the head's buffers are bounded by
`chunk_rows` x V (daychat.plan.memory.head_bytes_per_row prices them) whatever the batch, and a task that
needs only some positions (a continuation's span, the answer position) pays for only those. The trunk's own
transient memory grows with the batch's tokens, so callers size batches by a token budget
(daychat.plan.memory.scoring_batch_tokens), never by a count of items.

The results are the plain forward's: the same ops on the same rows (a smaller matmul may round its last
bit differently; tests compare on CPU).

A model is anything with `hidden(ids) -> (B, T, C)` and `head(h) -> (..., V)` (daychat's GPT), or a plain
callable `ids -> (B, T, V) logits` (test doubles, other models), which `as_scorer` wraps: its "hidden
states" are already the logits and its head is the identity.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

# Positions whose logits are alive at once when the caller does not say: 2,048 x 32k vocab x ~8 bytes
# (the fp32 logits and cross-entropy's log-softmax) = 0.5 GiB. Large enough that the lm_head matmul of a
# chunk keeps a GPU busy.
DEFAULT_CHUNK_ROWS = 2048


class Scorer(Protocol):
    def hidden(self, ids: torch.Tensor) -> torch.Tensor: ...

    def head(self, h: torch.Tensor) -> torch.Tensor: ...


class LogitsModel:
    """A callable `ids (B, T) -> logits (B, T, V)` as a Scorer: hidden = the logits, head = fp32 of them.
    It holds (B, T, V) by construction: for test doubles and small models only."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fn(ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return h.float()


def as_scorer(model: Any) -> Scorer:
    """A GPT (it has hidden and head) as it is; any other callable wrapped in LogitsModel."""
    if hasattr(model, "hidden") and hasattr(model, "head"):
        return model
    return LogitsModel(model)


@torch.no_grad()
def losses_at(model: Any, ids: torch.Tensor, targets: torch.Tensor, positions: tuple[torch.Tensor, torch.Tensor] | None = None,
              *, chunk_rows: int = DEFAULT_CHUNK_ROWS, predictions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy (nats, fp32) of `targets` at some positions of `ids`, and optionally the argmax there.

    ids, targets: (B, T) on the model's device; targets of -1 are ignored (loss 0, as F.cross_entropy).
    positions: (rows, cols) index tensors of the N positions wanted, or None for every position (N = B x T,
    row-major). Returns losses (N,) and argmax predictions (N,) int64 (or None), on the device.
    """
    scorer = as_scorer(model)
    h = scorer.hidden(ids)  # (B, T, C)
    if positions is None:
        h, t = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    else:
        rows, cols = positions
        h, t = h[rows, cols], targets[rows, cols]  # (N, C), (N,): a copy of the wanted rows only
    n = h.size(0)
    losses = torch.empty(n, dtype=torch.float32, device=h.device)
    preds = torch.empty(n, dtype=torch.long, device=h.device) if predictions else None
    for a in range(0, n, max(1, chunk_rows)):
        b = min(n, a + chunk_rows)
        logits = scorer.head(h[a:b])  # (b - a, V) fp32
        losses[a:b] = F.cross_entropy(logits, t[a:b], ignore_index=-1, reduction="none")
        if preds is not None:
            preds[a:b] = logits.argmax(dim=-1)
        del logits
    return losses, preds


@torch.no_grad()
def logits_at(model: Any, ids: torch.Tensor, positions: tuple[torch.Tensor, torch.Tensor],
              columns: torch.Tensor | None = None, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """fp32 logits (N, V) at N (row, col) positions of `ids`, or only their `columns` (N, K): letter
    scoring reads 4 columns of one position per prompt, so it never pays for the other ~32k."""
    scorer = as_scorer(model)
    rows, cols = positions
    h = scorer.hidden(ids)[rows, cols]  # (N, C)
    if columns is not None and hasattr(scorer, "head_columns"):
        return scorer.head_columns(h, columns)
    out = []
    for a in range(0, h.size(0), max(1, chunk_rows)):
        logits = scorer.head(h[a:a + chunk_rows])
        out.append(logits if columns is None else logits[:, columns])
    return torch.cat(out) if out else h.new_zeros((0, 0), dtype=torch.float32)

