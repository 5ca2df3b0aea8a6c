"""The SFT mixture (rendered conversations, a held-out split) and the packed batches the Trainer reads.

Mixture. Each source's rows are read, put in a seeded order and capped (`conversations`); the first
`val_fraction` of them are held out for the validation loss, the rest are the source's training
conversations, seen `epochs` times per pass (a fraction is a seeded subset). Every conversation is
rendered once (daychat.chat.format.render: token ids and the loss mask) into flat arrays, ~5 bytes a
token, so the real recipe's ~300M tokens fit in memory as numpy, not as Python lists. What cannot be
trained on is counted by reason and skipped, never fatal: the format's reasons (empty, role_order,
bad_part, no_assistant), bad_row (a row without its format's fields) and overlong (longer than a row
with `overlong: skip`, or, with `overlong: truncate`, cut so short that no trained token is left;
conversations cut but still trained on are counted as `truncated`).

Batches. A row holds seq_len + 1 tokens (inputs row[:-1], targets row[1:]) and WHOLE conversations, each
starting at its <|bos|>: from a buffer of conversations the packer takes the largest that fits in the
space left, until none does, and pads the rest (nanochat's SFT pads rather than cuts: a conversation
split across rows would train an answer without its question). Targets are the next token where its
mask is 1 and -1 elsewhere (user turns, tool outputs, padding, the next conversation's <|bos|>), which
the model's cross-entropy ignores. Every conversation keeps at least one trained target (its
<|assistant_end|> at least), so no row, and no micro-batch, is all ignored: the mean loss is never 0/0.
The loss is the mean over a micro-batch's trained targets (the Trainer's convention).

Data parallel (daychat.train.distributed.ShardedBatches): every rank packs the same micro-batches from
the same seed and trains on its share; each micro-batch is whole rows of whole conversations, so the
guarantee above holds for every rank's micro-batches.

The packer's position (epoch, cursor, buffered conversations, counters) is `state_dict()`: a checkpoint
holds it and a resumed run sees exactly the batches it would have seen. Each pass over the mixture has
its own seeded order.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from daychat.chat.format import ConversationError, render
from daychat.progress import progress
from daychat.data.staging import PinnedStaging
from daychat.errors import UserError
from daychat.eval.scoring import DEFAULT_CHUNK_ROWS, losses_at
from daychat.sft.sources import SourceSpec, conversations_of, read_rows

SKIP_REASONS = ("empty", "role_order", "bad_part", "no_assistant", "bad_row", "overlong")
STATE_FORMAT = "daychat.sft_batches/1"


class ConversationSet:
    """Rendered conversations as flat arrays: conversation i is ids[offsets[i]:offsets[i+1]] (int32) with
    its loss mask (uint8, 1 = trained on)."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray):
        self.ids, self.mask, self.offsets = ids, mask, offsets
        self.lengths = np.diff(offsets)

    @classmethod
    def from_rendered(cls, rendered: list[tuple[list[int], list[int]]]) -> "ConversationSet":
        lengths = [len(ids) for ids, _ in rendered]
        offsets = np.zeros(len(rendered) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for r, _ in rendered for t in r), dtype=np.int32, count=int(offsets[-1]))
        mask = np.fromiter((m for _, ms in rendered for m in ms), dtype=np.uint8, count=int(offsets[-1]))
        return cls(ids, mask, offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    def sha256(self) -> str:
        h = hashlib.sha256()
        for array in (self.offsets, self.ids, self.mask):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()


@dataclass
class Mixture:
    train: ConversationSet  # each training conversation once
    items: np.ndarray  # one pass over the mixture: indices into `train`, repeated per `epochs`, shuffled
    val: ConversationSet  # held-out conversations
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    truncated: int = 0
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def pass_tokens(self) -> int:
        """Conversation tokens in one pass (repeats counted)."""
        return int(self.train.lengths[self.items].sum()) if len(self.items) else 0

    def sha256(self) -> str:
        """Identifies the data a run trains and is evaluated on (part of the checkpoint fingerprint)."""
        h = hashlib.sha256()
        for part in (self.train.sha256(), self.val.sha256(), np.ascontiguousarray(self.items).tobytes()):
            h.update(part.encode() if isinstance(part, str) else part)
        return h.hexdigest()


def build_mixture(specs: list[SourceSpec], tokenizer, *, max_len: int, seed: int = 0, val_fraction: float = 0.0,
                  val_max: int = 0, overlong: str = "truncate", cache: str = ".cache/sft_data", retries: int = 5,
                  timeout_s: float = 60.0) -> Mixture:
    """Read, split, render and count every source (see the module docstring); `max_len` = tokens per row."""
    train, val, items = [], [], []
    mixture = Mixture(ConversationSet.from_rendered([]), np.zeros(0, np.int64), ConversationSet.from_rendered([]))
    for spec in specs:
        rows = read_rows(spec, cache, seed=seed, retries=retries, timeout_s=timeout_s)
        rng = random.Random(f"daychat-sft:{seed}:{spec.name}")
        order = list(range(len(rows)))
        rng.shuffle(order)
        if spec.conversations and spec.kind != "synthetic":
            order = order[:spec.conversations]
        n_val = round(len(order) * val_fraction)
        chosen = [rows[i] for i in order]
        del rows
        counts = {"read": len(chosen), "train": 0, "val": 0, "skipped": 0, "truncated": 0}
        source_train = []
        bar = progress(conversations_of(spec, chosen), total=len(chosen), desc=f"render {spec.name}", unit="conv")
        for position, conversation in enumerate(bar):
            rendered = _render(conversation, tokenizer, max_len, overlong, mixture, counts)
            if rendered is None:
                continue
            if position < n_val:
                val.append(rendered)
                counts["val"] += 1
            else:
                source_train.append(len(train))
                train.append(rendered)
                counts["train"] += 1
        bar.close()
        whole, frac = int(spec.epochs), spec.epochs - int(spec.epochs)
        items += source_train * whole + rng.sample(source_train, round(frac * len(source_train)))
        mixture.per_source[spec.name] = counts
    if val_max and len(val) > val_max:  # a seeded subset, in order: evaluation time stays bounded
        keep = sorted(random.Random(f"daychat-sft-val:{seed}").sample(range(len(val)), val_max))
        val = [val[i] for i in keep]
    random.Random(f"daychat-sft-items:{seed}").shuffle(items)
    mixture.train = ConversationSet.from_rendered(train)
    mixture.val = ConversationSet.from_rendered(val)
    mixture.items = np.asarray(items, dtype=np.int64)
    return mixture


def _render(conversation, tokenizer, max_len: int, overlong: str, mixture: Mixture,
            counts: dict) -> tuple[list[int], list[int]] | None:
    """(ids, mask) to train on, or None after counting why not."""
    try:
        if isinstance(conversation, ConversationError):
            raise conversation
        ids, mask = render(conversation, tokenizer)
    except ConversationError as e:
        mixture.skipped[e.reason] = mixture.skipped.get(e.reason, 0) + 1
        counts["skipped"] += 1
        return None
    if len(ids) > max_len:
        # With truncate, the conversation keeps its first max_len tokens; it is worth a row only if some
        # trained target is left (targets are positions 1.. of the row).
        if overlong == "skip" or not any(mask[1:max_len]):
            mixture.skipped["overlong"] += 1
            counts["skipped"] += 1
            return None
        ids, mask = ids[:max_len], mask[:max_len]
        mixture.truncated += 1
        counts["truncated"] += 1
    return ids, mask


class SftBatches:
    """Packed SFT batches of (inputs, targets), each (rows, seq_len) int64 on `device` (the Trainer's Batches).

    `finite=True` (evaluation): one pass in order, then rows of padding only, and `exhausted` is set.
    """

    def __init__(self, conversations: ConversationSet, items: np.ndarray | None = None, *, pad_id: int,
                 seed: int = 0, shuffle: bool = True, buffer: int = 256, finite: bool = False,
                 device: str | torch.device = "cpu"):
        self.conversations = conversations
        self.items = np.arange(len(conversations)) if items is None else np.asarray(items, dtype=np.int64)
        self.n = len(self.items)
        if self.n == 0:
            raise UserError("no conversations to train on: every SFT source was empty or skipped (see the counts "
                            "above; check sft.sources in params.yaml)")
        self._length = conversations.lengths[self.items]
        self.pad_id = pad_id
        self.seed, self.shuffle, self.finite = seed, shuffle, finite
        self.buffer_size = max(1, buffer)
        self.device = torch.device(device)
        self._staging = PinnedStaging(self.device)  # pinned, overlapped host-to-device copies on CUDA
        self._reset()

    def _reset(self) -> None:
        self.epoch = 0  # passes completed before the current one
        self._cursor = 0
        self._order = self._epoch_order(0)
        self._buffer: list[tuple[int, int, int]] = []  # (length, -arrival, item position), sorted
        self._arrivals = 0
        self.rows = 0  # rows produced
        self.placed = 0  # conversations placed into rows
        self.tokens = 0  # conversation tokens placed
        self.padding = 0  # padding tokens
        self.trained = 0  # targets trained on (mask 1)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        # RandomState: its streams are frozen across NumPy versions (a checkpoint resumes on the same order)
        return np.random.RandomState([self.seed, epoch]).permutation(self.n)

    def _fill_buffer(self) -> None:
        while len(self._buffer) < self.buffer_size:
            if self._cursor == self.n:
                if self.finite:
                    return
                self.epoch += 1
                self._cursor = 0
                self._order = self._epoch_order(self.epoch)
            position = int(self._order[self._cursor])
            self._cursor += 1
            bisect.insort(self._buffer, (int(self._length[position]), -self._arrivals, position))
            self._arrivals += 1

    @property
    def exhausted(self) -> bool:
        return self.finite and self._cursor == self.n and not self._buffer

    def _row(self, capacity: int) -> list[int]:
        """Item positions for the next row: the largest buffered conversation that fits, until none does."""
        chosen, used = [], 0
        while True:
            self._fill_buffer()
            i = bisect.bisect_right(self._buffer, (capacity - used, math.inf)) - 1
            if i < 0:
                break
            length, _, position = self._buffer.pop(i)
            chosen.append(position)
            used += length
        if not chosen and self._buffer:
            raise ValueError(f"a conversation of {self._buffer[0][0]} tokens does not fit a row of {capacity}: "
                             "build the mixture with max_len = seq_len + 1")
        return chosen

    def pack(self, rows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The next (rows, seq_len + 1) ids (int64, padded with pad_id) and mask (uint8) arrays."""
        capacity = seq_len + 1
        ids = np.full((rows, capacity), self.pad_id, dtype=np.int64)
        mask = np.zeros((rows, capacity), dtype=np.uint8)
        offsets = self.conversations.offsets
        for r in range(rows):
            pos = 0
            for position in self._row(capacity):
                conv = self.items[position]
                a, b = offsets[conv], offsets[conv + 1]
                ids[r, pos:pos + b - a] = self.conversations.ids[a:b]
                mask[r, pos:pos + b - a] = self.conversations.mask[a:b]
                pos += b - a
                self.placed += 1
                self.tokens += int(b - a)
            self.padding += int(capacity - pos)
        self.rows += rows
        # Counted here, not in next_batch: under data parallelism (ShardedBatches) every rank packs every
        # micro-batch, so the counters (and the checkpointed state) are the whole step's on every rank.
        self.trained += int(mask[:, 1:].sum())
        return ids, mask

    def next_batch(self, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (rows, seq_len) int64; targets -1 where not trained on."""
        ids, mask = self.pack(rows, seq_len)
        inputs = ids[:, :-1]
        targets = np.where(mask[:, 1:] == 1, ids[:, 1:], -1)
        if not (targets >= 0).any() and not self.finite:
            # Cannot happen by construction (every conversation has a trained target); a mean over zero
            # targets would be a NaN loss that stops the run, so say what went wrong instead.
            raise RuntimeError("an SFT micro-batch has no trained target; the mixture holds conversations "
                               "without assistant tokens")
        return self._staging.to_device(inputs, targets)  # pinned, overlapped copies on CUDA

    def rows_per_pass(self, seq_len: int) -> int:
        """Rows one pass over the items fills (a dry run of the packer on the lengths alone)."""
        dry = SftBatches(self.conversations, self.items, pad_id=self.pad_id, seed=self.seed, shuffle=self.shuffle,
                         buffer=self.buffer_size, finite=True)
        rows = 0
        while not dry.exhausted:
            dry._row(seq_len + 1)
            rows += 1
        return rows

    @property
    def epochs(self) -> float:
        """Passes over the mixture so far (placed conversations / conversations per pass)."""
        return self.placed / self.n

    @property
    def pad_fraction(self) -> float:
        total = self.tokens + self.padding
        return self.padding / total if total else 0.0

    def state_dict(self) -> dict:
        # Plain ints only: checkpoints load with weights_only=True, which refuses NumPy scalars.
        return {
            "format": STATE_FORMAT, "n": self.n, "tokens_per_pass": int(self._length.sum()),
            "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch, "cursor": self._cursor,
            "buffer": [[-int(neg_arrival), int(position)] for _, neg_arrival, position in self._buffer],
            "arrivals": self._arrivals,
            **{key: int(getattr(self, key)) for key in ("rows", "placed", "tokens", "padding", "trained")},
        }

    def load_state_dict(self, state: dict) -> None:
        same = (state.get("format"), state.get("n"), state.get("tokens_per_pass"), state.get("seed"),
                state.get("shuffle")) == (STATE_FORMAT, self.n, int(self._length.sum()), self.seed, self.shuffle)
        if not same:
            raise UserError(f"the SFT batch state in this checkpoint was saved for other data ({state.get('n')} "
                            f"conversations, seed {state.get('seed')}; now {self.n}, seed {self.seed}); start a fresh run")
        self.epoch, self._cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order(self.epoch)
        self._buffer = sorted((int(self._length[p]), -arrival, p) for arrival, p in state["buffer"])
        self._arrivals = state["arrivals"]
        for key in ("rows", "placed", "tokens", "padding", "trained"):
            setattr(self, key, state[key])


def val_batches(conversations: ConversationSet, rows: int, seq_len: int, pad_id: int,
                device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out conversations, each once, packed in order: the same batches at every evaluation."""
    if len(conversations) == 0:
        return
    batches = SftBatches(conversations, pad_id=pad_id, shuffle=False, buffer=64, finite=True, device=device)
    while not batches.exhausted:
        yield batches.next_batch(rows, seq_len)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches, autocast: Callable[[], contextlib.AbstractContextManager]
                  = contextlib.nullcontext, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
    """Mean cross-entropy (nats) over the trained targets of `batches`, memory-bounded as val bpb is
    (daychat.eval.scoring.losses_at), summed on the device: one host sync at the end, not one a batch."""
    was_training = model.training
    model.eval()
    total, count = None, None
    try:
        for x, y in batches:
            with autocast():
                losses, _ = losses_at(model, x, y, chunk_rows=chunk_rows)  # (B*T,), 0 where ignored
            batch_total, batch_count = losses.double().sum(), (y >= 0).sum()
            total = batch_total if total is None else total + batch_total
            count = batch_count if count is None else count + batch_count
    finally:
        model.train(was_training)
    if count is None or int(count) == 0:
        return float("nan")
    return float(total) / int(count)
