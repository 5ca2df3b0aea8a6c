"""Pretraining: the packing loader, the schedule, batch arithmetic, gradient accumulation, the loop's
safety stops, checkpoints, a golden first-steps loss curve, and the pretrain stage end to end (including
a real SIGKILL and resume) on the ci recipe.

The golden curve lives in tests/assets/golden_pretrain_loss.json; after a deliberate change to the model,
the optimizers, the loader or the loop, regenerate it with

    PYTHONPATH=. .venv/bin/python tests/test_train.py --write-golden
"""

import json
import math
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from conftest import ROOT, run_stage
from daychat.data.loader import PackedLoader
from daychat.data.tokens import FORMAT, META, TokenShards
from daychat.errors import UserError
from daychat.io import write_json
from daychat.model import GPT, GPTConfig
from daychat.optim import build_optimizers
from daychat.params import ParamsError, parse_section
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import Checkpointer, load_model_folder
from daychat.train.evaluate import evaluate_bpb, unigram_bpb
from daychat.train.loop import (CheckpointPolicy, LoopSettings, Trainer, TrainingStopped, accumulate_gradients)
from daychat.train.schedule import Horizon, Schedule, plan_batch, schedule_from_params
from workflow import dag

GOLDEN = ROOT / "tests" / "assets" / "golden_pretrain_loss.json"


# ----------------------------------------------------------------------------------------------------
# Hermetic token datasets, written in the pretokenize stage's format


def write_token_dataset(folder: Path, splits: dict[str, list[np.ndarray]], vocab_size: int, bos_id: int,
                        dtype: str = "uint16") -> Path:
    """A token dataset of one shard per split; each document is written as <|bos|> + its tokens."""
    shards = []
    for i, (split, docs) in enumerate(splits.items()):
        stem = f"{split}/shard_{i:05d}"
        (folder / split).mkdir(parents=True, exist_ok=True)
        flat = np.concatenate([np.concatenate([[bos_id], doc]) for doc in docs]).astype(dtype)
        lengths = np.array([len(doc) + 1 for doc in docs], dtype=np.int64)
        flat.tofile(folder / f"{stem}.bin")
        np.save(folder / f"{stem}.idx.npy", np.cumsum(lengths) - lengths)
        shards.append({"file": f"{stem}.bin", "index": f"{stem}.idx.npy", "split": split, "tokens": len(flat),
                       "docs": len(docs), "text_bytes": 0, "source": "", "source_sha256": ""})
    write_json(folder / META, {"format": FORMAT, "dtype": dtype, "vocab_size": vocab_size, "bos_id": bos_id,
                               "tokenizer_sha256": "test", "shards": shards})
    return folder


def markov_docs(n: int, vocab: int, seed: int, max_len: int = 80) -> list[np.ndarray]:
    """Documents of a noisy deterministic chain (learnable), from RandomState: frozen across NumPy versions."""
    rng = np.random.RandomState(seed)
    docs = []
    for _ in range(n):
        length = rng.randint(1, max_len)
        doc = np.empty(length, dtype=np.int64)
        doc[0] = rng.randint(vocab)
        for j in range(1, length):
            doc[j] = (3 * doc[j - 1] + 1 + rng.randint(2)) % vocab
        docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def unique_tokens(tmp_path_factory) -> TokenShards:
    """Every token id says where it came from: doc * 1000 + position (1-based; 0 is the BOS)."""
    rng = np.random.RandomState(0)
    lengths = [1 + rng.randint(0, 60) if i % 7 else 150 for i in range(120)]  # every 7th longer than a row
    docs = [np.arange(1, n + 1) + 1000 * d for d, n in enumerate(lengths)]
    folder = write_token_dataset(tmp_path_factory.mktemp("unique"), {"train": docs}, vocab_size=200_000,
                                 bos_id=0, dtype="uint32")
    return TokenShards(folder, "train")


