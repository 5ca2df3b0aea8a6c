"""Optional training features: an EMA of the weights, FP8 block matmuls, data-parallel pretraining.

All on the CPU: the EMA's closed form and its place in the checkpoint; the FP8 linear's numerics against
fp32 (torch._scaled_mm runs on the CPU in this torch) and a tiny GPT trained with it; a 2-process gloo run
of the Trainer giving the single process's losses; the stage refusing what the machine cannot do.
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import yaml
from conftest import ROOT
from test_train import (
    Bigram,
    RandomBatches,
    markov_docs,
    sgd,
    tiny_gpt,
    write_token_dataset,
)

from daychat.data.loader import PackedLoader
from daychat.data.tokens import TokenShards
from daychat.model.fp8 import FP8Linear, convert_to_fp8
from daychat.optim import build_optimizers
from daychat.train.checkpoint import Checkpointer
from daychat.train.ema import EMA, decay_for
from daychat.train.loop import CheckpointPolicy, LoopSettings, Trainer
from daychat.train.schedule import Horizon, Schedule, plan_batch

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# EMA


def test_ema_after_k_steps_is_the_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    w0 = model.weight.detach().clone()
    decay = decay_for(halflife_tokens=1000, total_batch=250)  # 4 steps per half-life
    assert decay == pytest.approx(0.5 ** 0.25)
    ema = EMA(model, decay)
    weights = [torch.full((2, 3), float(i)) + 0.1 * i * w0 for i in range(1, 8)]  # a known sequence w_1..w_7
    for w in weights:
        with torch.no_grad():
            model.weight.copy_(w)
        ema.update()
    k = len(weights)
    expected = decay ** k * w0 + sum((1 - decay) * decay ** (k - i) * w for i, w in enumerate(weights, start=1))
    torch.testing.assert_close(ema.shadow[0], expected, rtol=1e-6, atol=1e-6)
    assert ema.updates == k

    raw = model.weight.detach().clone()
    with ema.applied():
        torch.testing.assert_close(model.weight.detach(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.weight.detach(), raw) and model.weight.requires_grad  # bit-exact back


def test_resume_continues_the_same_ema(tmp_path):
    def trainer(folder, ema_on=True):
        torch.manual_seed(0)
        model = Bigram()
        ema = EMA(model, 0.8) if ema_on else None
        return Trainer(model, sgd(model), RandomBatches(), Schedule(Horizon("tokens", tokens=16 * 12), curriculum=((0.0, 8),)),
                       plan_batch(16, 2, [8]), LoopSettings(),
                       checkpoints=CheckpointPolicy(Checkpointer(folder, keep=10), every_steps=4), ema=ema)

    whole = trainer(tmp_path / "whole")
    whole.run()
    saved = torch.load(tmp_path / "whole" / "step_000008.pt", weights_only=True)
    assert saved["ema"]["updates"] == 8 and "table.weight" in saved["ema"]["shadow"]

    (tmp_path / "cut").mkdir()  # a run killed after its step-8 checkpoint
    shutil.copy(tmp_path / "whole" / "step_000008.pt", tmp_path / "cut")
    resumed = trainer(tmp_path / "cut")
    assert resumed.resume() == 8
    resumed.run()
    assert torch.equal(resumed.ema.shadow[0], whole.ema.shadow[0]) and resumed.ema.updates == 12
    assert torch.equal(resumed.model.table.weight, whole.model.table.weight)
    assert not torch.equal(whole.ema.shadow[0], whole.model.table.weight)  # an average, not a copy

    with pytest.raises(Exception, match="holds no EMA"):  # a checkpoint without one does not fit an EMA run
        no_ema = trainer(tmp_path / "no_ema", ema_on=False)
        no_ema.run()
        trainer(tmp_path / "no_ema").resume()


# ----------------------------------------------------------------------------------------------------
# FP8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tokens", [64, 50])  # 50: the weight gradient's token dim is padded to 64
def test_fp8_linear_forward_and_backward_match_fp32_within_fp8_tolerance(tokens):
    torch.manual_seed(0)
    linear = nn.Linear(64, 256, bias=False)
    fp8 = FP8Linear.from_linear(linear)
    assert fp8.weight is linear.weight
    x = torch.randn(2, tokens // 2, 64, requires_grad=True)
    x8 = x.detach().clone().requires_grad_()
    y = linear(x)
    g = torch.randn_like(y)
    y.backward(g)
    dx, dw = x.grad, linear.weight.grad.clone()
    linear.weight.grad = None
    y8 = fp8(x8)
    y8.backward(g)
    # e4m3 keeps 3 mantissa bits (<= 6.25% per element), e5m2 2 bits: errors average out over a sum
    assert rel(y8, y) < 0.06
    assert rel(x8.grad, dx) < 0.1 and rel(linear.weight.grad, dw) < 0.1
    assert y8.dtype == x8.grad.dtype == linear.weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x8).dtype == torch.bfloat16  # bf16 out under autocast, like the plain linear


def test_fp8_backward_compiles_when_tokens_are_not_a_multiple_of_16(one_thread):
    """Under torch.compile the weight gradient's row padding used to fail ("Promotion for Float8 Types is
    not supported") whenever the token count was not a multiple of 16: the padding is now done on the bytes.
    The compiled backward gives the eager one's gradients."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=False)
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(2, 9, 32)  # 18 tokens
    grads = []
    for fn in (lambda t: fp8(t).square().sum(), torch.compile(lambda t: fp8(t).square().sum())):
        linear.weight.grad = None
        fn(x.clone().requires_grad_()).backward()
        grads.append(linear.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3)


