"""Pretraining batches: documents packed best-fit into rows, read from token shards, nothing thrown away.

Every row of a batch holds `seq_len + 1` tokens (inputs are row[:-1], targets row[1:]); there is no
padding, every position is trained on. The buffer holds `buffer_docs` pieces: a piece is a document from
some offset on (offset 0: from its <|bos|>). A row is filled best-fit (nanochat's BOS-aligned best-fit
loader, dev/LOG.md 2026-01-13, with its crop replaced by a continuation):

1. a row that is still empty takes the longest piece if it is longer than a whole row, so a long
   document fills rows of its own and each of its rows sees as much of it as a row can;
2. otherwise it takes the LARGEST piece that fits in the space left, whole;
3. when none fits, the LONGEST piece is cut to fill the row exactly (a document longer than a row is cut
   anyway; short documents stay whole, <|bos|> and all).

A cut piece is not dropped (nanochat drops it: ~35% of the tokens at T=2048 on FineWeb-Edu, and ~56% of
the demo's): its tail goes back into the buffer as a new piece and continues in a later row, without a
<|bos|> (one only starts a document) and with one token of overlap: the row's last token is only a
target, so the continuation starts with it as an input and every token of a document is a target once.
Where a continuation does not start a row, the target at its first token is -1 (ignored by the loss):
that token was already a target, and here it would be predicted from another document. A continued piece
cannot see the part of its document before the cut; `continued_fraction` counts the tokens placed that
way. `crop_fraction` (tokens read but never trained on / tokens read) is 0 by
construction and kept as the check that it stays so.

A document is read once per epoch, so no token is trained on twice within an epoch; when the shards run
out, the next epoch starts over in a new order (a permutation seeded by (seed, epoch): the same on every
run), and `epoch` counts them.

The whole position (epoch, cursor, the buffered documents, counters) is `state_dict()`: a checkpoint
holds it and `load_state_dict` makes the loader produce exactly the batches it would have produced.

On CUDA a batch goes through pinned (page-locked) host memory and is copied to the device with
`non_blocking=True`, so the copy overlaps the GPU's work on the previous step (daychat.data.staging).
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from daychat.data.staging import PinnedStaging
from daychat.data.tokens import TokenShards
from daychat.errors import UserError

STATE_FORMAT = "daychat.loader/2"  # /2: pieces (doc, offset) in the buffer


class PackedLoader:
    """Best-fit packed batches of (inputs, targets), each (rows, seq_len) int64 on `device`.

    `next_batch(rows, seq_len)` takes the shape per call, so a sequence-length curriculum changes it as
    training goes without losing the loader's place in the data.
    """

    def __init__(self, shards: TokenShards, *, seed: int = 0, shuffle: bool = True, buffer_docs: int = 1000,
                 device: str | torch.device = "cpu"):
        self.shards = shards
        self.seed = seed
        self.shuffle = shuffle
        self.buffer_docs = max(1, buffer_docs)
        self.device = torch.device(device)
        # One entry per document of the split, all shards back to back: which shard, where its BOS is,
        # how many tokens (BOS included). ~20 bytes a document: ~90 MB for 4.4B FineWeb tokens (~4.4M docs).
        shard_ids, starts, lengths = [], [], []
        for i, (tokens, doc_starts) in enumerate(zip(shards.shards, shards.doc_starts)):
            doc_starts = np.asarray(doc_starts, dtype=np.int64)
            shard_ids.append(np.full(len(doc_starts), i, dtype=np.int32))
            starts.append(doc_starts)
            lengths.append(np.diff(np.append(doc_starts, len(tokens))))
        self._shard = np.concatenate(shard_ids)
        self._start = np.concatenate(starts)
        self._length = np.concatenate(lengths)
        self.n_docs = len(self._length)
        if self.n_docs == 0:
            raise UserError(f"{shards.folder} holds no documents in this split; rerun the pretokenize stage")
        self.tokens_per_epoch = int(self._length.sum())
        self._reset()
        self._staging = PinnedStaging(self.device)  # pinned, overlapped copies on CUDA

    def _reset(self) -> None:
        self.epoch = 0  # epochs completed before the current one
        self._cursor = 0  # next position in this epoch's order
        self._order = self._epoch_order(0)
        # The buffer: (length, -arrival, doc, offset) sorted, so bisect finds "the largest that fits" and,
        # among equal lengths, the piece that has waited longest. length = tokens from offset to the end.
        self._buffer: list[tuple[int, int, int, int]] = []
        self._arrivals = 0
        self.tokens_used = 0  # placed into rows
        self.tokens_cropped = 0  # read from the shards and never placed (0: cut tails continue)
        self.tokens_continued = 0  # placed as part of a continued piece (no <|bos|> of theirs in the row)
        self.rows = 0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_docs)
        # RandomState, not default_rng: its streams are frozen across NumPy versions, so a checkpoint
        # resumes on the same order after an upgrade.
        return np.random.RandomState([self.seed, epoch]).permutation(self.n_docs)

    # ------------------------------------------------------------------------------------------------
    # Packing

    def _fill_buffer(self) -> None:
        while len(self._buffer) < self.buffer_docs:
            if self._cursor == self.n_docs:  # the shards ran out: the next epoch, in its own order
                if self._buffer:  # once this epoch's pieces are placed: a split of fewer documents than
                    return        # the buffer holds must not come in twice (rows of copies of one document)
                self.epoch += 1
                self._cursor = 0
                self._order = self._epoch_order(self.epoch)
            doc = int(self._order[self._cursor])
            self._cursor += 1
            self._push(int(self._length[doc]), doc, 0)

    def _push(self, length: int, doc: int, offset: int) -> None:
        bisect.insort(self._buffer, (length, -self._arrivals, doc, offset))
        self._arrivals += 1

    def _take(self, capacity: int, pos: int) -> tuple[int, int, int]:
        """Choose the next piece for a row with `capacity - pos` free: (doc, offset, tokens to place). A cut
        piece's tail goes back into the buffer, overlapping it by one token."""
        self._fill_buffer()
        remaining = capacity - pos
        i = bisect.bisect_right(self._buffer, (remaining, math.inf)) - 1
        if i < 0 or (pos == 0 and self._buffer[-1][0] > capacity):
            # 3. nothing fits, or 1. an empty row and a piece longer than a row: cut the longest
            length, _, doc, offset = self._buffer.pop()
            self._push(length - remaining + 1, doc, offset + remaining - 1)
            return doc, offset, remaining
        length, _, doc, offset = self._buffer.pop(i)  # 2. the largest piece that fits, whole
        return doc, offset, length

    def pack(self, rows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The next (rows, seq_len + 1) int64 array of packed documents (host memory), and a bool array of
        the same shape, True where a token must not be a target (a continuation's first token mid-row)."""
        capacity = seq_len + 1
        out = np.empty((rows, capacity), dtype=np.int64)
        no_target = np.zeros((rows, capacity), dtype=bool)
        for r in range(rows):
            pos = 0
            while pos < capacity:
                doc, offset, n = self._take(capacity, pos)
                start = self._start[doc] + offset
                out[r, pos:pos + n] = self.shards.shards[self._shard[doc]][start:start + n]
                if offset:
                    self.tokens_continued += n
                    no_target[r, pos] = pos > 0
                pos += n
        self.tokens_used += rows * capacity
        self.rows += rows
        return out, no_target

    def next_batch(self, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (rows, seq_len) int64 on the loader's device; ignored targets are -1."""
        packed, no_target = self.pack(rows, seq_len)
        return self._staging.to_device(packed[:, :-1], np.where(no_target[:, 1:], -1, packed[:, 1:]))

    # ------------------------------------------------------------------------------------------------
    # Measurements and state

    @property
    def crop_fraction(self) -> float:
        """Tokens read from the shards and never trained on / tokens read, so far (0 with continuation)."""
        read = self.tokens_used + self.tokens_cropped
        return self.tokens_cropped / read if read else 0.0

    @property
    def continued_fraction(self) -> float:
        """Tokens placed as part of a continued piece (cut from their document's start) / tokens placed."""
        return self.tokens_continued / self.tokens_used if self.tokens_used else 0.0

    @property
    def epochs(self) -> float:
        """How far reading has gone, in passes over the split (1.5 = half-way through the second)."""
        return self.epoch + self._cursor / self.n_docs

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "n_docs": self.n_docs,
            "tokens_per_epoch": self.tokens_per_epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "cursor": self._cursor,
            "buffer": [[-neg_arrival, doc, offset] for _, neg_arrival, doc, offset in self._buffer],
            "arrivals": self._arrivals,
            "tokens_used": self.tokens_used,
            "tokens_cropped": self.tokens_cropped,
            "tokens_continued": self.tokens_continued,
            "rows": self.rows,
        }

    def load_state_dict(self, state: dict) -> None:
        same_data = (state.get("format"), state.get("n_docs"), state.get("tokens_per_epoch")) == (
            STATE_FORMAT, self.n_docs, self.tokens_per_epoch)
        if not same_data or (state["seed"], state["shuffle"]) != (self.seed, self.shuffle):
            raise UserError(f"the loader state in this checkpoint was saved for other data or another seed "
                            f"({state.get('n_docs')} docs, seed {state.get('seed')}; now {self.n_docs} docs in "
                            f"{self.shards.folder}, seed {self.seed}); start a fresh run")
        self.epoch = state["epoch"]
        self._cursor = state["cursor"]
        self._order = self._epoch_order(self.epoch)
        self._buffer = sorted((int(self._length[doc]) - offset, -arrival, doc, offset)
                              for arrival, doc, offset in state["buffer"])
        self._arrivals = state["arrivals"]
        self.tokens_used = state["tokens_used"]
        self.tokens_cropped = state["tokens_cropped"]
        self.tokens_continued = state["tokens_continued"]
        self.rows = state["rows"]