def doc_pieces(row: np.ndarray) -> list[tuple[int, int, int]]:
    """(doc, first position, last position) of each document piece in a row of unique tokens."""
    pieces = []
    bos = np.flatnonzero(row == 0).tolist() + [len(row)]
    for a, b in zip(bos[:-1], bos[1:]):
        body = row[a + 1:b]
        if len(body):
            pieces.append((int(body[0] // 1000), int(body[0] % 1000), int(body[-1] % 1000)))
    return pieces


# ----------------------------------------------------------------------------------------------------
# Loader


def test_loader_trains_every_token_of_a_document_once_and_bos_only_at_its_start(unique_tokens):
    loader = PackedLoader(unique_tokens, seed=1, buffer_docs=8)
    targets, batches = [], 0
    while True:
        x, y = loader.next_batch(4, 32)
        if loader.epoch > 0:  # this batch may hold documents of the next epoch
            break
        batches += 1
        assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
        assert y.min() >= -1 and torch.equal(x[:, 1:][y[:, :-1] >= 0], y[:, :-1][y[:, :-1] >= 0])
        rows = torch.cat([x, y[:, -1:].clamp(min=0)], dim=1).numpy()  # (4, 33): the packed rows
        for row, tgt in zip(rows, y.numpy()):
            bos = np.flatnonzero(row == 0)
            assert (row[bos[bos < 32] + 1] % 1000 == 1).all(), "a <|bos|> is followed by its document's first token"
            # inside a piece the ids go up by one; a new piece starts at a <|bos|> or continues a document,
            # and a continuation that does not start the row is not a target at its first token
            for b in np.flatnonzero(np.diff(row) != 1) + 1:
                assert row[b] == 0 or row[b - 1] == 0 or row[b] % 1000 > 1
                if row[b] != 0 and row[b - 1] != 0:
                    assert tgt[b - 1] == -1
        targets += y[y > 0].tolist()
    assert batches > 10 and loader.crop_fraction == 0 and 0 < loader.continued_fraction < 1
    assert len(targets) == len(set(targets)), "a token was trained on twice within the epoch"
    # every document pulled into the buffer and finished: each of its tokens was a target exactly once
    lengths = np.diff(np.append(unique_tokens.doc_starts[0], unique_tokens.tokens))
    state = loader.state_dict()
    unfinished = {doc for _, doc, _ in state["buffer"]}
    finished = [d for d in loader._epoch_order(0).tolist() if d not in unfinished][:50]
    expected = {d * 1000 + i for d in finished for i in range(1, lengths[d])}
    assert expected <= set(targets)


def test_loader_drops_nothing_and_counts_the_continued_tokens(unique_tokens):
    loader = PackedLoader(unique_tokens, seed=2, buffer_docs=8)
    for _ in range(10):  # ~1300 tokens: well inside the first epoch (~3800)
        loader.next_batch(4, 32)
    state = loader.state_dict()
    assert state["epoch"] == 0 and loader.tokens_used == 10 * 4 * 33
    assert loader.tokens_cropped == 0 and loader.crop_fraction == 0.0
    # documents of 150 tokens (every 7th) do not fit a row of 33: they continue over rows of their own
    assert 0.2 < loader.continued_fraction < 0.8
    lengths = np.diff(np.append(unique_tokens.doc_starts[0], unique_tokens.tokens))
    pulled = loader._epoch_order(0)[:state["cursor"]]
    left = sum(lengths[doc] - offset for _, doc, offset in state["buffer"])
    cuts = loader.tokens_used - (lengths[pulled].sum() - left)  # each cut repeats one token (as an input)
    assert 0 < cuts <= loader.rows
    assert 0 < loader.epochs < 1


def test_loader_state_round_trip_reproduces_the_next_batches(unique_tokens, tmp_path):
    a = PackedLoader(unique_tokens, seed=3, buffer_docs=16)
    shapes = [(4, 32), (8, 16), (2, 64)]  # a curriculum changes the shape as training goes
    for i in range(25):
        a.next_batch(*shapes[i % 3])
    torch.save(a.state_dict(), tmp_path / "state.pt")  # it must survive a checkpoint (weights_only load)
    expected = [a.next_batch(*shapes[i % 3]) for i in range(40)]  # crosses an epoch boundary
    assert a.epoch >= 1
    b = PackedLoader(unique_tokens, seed=3, buffer_docs=16)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for (x1, y1), i in zip(expected, range(40)):
        x2, y2 = b.next_batch(*shapes[i % 3])
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert (b.epochs, b.crop_fraction) == (a.epochs, a.crop_fraction)
    with pytest.raises(UserError, match="another seed"):
        PackedLoader(unique_tokens, seed=4).load_state_dict(a.state_dict())


def test_loader_epochs_are_counted_and_reproducible(unique_tokens):
    def first_docs(seed: int, epochs: int) -> list[int]:
        loader = PackedLoader(unique_tokens, seed=seed, buffer_docs=4)
        docs = []
        while loader.epoch < epochs:
            x, _ = loader.next_batch(2, 32)
            docs += [d for row in x.numpy() for d, _, _ in doc_pieces(np.append(row, 0))]
        assert loader.epochs >= epochs
        return docs

    assert first_docs(0, 3) == first_docs(0, 3)
    assert first_docs(0, 1) != first_docs(1, 1)


def test_a_split_smaller_than_the_buffer_is_read_once_per_epoch(unique_tokens):
    """Fewer documents than buffer_docs (a small val split, a held-out text of 59 books): the buffer takes
    the next epoch's documents only once this epoch's are placed. It used to fill up at once, so it held
    ~8 copies of every document here, and in order (val, held-out) a batch's rows were copies of the
    longest document's start: the filter ablation's held-out score read War and Peace four times over
    from its header instead of a Gutenberg shard's 59 books once."""
    loader = PackedLoader(unique_tokens, shuffle=False, buffer_docs=1000)
    batches = [loader.next_batch(4, 32) for _ in range(unique_tokens.tokens // (4 * 33))]  # within one pass
    targets = [t for _, y in batches for t in y[y > 0].tolist()]
    assert loader.epoch == 0 and len(targets) == len(set(targets)), "a token was a target twice in one pass"
    assert all(len({tuple(row) for row in x.tolist()}) == 4 for x, _ in batches), "rows that copy each other"
    while loader.epoch == 0:  # the next epoch begins once every piece of this one is placed
        loader.next_batch(4, 32)
    assert loader.tokens_used >= unique_tokens.tokens


def test_a_held_out_text_is_encoded_like_a_split_and_packed_by_the_same_loader(tmp_path):
    from daychat.data.tokens import encode_texts

    docs = ["the cat sat on the mat " * 20, "a dog ran to the red house " * 30, "rain in the hills " * 10]
    tok = Tokenizer.train(docs, vocab_size=300)
    (tmp_path / "eval").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "eval" / f"{i}.txt").write_text(doc)
    text = encode_texts(tmp_path / "eval", tok, "pretrain.eval_text")
    assert len(text.doc_starts[0]) == 3 and (text.shards[0][text.doc_starts[0]] == tok.bos_id).all()
    assert text.tokens == sum(len(tok.encode(d)) + 1 for d in docs) and len(text.sha256) == 64
    x, y = PackedLoader(text, shuffle=False).next_batch(2, 16)
    assert x.shape == (2, 16) and x[0, 0] == tok.bos_id
    with pytest.raises(UserError, match="pretrain.eval_text"):
        encode_texts(tmp_path / "missing", tok, "pretrain.eval_text")
    # a CRLF file (Project Gutenberg's) encodes as its LF copy: line endings are a convention, not content
    for name, newline in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.txt").write_bytes(newline.join(["the cat sat", "", "on the mat"]).encode())
    lf, crlf, cr = (encode_texts(tmp_path / name, tok, "pretrain.eval_text").shards[0] for name in ("lf", "crlf", "cr"))
    assert list(crlf) == list(lf) == list(cr) and tok.encode("\r")[0] not in list(lf)


# ----------------------------------------------------------------------------------------------------
# Schedule and batch arithmetic


def pretrain_params(**values):
    return parse_section("pretrain", values)


def test_lr_shape_and_curriculum_follow_the_params():
    p = pretrain_params(horizon="tokens", tokens=1000, total_batch=64, device_batch=2,
                        seq_len=[[0.0, 8], [0.25, 16], [0.75, 32]], warmup_steps=4, warmdown_frac=0.4,
                        final_lr_frac=0.1)
    s = schedule_from_params(p, scaling_params=123)
    assert s.horizon == Horizon("tokens", tokens=1000)
    assert [s.lr_multiplier(0.0, step) for step in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert s.lr_multiplier(0.6, 100) == 1.0  # constant until the warmdown
    assert s.lr_multiplier(0.8, 100) == pytest.approx(0.5 * 1.0 + 0.5 * 0.1)  # half-way down
    assert s.lr_multiplier(1.0, 100) == pytest.approx(0.1)
    assert [s.seq_len(f) for f in (0.0, 0.2, 0.25, 0.5, 0.75, 0.99)] == [8, 8, 16, 16, 32, 32]
    ratio = schedule_from_params(pretrain_params(horizon="ratio", tokens_per_param=20.0), scaling_params=1000)
    assert ratio.horizon == Horizon("tokens", tokens=20_000)
    plan = plan_batch(64, 2, [8, 16, 32])  # 2 rows of 32 = 64 tokens a micro-batch at every length
    assert [(plan.rows(t), plan.accum_steps(t)) for t in (8, 16, 32)] == [(8, 1), (4, 1), (2, 1)]
    assert plan_batch(512, 2, [8, 32]).accum_steps(8) == 8


def test_muon_momentum_warms_up_then_comes_down_in_the_warmdown():
    """nanochat's get_muon_momentum: 0.85 -> 0.97 over 400 steps, 0.97 -> 0.90 over the warmdown."""
    p = pretrain_params(horizon="tokens", tokens=10_000, total_batch=64, device_batch=2, seq_len=[[0.0, 32]],
                        warmdown_frac=0.65)
    s = schedule_from_params(p, scaling_params=1)
    assert s.momentum == (0.85, 0.97, 0.90) and s.momentum_warmup_steps == 400
    assert s.muon_momentum(0, 0.0) == 0.85 and s.muon_momentum(200, 0.1) == pytest.approx(0.91)
    assert s.muon_momentum(400, 0.2) == s.muon_momentum(900, 0.35) == 0.97
    assert s.muon_momentum(900, 0.35 + 0.65 / 2) == pytest.approx(0.935) and s.muon_momentum(900, 1.0) == pytest.approx(0.90)
    assert s.muon_momentum(100, 0.9) == pytest.approx(0.88)  # inside the warmup, the warmup wins (as nanochat)
    old = schedule_from_params(pretrain_params(muon_momentum=[0.85, 0.95, 0.95], muon_momentum_warmup_steps=300),
                               scaling_params=1)
    assert old.muon_momentum(150, 0.5) == pytest.approx(0.90) and old.muon_momentum(300, 0.99) == 0.95
    with pytest.raises(UserError, match="muon_momentum"):
        pretrain_params(muon_momentum=[0.85, 0.97])


def test_batch_arithmetic_refuses_a_total_that_does_not_split_in_one_line():
    with pytest.raises(ParamsError) as e:
        pretrain_params(total_batch=500_000, device_batch=16, seq_len=[[0.0, 512], [0.5, 2048]])
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("params.yaml: pretrain.total_batch (500,000 tokens) must be a multiple of "
                              "pretrain.device_batch x the longest pretrain.seq_len = 16 x 2048 = 32,768")
    assert "491,520 or 524,288" in message
    with pytest.raises(ParamsError, match=r"pretrain.seq_len lengths must each divide the longest \(2048\)"):
        pretrain_params(total_batch=524_288, seq_len=[[0.0, 768], [0.5, 2048]])
    with pytest.raises(ParamsError, match=r"pretrain.seq_len must list \[fraction, seq_len\] with fractions increasing"):
        pretrain_params(seq_len=[[0.5, 512], [0.0, 2048]])
    with pytest.raises(ParamsError, match="pretrain.tokens must be > 0 when pretrain.horizon is tokens"):
        pretrain_params(horizon="tokens")


class Bigram(nn.Module):
    """The smallest model the loop can train: next-token logits from the current token."""

    def __init__(self, vocab: int = 16, poison_at: int = 0, poison: float = float("nan")):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        self.calls, self.poison_at, self.poison = 0, poison_at, poison

    def forward(self, x, y=None, loss_reduction="mean"):
        logits = self.table(x).float()
        if y is None:
            return logits
        self.calls += 1
        loss = F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction=loss_reduction)
        return loss * self.poison if self.calls == self.poison_at else loss


class RandomBatches:
    """Random tokens; each micro-batch advances a fake clock by one second."""

    def __init__(self, clock: list[float] | None = None, vocab: int = 16):
        self.clock, self.vocab, self.n = clock, vocab, 0

    def next_batch(self, rows, seq_len):
        if self.clock is not None:
            self.clock[0] += 1.0
        self.n += 1
        g = torch.Generator().manual_seed(self.n)
        tokens = torch.randint(0, self.vocab, (rows, seq_len + 1), generator=g)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def sgd(model: nn.Module) -> list[torch.optim.Optimizer]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for group in opt.param_groups:
        group["initial_lr"], group["initial_weight_decay"] = group["lr"], group["weight_decay"]
    return [opt]


def test_wall_clock_schedule_warms_down_on_time_with_a_fake_clock():
    p = pretrain_params(horizon="time", budget_h=100 / 3600, total_batch=16, device_batch=1,
                        seq_len=[[0.0, 8], [0.5, 16]], warmup_steps=3, warmdown_frac=0.3, final_lr_frac=0.0)
    schedule = schedule_from_params(p, scaling_params=0)
    now = [0.0]
    model = Bigram()
    trainer = Trainer(model, sgd(model), RandomBatches(now), schedule, plan_batch(16, 1, [8, 16]),
                      LoopSettings(log_every=1), clock=lambda: now[0])
    state = trainer.run()
    rows = [row for row in state.history if "train/lrm" in row]
    assert state.step == 100 and now[0] == 100.0  # one micro-batch = one fake second: done at the budget
    for row in rows:
        before = (row["step"] - 1) / 100  # the progress the step was planned at: elapsed / budget
        assert row["train/seq_len"] == (8 if before < 0.5 else 16)
        assert row["train/lrm"] == pytest.approx(schedule.lr_multiplier(before, row["step"] - 1))
        assert row["progress"] == pytest.approx(row["step"] / 100)
    assert rows[0]["train/lrm"] == pytest.approx(1 / 3)  # warmup by steps
    assert rows[69]["train/lrm"] == 1.0 and rows[-1]["train/lrm"] == pytest.approx(1 / 30)  # down to 0 at 100%
    assert [r["step"] for r in rows if r["train/seq_len"] == 16][0] == 51


# ----------------------------------------------------------------------------------------------------
# The loop's arithmetic and safety


def tiny_gpt(vocab: int = 64, seq_len: int = 16, depth: int = 2) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, sequence_len=seq_len, depth=depth, aspect_ratio=32, head_dim=32))
    model.init_weights()
    return model


def test_grad_accumulation_of_micro_batches_equals_one_big_batch():
    model = tiny_gpt()
    with torch.no_grad():  # zero-initialised projections would leave most gradients exactly 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def grads(k: int) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        micro = iter(zip(x.chunk(k), y.chunk(k)))
        loss = accumulate_gradients(model, micro, k)
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss1, g1 = grads(1)
    for k in (2, 4, 8):
        loss_k, gk = grads(k)
        assert loss_k == pytest.approx(loss1, abs=1e-6)
        for a, b in zip(g1, gk):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("poison, message", [
    (float("nan"), r"training stopped at step 25: the train loss is nan; the last good checkpoint .*step_000024.pt is kept"),
    (float("inf"), r"training stopped at step 25: the train loss is inf"),
    (50.0, r"training stopped at step 25: the train loss spiked to .* over 3 x its smoothed value .* \(pretrain.loss_spike\)"),
])
def test_a_bad_loss_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(tmp_path, poison, message):
    model = Bigram(poison_at=25, poison=poison)
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    trainer = Trainer(model, sgd(model), RandomBatches(), Schedule(Horizon("tokens", tokens=16 * 40), curriculum=((0.0, 8),)),
                      plan_batch(16, 2, [8]), LoopSettings(loss_spike=3.0),
                      checkpoints=CheckpointPolicy(checkpointer, every_steps=4))
    with pytest.raises(TrainingStopped, match=message) as e:
        trainer.run()
    assert "\n" not in str(e.value)
    assert [p.name for p in checkpointer.all()] == ["step_000020.pt", "step_000024.pt"]


def test_checkpointer_keeps_the_last_k_and_ignores_unfinished_files(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=2)
    assert checkpointer.latest() is None and checkpointer.load() is None
    for step in (5, 10, 15):
        checkpointer.save(step, {"x": torch.tensor([step])})
    (tmp_path / ".step_000020.pt.123.tmp").write_bytes(b"half")  # a save that was killed
    assert [p.name for p in checkpointer.all()] == ["step_000010.pt", "step_000015.pt"]
    assert checkpointer.load()["x"].item() == 15
    (tmp_path / "step_000015.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="step_000015.pt is damaged .*delete that file to resume from the checkpoint before it"):
        checkpointer.load()


@pytest.mark.parametrize("error, says", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory while loading it"),
    (MemoryError(), "out of memory while loading it"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "the GPU failed while loading it"),
])
def test_resume_never_calls_a_checkpoint_damaged_for_an_error_that_is_not_the_files(tmp_path, monkeypatch, error, says):
    """An out-of-memory or a CUDA error while resuming is said as such, and nobody is told to delete a day of
    checkpoints for it; a file that loads but belongs to another model is 'does not match', not damaged."""
    model = tiny_gpt()
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    trainer = Trainer(model, sgd(model), RandomBatches(), Schedule(Horizon("tokens", tokens=64), curriculum=((0.0, 8),)),
                      plan_batch(16, 2, [8]), checkpoints=CheckpointPolicy(checkpointer))
    trainer.save()

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(UserError, match=says) as e:
        trainer.resume()
    assert "not damaged" in str(e.value) and "delete" not in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    other = tiny_gpt(depth=3)  # another model's run: same folder, other shapes
    stranger = Trainer(other, sgd(other), RandomBatches(), trainer.schedule, trainer.plan,
                       checkpoints=CheckpointPolicy(checkpointer))
    with pytest.raises(UserError, match=r"does not match this run .*it is not damaged.*move .*ckpt aside to start over"):
        stranger.resume()


def test_a_background_save_writes_the_state_of_the_call_and_surfaces_its_errors(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path / "ck", keep=2)
    w = torch.arange(6.0)
    state = {"model": {"w": w}, "loop": {"history": [{"step": 1}]}, "rng": {"torch": torch.get_rng_state()}}
    path = checkpointer.save_async(1, state)
    w.add_(100.0)  # training goes on while the thread writes
    state["loop"]["history"].append({"step": 2})
    checkpointer.wait()
    assert checkpointer.latest() == path
    loaded = checkpointer.load(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0)) and loaded["loop"]["history"] == [{"step": 1}]
    assert loaded["step"] == 1 and torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])

    def broken(step, state):
        raise OSError("disk full")

    monkeypatch.setattr(checkpointer, "save", broken)
    checkpointer.save_async(2, state)
    with pytest.raises(UserError, match="writing a checkpoint .* failed .*disk full"):
        checkpointer.wait()
    checkpointer.wait()  # reported once
    assert checkpointer.latest() == path