def test_fp8_linears_evaluate_in_plain_precision():
    """No grad (val bpb, the CORE proxy, generation): the block linears run the ordinary matmul, so metrics
    measured during an FP8 run compare with core_eval's on the saved model."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 64, bias=False)
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(fp8(x), linear(x))
    assert not torch.equal(fp8(x), linear(x))  # with grad: the FP8 matmul (rounded)


def test_fp8_conversion_keeps_parameters_and_refuses_unaligned_shapes():
    model = tiny_gpt()
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert convert_to_fp8(model) == 2 * 6
    assert isinstance(model.blocks[0].mlp.c_fc, FP8Linear) and not isinstance(model.lm_head, FP8Linear)
    assert list(model.state_dict()) == keys
    assert all(p is before[name] for name, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"blocks.0.attn.c_k: .* multiples of 16 .* got 8 x 64"):
        from daychat.model import GPT, GPTConfig

        convert_to_fp8(GPT(GPTConfig(vocab_size=64, sequence_len=16, depth=2, aspect_ratio=32, head_dim=8, n_kv_head=1)))


def train_losses(folder, fp8: bool, steps: int = 12) -> list[float]:
    model = tiny_gpt(vocab=64, seq_len=32)
    if fp8:
        convert_to_fp8(model)
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5,
                                  weight_decay=0.0)
    loader = PackedLoader(TokenShards(folder, "train"), seed=0, buffer_docs=32)
    schedule = Schedule(Horizon("tokens", tokens=steps * 256), warmup_steps=2, curriculum=((0.0, 32),))
    state = Trainer(model, optimizers, loader, schedule, plan_batch(256, 8, [32])).run()
    return [row["train/loss"] for row in state.history if "train/loss" in row]


def test_a_tiny_gpt_trains_in_fp8_and_tracks_the_fp32_loss(tmp_path):
    folder = write_token_dataset(tmp_path, {"train": markov_docs(200, 63, seed=0)}, vocab_size=64, bos_id=63)
    exact, fp8 = train_losses(folder, False), train_losses(folder, True)
    worst = max(abs(a - b) for a, b in zip(exact, fp8))
    assert worst < 0.1, (exact, fp8)
    assert fp8[-1] < fp8[0] - 0.5  # it learns the chain


# ----------------------------------------------------------------------------------------------------
# Data parallel


DDP_SETUP = dict(vocab=128, steps=6, total_batch=512, device_batch=4, seq_len=((0.0, 16), (0.5, 32)))


def ddp_losses(folder, dist=None) -> list[float]:
    """Per-step losses of a tiny run (4 micro-batches a step) in one process, or as this rank of a group."""
    from daychat.train.distributed import ShardedBatches

    g = DDP_SETUP
    model = tiny_gpt(vocab=g["vocab"], seq_len=32)
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004,
                                  scalar_lr=0.5, weight_decay=0.1)
    loader = PackedLoader(TokenShards(folder, "train"), seed=0, buffer_docs=32)
    batches = loader if dist is None else ShardedBatches(loader, dist.rank, dist.world_size)
    schedule = Schedule(Horizon("tokens", tokens=g["steps"] * g["total_batch"]), warmup_steps=2,
                        curriculum=g["seq_len"])
    plan = plan_batch(g["total_batch"], g["device_batch"], [t for _, t in g["seq_len"]])
    state = Trainer(model, optimizers, batches, schedule, plan, dist=dist).run()
    return [row["train/loss"] for row in state.history if "train/loss" in row]


def _ddp_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    from daychat.train import distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist = distributed.init("cpu")
    try:
        losses = ddp_losses(folder, dist)
    finally:
        distributed.shutdown()
    torch.save(losses, f"{out}.{rank}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_single_process_losses(tmp_path):
    g = DDP_SETUP
    folder = write_token_dataset(tmp_path / "tokens", {"train": markov_docs(300, g["vocab"] - 1, seed=0)},
                                 vocab_size=g["vocab"], bos_id=g["vocab"] - 1)
    single = ddp_losses(folder)
    out = tmp_path / "losses"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(folder), str(out)), nprocs=2)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert ranks[0] == ranks[1]  # the loss is averaged over the ranks: every rank logs the same
    assert len(ranks[0]) == len(single) == g["steps"]
    worst = max(abs(a - b) for a, b in zip(ranks[0], single))
    assert worst <= 1e-5, (ranks[0], single)


# ----------------------------------------------------------------------------------------------------
# The stage refuses what the machine cannot do, in one line, before reading any data


def refused(tmp_path, **pretrain) -> str:
    params = yaml.safe_load((ROOT / "workflow" / "recipes" / "ci.yaml").read_text())
    params["pretrain"].update(pretrain)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "pretrain.py"), "--tokens", "none", "--tokenizer",
                             "none", "--out", "o", "--checkpoints", "c", "--live", "l", "--metrics", "m.json"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_stage_refuses_more_gpus_than_visible_and_fp8_without_fp8_cores(tmp_path):
    line = refused(tmp_path, gpus=2, device="auto", total_batch=4096)  # 2 micro-batches: one per GPU
    assert line.startswith("error: [pretrain] params.yaml: pretrain.gpus is 2 but 0 CUDA device(s) are visible")
    line = refused(tmp_path, fp8=True, device="cpu")
    assert "pretrain.fp8 is true but this device" in line and "set pretrain.fp8: false" in line


def test_gpus_must_split_the_micro_batches_of_a_step():
    from daychat.params import ParamsError, parse_section

    with pytest.raises(ParamsError, match=r"pretrain.gpus \(3\) must divide the micro-batches of a step: .* = 4;"):
        parse_section("pretrain", dict(gpus=3, total_batch=4096, device_batch=2, seq_len=[[0.0, 512]]))
    assert parse_section("pretrain", dict(gpus=4, total_batch=4096, device_batch=2, seq_len=[[0.0, 512]])).gpus == 4


def test_gradient_buckets_keep_order_and_size():
    from daychat.train.distributed import buckets

    ts = [torch.zeros(n) for n in (10, 20, 300, 5, 5)]
    groups = buckets(ts, max_bytes=4 * 40)  # 40 floats a bucket
    assert [[t.numel() for t in g] for g in groups] == [[10, 20], [300], [5, 5]]
    assert [t for g in groups for t in g] == ts  # the same tensors, in order