def test_bits_per_byte_leaves_out_special_and_ignored_tokens():
    model = tiny_gpt(vocab=64)
    token_bytes = torch.randint(1, 4, (64,), generator=torch.Generator().manual_seed(1))
    token_bytes[60:] = 0  # special tokens
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    y[0, :3] = -1
    y[1, :2] = 61
    with torch.no_grad():
        losses = model(x, y.clamp(min=0), loss_reduction="none")
    counted = (y >= 0) & (token_bytes[y.clamp(min=0)] > 0)
    expected = losses[counted].sum().item() / (math.log(2) * token_bytes[y[counted]].sum().item())
    assert evaluate_bpb(model, [(x, y)], token_bytes) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Golden first-steps loss curve


GOLDEN_SETUP = dict(vocab=128, depth=2, steps=12, total_batch=512, device_batch=8, seq_len=((0.0, 16), (0.5, 32)))


def golden_losses(folder: Path) -> list[float]:
    """Per-step train losses of a fixed tiny run: GPT + Muon/AdamW + packing loader + loop, fp32 on CPU."""
    g = GOLDEN_SETUP
    dataset = write_token_dataset(folder, {"train": markov_docs(300, g["vocab"] - 1, seed=0)},
                                  vocab_size=g["vocab"], bos_id=g["vocab"] - 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order, whatever the machine
    try:
        model = tiny_gpt(vocab=g["vocab"], seq_len=32, depth=g["depth"])
        optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008,
                                      scalar_lr=0.5, weight_decay=0.1)
        loader = PackedLoader(TokenShards(dataset, "train"), seed=0, buffer_docs=32)
        schedule = Schedule(Horizon("tokens", tokens=g["steps"] * g["total_batch"]), warmup_steps=2,
                            warmdown_frac=0.65, final_lr_frac=0.1, curriculum=g["seq_len"])
        plan = plan_batch(g["total_batch"], g["device_batch"], [t for _, t in g["seq_len"]])
        state = Trainer(model, optimizers, loader, schedule, plan, LoopSettings(log_every=1)).run()
    finally:
        torch.set_num_threads(threads)
    return [row["train/loss"] for row in state.history if "train/loss" in row]


def test_golden_first_steps_loss_curve(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    losses = golden_losses(tmp_path)
    assert len(losses) == len(golden["losses"]) == GOLDEN_SETUP["steps"]
    worst = max(abs(a - b) for a, b in zip(losses, golden["losses"]))
    assert worst <= 1e-4, (f"the loss curve moved by {worst:.2e} (model, optimizers, loader or loop changed?); if "
                           f"intended, regenerate: {golden['command']}\nnow:    {losses}\ngolden: {golden['losses']}")
    assert losses[-1] < losses[0] - 0.5  # and it is a curve that learns


# ----------------------------------------------------------------------------------------------------
# The stage end to end, on a ci workspace built by the real stages


PRETRAIN = ["--tokens", "data/tokens", "--tokenizer", "models/tokenizer", "--out", "models/base",
            "--checkpoints", ".cache/pretrain", "--live", "reports/pretrain", "--metrics", "reports/metrics/pretrain.json"]


def pretrain_cmd(**paths: str) -> list[str]:
    """The pretrain stage's command line (dvc.yaml's once it is declared there), with some paths replaced."""
    stages = {s.name: s for s in dag.load_stages(ROOT)}
    args = shlex.split(stages["pretrain"].cmd)[2:] if "pretrain" in stages else list(PRETRAIN)
    for key, value in paths.items():
        args[args.index(f"--{key}") + 1] = value
    return [sys.executable, str(ROOT / "stages" / "pretrain.py"), *args]


@pytest.fixture(scope="module")
def ci_workspace(tmp_path_factory) -> Path:
    """The ci recipe's tokens and tokenizer, made by the stages upstream of pretrain with dvc.yaml's commands."""
    ws = tmp_path_factory.mktemp("ci")
    (ws / "params.yaml").write_text((ROOT / "workflow" / "recipes" / "ci.yaml").read_text())
    stages = dag.load_stages(ROOT)
    needed = {"data/tokens", "models/tokenizer"}
    upstream = []
    for stage in reversed(stages):  # dvc.yaml lists stages in pipeline order: walk it back from the inputs
        if set(stage.outs) & needed:
            upstream.insert(0, stage)
            needed |= set(stage.deps)
    for stage in upstream:
        cmd = shlex.split(stage.cmd)
        assert cmd[:2] == ["python", f"stages/{stage.name}.py"]
        result = run_stage(stage.name, cmd[2:], ws)
        assert result.returncode == 0, result.stderr[-2000:]
    return ws


@pytest.fixture(scope="module")
def pretrained(ci_workspace) -> Path:
    # With the CORE proxy on (2 items per task of the real bundle): it must not change what is trained.
    params = yaml.safe_load((ci_workspace / "params.yaml").read_text())
    # and a held-out text beside the val split (pretrain.eval_text): two documents no run trained on
    heldout = ci_workspace / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "The river rose in the night, and by morning the lower fields were under water.",
        "A function returns a value; a procedure changes the state of the program.")))
    params["pretrain"].update(core_source="local", core_path=str(ROOT.parent / "shared/data/eval_bundle"),
                              core_max_per_task=2, core_every=1, eval_text=str(heldout))
    (ci_workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run(pretrain_cmd(), cwd=ci_workspace, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return ci_workspace


def read_tsv(path: Path) -> dict[int, float]:
    lines = path.read_text().split("\n")[1:]
    return {int(step): float(value) for step, value in (line.split("\t") for line in lines if line)}


@pytest.mark.slow
def test_stage_writes_the_model_metrics_and_curves_and_beats_the_unigram_entropy(pretrained):
    ws = pretrained
    base = ws / "models" / "base"
    assert {p.name for p in base.iterdir()} == {"model.pt", "optimizer.pt", "config.json", "meta.json", "tokenizer"}
    meta = json.loads((base / "meta.json").read_text())
    assert meta["params"]["depth"] == yaml.safe_load((ws / "params.yaml").read_text())["pretrain"]["depth"]
    assert {"commit", "dirty"} <= set(meta["code"]) and meta["libraries"]["torch"] == torch.__version__
    metrics = json.loads((ws / "reports" / "metrics" / "pretrain.json").read_text())
    assert {"val_bpb", "train_loss", "tokens", "flops", "tok_per_s", "mfu", "peak_mem_gib", "steps", "wall_s",
            "crop_fraction", "continued_fraction", "epochs", "weight_decay"} <= set(metrics)
    assert metrics["crop_fraction"] == 0 and 0 <= metrics["continued_fraction"] < 1  # nothing read is dropped
    assert 0 < metrics["heldout_bpb"] < 20 and meta["data"]["eval_text_sha256"]  # pretrain.eval_text measured
    assert metrics["tokens"] == metrics["steps"] * meta["params"]["total_batch"] and metrics["flops"] > 0
    curves = ws / "reports" / "pretrain" / "plots" / "metrics"
    losses = read_tsv(curves / "train" / "loss.tsv")
    assert len(losses) == metrics["steps"] // meta["params"]["log_every"] and max(losses) == metrics["steps"]
    assert set(read_tsv(curves / "val" / "bpb.tsv")) >= {0, metrics["steps"]}
    proxy = read_tsv(curves / "core" / "proxy.tsv")  # the CORE proxy, at every evaluation
    assert set(proxy) == set(read_tsv(curves / "val" / "bpb.tsv")) and all(-1 <= v <= 1 for v in proxy.values())

    # Below the entropy of the training tokens' unigram distribution, and clearly below what any context-free
    # model can score on the validation text (its own unigram entropy).
    token_bytes = Tokenizer.load(base / "tokenizer").token_bytes()
    train_unigram = unigram_bpb(TokenShards(ws / "data" / "tokens", "train"), token_bytes)
    val_unigram = unigram_bpb(TokenShards(ws / "data" / "tokens", "val"), token_bytes)
    assert metrics["val_bpb"] < train_unigram and metrics["val_bpb"] < val_unigram - 0.3, (metrics, train_unigram, val_unigram)

    model, loaded_meta = load_model_folder(base)  # what daychat.sample and the later stages load
    assert loaded_meta["metrics"]["val_bpb"] == metrics["val_bpb"]
    sample = subprocess.run([sys.executable, "-m", "daychat.sample", "--model", str(base), "-p", "The", "-n", "8",
                             "--num-samples", "1"], capture_output=True, text=True, cwd=ROOT)
    assert sample.returncode == 0 and sample.stdout.startswith("--- sample 1\nThe"), sample.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_run_resumes_and_gives_the_same_losses(pretrained):
    ws = pretrained
    save_every = yaml.safe_load((ws / "params.yaml").read_text())["pretrain"]["save_every"]
    paths = dict(out="killed/base", checkpoints="killed/ckpt", live="killed/live", metrics="killed/metrics.json")
    run = subprocess.Popen(pretrain_cmd(**paths), cwd=ws, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((ws / "killed" / "ckpt").glob(f"*/step_{save_every:06d}.pt")):
        assert run.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL and not (ws / "killed" / "base").exists()

    result = subprocess.run(pretrain_cmd(**paths), cwd=ws, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming after step" in result.stdout
    for curve in ("train/loss.tsv", "val/bpb.tsv"):
        uninterrupted = read_tsv(ws / "reports" / "pretrain" / "plots" / "metrics" / curve)
        resumed = read_tsv(ws / "killed" / "live" / "plots" / "metrics" / curve)
        assert resumed.keys() == uninterrupted.keys()
        for step, value in uninterrupted.items():
            assert resumed[step] == pytest.approx(value, abs=1e-5), (curve, step)


# ----------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Regenerate the golden first-steps loss curve.")
    parser.add_argument("--write-golden", action="store_true", required=True)
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        losses = golden_losses(Path(tmp))
    write_json(GOLDEN, {"command": "PYTHONPATH=. .venv/bin/python tests/test_train.py --write-golden",
                        "setup": {k: list(map(list, v)) if k == "seq_len" else v for k, v in GOLDEN_SETUP.items()},
                        "torch": torch.__version__, "losses": losses})
    print(f"wrote {GOLDEN}: {losses}")
