"""The GPT: counts against hand formulas, attention kernels against a dense reference, init, training."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from daychat.model import accounting
from daychat.model.gpt import GPT, GPTConfig, causal_attention, sliding_window_block_mask, sliding_window_dense_mask
from daychat.optim import build_optimizers

# flex_attention outside torch.compile (the CPU test path) warns that it is unfused; that is the point here
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.usefixtures("one_thread")]  # see conftest.one_thread

def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=64, sequence_len=32, depth=2, aspect_ratio=32, head_dim=16)
    return GPTConfig(**{**base, **kw})


def build(cfg: GPTConfig, seed: int = 0) -> GPT:
    model = GPT(cfg)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def hand_params(V, L, C, D, kv, ve=True, lambdas=True):
    """Written out independently of the library: V is the padded vocab, C = H*D."""
    H = C // D
    per_layer = C * H * D + 2 * C * kv * D + H * D * C + 8 * C * C
    ve_layers = [i for i in range(L) if i % 2 == (L - 1) % 2] if ve else []
    matrix = L * per_layer + len(ve_layers) * min(12, C) * kv  # the value-embedding gates read 12 channels
    embedding = V * C + len(ve_layers) * V * kv * D
    scalar = (2 * L if lambdas else 0) + min(24, C) + 1 + 1  # lambdas, smear gate + smear lambda, backout lambda
    return dict(matrix=matrix, embedding=embedding, lm_head=V * C, scalar=scalar,
                total=matrix + embedding + V * C + scalar)


@pytest.mark.parametrize("depth,aspect,head_dim,n_kv,vocab,ve,lambdas", [
    (2, 32, 16, None, 64, True, True),
    (3, 32, 16, 1, 100, True, True),  # MQA; 100 pads to 128; odd depth: value embeds on layers 0, 2
    (4, 44, 32, 2, 64, False, False),  # 176 rounds up to 192 = 6 heads of 32
    (5, 64, 64, None, 50, True, True),
    (12, 64, 128, None, 32768, True, True),  # d12, d20 as in the recipe, on the meta device
    (20, 64, 128, 5, 32768, True, True),
])
def test_param_counts_match_hand_formula(depth, aspect, head_dim, n_kv, vocab, ve, lambdas):
    cfg = GPTConfig(vocab_size=vocab, depth=depth, aspect_ratio=aspect, head_dim=head_dim, n_kv_head=n_kv,
                    value_embeds=ve, resid_lambdas=lambdas)
    C = math.ceil(depth * aspect / head_dim) * head_dim
    assert cfg.model_dim == C and cfg.n_head == C // head_dim
    V = math.ceil(vocab / 64) * 64
    expected = hand_params(V, depth, C, head_dim, n_kv or C // head_dim, ve, lambdas)
    with torch.device("meta"):
        model = GPT(cfg)
    counts = model.num_params()
    for key, value in expected.items():
        assert counts[key] == value, key
    assert counts == accounting.param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth,pattern,window,seq,n_kv", [
    (2, "L", 1024, 64, None),
    (4, "SSL", 16, 64, 2),  # layers S S L L(last forced global)
    (6, "SL", 128, 64, None),  # window >= T: S layers cost a full T
    (12, "L", 1024, 2048, None),
    (20, "SSSL", 1024, 2048, None),
])
def test_flops_match_formula(depth, pattern, window, seq, n_kv):
    cfg = GPTConfig(vocab_size=32768, sequence_len=seq, depth=depth, head_dim=64, n_kv_head=n_kv,
                    window_pattern=pattern, short_window=window)
    with torch.device("meta"):
        model = GPT(cfg)
    H, D = cfg.n_head, cfg.head_dim
    chars = [pattern[i % len(pattern)] for i in range(depth)]
    chars[-1] = "L"
    attn = sum(12 * H * D * (min(window, seq) if c == "S" else seq) for c in chars)
    n = model.num_params()
    expected = 6 * (n["matrix"] + n["lm_head"]) + attn
    assert model.estimate_flops() == expected == accounting.flops_per_token(cfg)
    # a shorter curriculum T counts the shorter attention
    short = seq // 2
    attn_short = sum(12 * H * D * (min(window, short) if c == "S" else short) for c in chars)
    assert model.estimate_flops(short) == 6 * n["matmul"] + attn_short


def test_d12_numbers():
    """nanochat's d12 (model_dim 768, 6 heads of 128): the GPT-2-small shape."""
    cfg = GPTConfig(vocab_size=32768, depth=12)
    p = accounting.param_counts(cfg)
    assert (cfg.model_dim, cfg.n_head) == (768, 6)
    assert p["matrix"] == 12 * 12 * 768 ** 2 + 6 * 12 * 6  # + 6 value-embedding gates of 12 x 6
    assert p["wte"] == p["lm_head"] == 32768 * 768


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(vocab_size=64, depth=2, aspect_ratio=48, head_dim=16, n_kv_head=4)  # 6 heads, 4 kv heads
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(vocab_size=64, window_pattern="LG")
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(vocab_size=64, window_pattern="")
    with pytest.raises(ValueError, match="head_dim must be even"):
        GPTConfig(vocab_size=64, head_dim=15)
    with pytest.raises(ValueError, match="depth"):
        GPTConfig(vocab_size=64, depth=0)
    with pytest.raises(ValueError, match="softcap"):
        GPTConfig(vocab_size=64, softcap=-1.0)


def test_peak_table_and_mfu():
    assert accounting.peak_bf16_flops("NVIDIA GeForce RTX 4090") == pytest.approx(165.2e12)
    assert accounting.peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989e12)
    assert accounting.peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756.5e12)
    assert accounting.peak_bf16_flops("NVIDIA H200") == pytest.approx(989e12)
    assert accounting.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert accounting.peak_bf16_flops("NVIDIA GeForce RTX 3090") == pytest.approx(71e12)
    assert accounting.peak_bf16_flops("NVIDIA GeForce RTX 5090") == pytest.approx(209.5e12)
    assert accounting.peak_bf16_flops("Some Other GPU") is None
    assert accounting.mfu(1000.0, 1e9, 2e12) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------
# attention against a dense reference


def reference_attention(q, k, v, window=None):
    """softmax(q k^T / sqrt(D) + mask) v, with kv heads repeated for GQA, written out densely."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    T = q.size(2)
    i = torch.arange(T)
    allowed = i[:, None] >= i[None, :]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_attention_kernels_match_dense_reference(H, Hkv):
    torch.manual_seed(0)
    B, T, D, W = 2, 256, 16, 40  # T spans two 128-blocks, so the block mask has a skipped block
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    torch.testing.assert_close(causal_attention(q, k, v), reference_attention(q, k, v), atol=1e-5, rtol=1e-4)
    ref = reference_attention(q, k, v, W)
    dense = causal_attention(q, k, v, sliding_window_dense_mask(T, W, q.device))
    flex = causal_attention(q, k, v, sliding_window_block_mask(T, W, q.device))
    torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-4)


def test_block_mask_skips_blocks_outside_the_window():
    """The FlexAttention mask is block-sparse: with T=512, W=128 each query block touches <= 2 key blocks."""
    bm = sliding_window_block_mask(512, 128, torch.device("cpu"))
    touched = bm.kv_num_blocks + (bm.full_kv_num_blocks if bm.full_kv_num_blocks is not None else 0)
    assert touched.max().item() <= 2
    assert sliding_window_block_mask(512, 128, torch.device("cpu")) is bm  # built once, cached


def test_window_model_flex_equals_dense_and_gqa_runs():
    cfg = tiny(depth=3, n_kv_head=2, window_pattern="S", short_window=5)
    model = build(cfg)
    for p in model.parameters():  # make every block do something (zero-init projections would hide bugs)
        p.data.add_(0.02 * torch.randn_like(p))
    idx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():  # eager flex on CPU has no backward; on CUDA the compiled kernel has one
        model.window_kernel = "dense"
        dense = model(idx)
        model.window_kernel = "flex"
        flex = model(idx)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-4)


def test_window_limits_receptive_field():
    """One window layer (depth 2: S then the forced-global last layer) sees W tokens; with both layers
    windowed the receptive field would be wider, so check the S layer through its block output."""
    cfg = tiny(depth=2, window_pattern="S", short_window=4, value_embeds=False)
    assert cfg.layer_windows() == [4, None]
    model = build(cfg)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    attn = model.blocks[0].attn
    x = torch.randn(1, 16, cfg.model_dim)
    cos_sin = model.cos[:, :16], model.sin[:, :16]
    mask = sliding_window_dense_mask(16, 4, x.device)
    y = attn(x, None, cos_sin, mask)
    x2 = x.clone()
    x2[:, 3] += 1.0  # position 3 is visible to queries 3..6 only
    y2 = attn(x2, None, cos_sin, mask)
    changed = (y2 - y).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False] * 3 + [True] * 4 + [False] * 9


# ---------------------------------------------------------------------------------------------------------
# behaviour


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_causality(pattern):
    model = build(tiny(depth=3, window_pattern=pattern, short_window=6, n_kv_head=2))
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    idx = torch.randint(0, 64, (2, 24))
    logits = model(idx)
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 64
    logits2 = model(idx2)
    torch.testing.assert_close(logits2[:, :10], logits[:, :10])
    assert not torch.allclose(logits2[:, 10:], logits[:, 10:])


def test_softcap_bounds_logits():
    model = build(tiny(softcap=5.0))
    model.lm_head.weight.data.normal_(0, 10.0)
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.dtype == torch.float32 and logits.shape == (2, 16, 64)
    assert logits.abs().max() <= 5.0 and logits.abs().max() > 4.9
    model.config.softcap = 0.0  # off: the same weights give logits far outside the cap
    assert model(torch.randint(0, 64, (2, 16))).abs().max() > 10.0


@pytest.mark.parametrize("lambdas,init", [(False, "ramp"), (True, "flat"), (True, "ramp")])
def test_zero_init_projections_make_blocks_identity(lambdas, init):
    cfg = tiny(depth=3, resid_lambdas=lambdas, lambda_init=init)
    model = build(cfg)
    idx = torch.randint(0, 64, (2, 16))
    x0 = F.rms_norm(model.wte(idx), (cfg.model_dim,))  # smear_lambda = 0 at init: no smear yet
    # blocks are the identity, so the stream stays a multiple of x0: s <- resid_i s + x0_i before block i,
    # and backout subtracts 0.2 x the multiple after block depth // 2
    r = model.resid_lambdas.tolist() if lambdas else [1.0] * cfg.depth
    z = model.x0_lambdas.tolist() if lambdas else [0.0] * cfg.depth
    if init == "flat" and lambdas:
        assert r == [1.0] * 3 and z == pytest.approx([0.1] * 3)
    elif lambdas:  # nanochat's ramps: resid 1.15 -> 1.05, x0 0.20 -> 0.05
        assert r == pytest.approx([1.15, 1.10, 1.05]) and z == pytest.approx([0.20, 0.125, 0.05])
    s, mid = 1.0, None
    for i in range(cfg.depth):
        s = r[i] * s + z[i]
        mid = s if i == cfg.backout_layer else mid
    scale = s - 0.2 * mid
    torch.testing.assert_close(model._trunk(idx), scale * x0)
    logits = model(idx)
    expected = model.lm_head(F.rms_norm(scale * x0, (cfg.model_dim,)))
    torch.testing.assert_close(logits, cfg.softcap * torch.tanh(expected / cfg.softcap))
    # the initial loss is ~ln(V): lm_head is near zero
    assert abs(model(idx, idx).item() - math.log(64)) < 0.05


def test_smear_mixes_in_the_previous_token_only_and_backout_subtracts_the_middle():
    model = build(tiny(depth=4))
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model._embed(idx, None), F.rms_norm(model.wte(idx), (model.config.model_dim,)))  # lambda 0
        model.smear_lambda.fill_(1.0)
        base = model._embed(idx, None)
        other = idx.clone()
        other[:, 5] = (other[:, 5] + 1) % 64  # change one token: its own position and the next one move, nothing else
        moved = (model._embed(other, None) - base).abs().sum(dim=(0, 2)) > 0
    assert moved.nonzero().flatten().tolist() == [5, 6]
    # backout: x_final = x_L - backout_lambda * x_(after block depth // 2); lambda 0 removes it
    with torch.no_grad():
        with_backout = model._trunk(idx)
        model.backout_lambda.zero_()
        assert not torch.allclose(model._trunk(idx), with_backout)
        off = build(tiny(depth=4, smear=False, backout=False))
    assert off.smear_gate is None and off.backout_lambda is None
    assert len(list(off.parameters())) == len(list(model.parameters())) - 3


def test_bf16_embeddings_keep_an_fp32_residual_stream():
    model = build(tiny(embedding_dtype="bf16"))
    assert model.wte.weight.dtype == torch.bfloat16
    assert all(ve.weight.dtype == torch.bfloat16 for ve in model.value_embeds.values())
    assert model.lm_head.weight.dtype == model.blocks[0].attn.c_q.weight.dtype == torch.float32
    idx = torch.randint(0, 64, (2, 16))
    assert model._trunk(idx).dtype == torch.float32
    loss = model(idx, idx)
    loss.backward()
    assert model.wte.weight.grad.dtype == torch.bfloat16 and torch.isfinite(loss)


def test_loss_reductions_and_ignore_index():
    model = build(tiny())
    idx = torch.randint(0, 64, (2, 16))
    tgt = torch.randint(0, 64, (2, 16))
    tgt[0, :5] = -1
    per_token = model(idx, tgt, loss_reduction="none")
    assert per_token.shape == (2, 16)
    assert (per_token[0, :5] == 0).all()
    valid = tgt != -1
    torch.testing.assert_close(model(idx, tgt), per_token[valid].mean())
    torch.testing.assert_close(model(idx, tgt, loss_reduction="sum"), per_token.sum())
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, tgt, loss_reduction="avg")
    # past sequence_len (as the reference's CORE prompts go) up to the rotary table's 10x, not beyond
    assert model(torch.randint(0, 64, (1, 33))).shape == (1, 33, 64)
    with pytest.raises(ValueError, match="rotary table"):
        model(torch.randint(0, 64, (1, model.max_positions + 1)))


def test_deterministic_init_and_meta_construction():
    cfg = tiny(n_kv_head=2)
    a, b, c = build(cfg, seed=123), build(cfg, seed=123), build(cfg, seed=124)
    assert not torch.equal(a.blocks[0].attn.c_q.weight, c.blocks[0].attn.c_q.weight)
    with torch.device("meta"):
        m = GPT(cfg)
    m.to_empty(device="cpu")
    torch.manual_seed(123)
    m.init_weights()
    for other in (b, m):  # same draws in the same order, however the module was constructed
        for (name, pa), po in zip(a.state_dict().items(), other.state_dict().values()):
            assert torch.equal(pa, po), name
        assert torch.equal(other.cos, a.cos) and torch.equal(other.sin, a.sin)  # buffers rebuilt after to_empty
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(m(idx), a(idx), rtol=0, atol=0)


def test_param_groups_partition_parameters():
    model = build(tiny(depth=3, n_kv_head=1))
    groups = model.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in groups["matrix"])
    assert groups["lm_head"] == [model.lm_head.weight]
    assert model.wte.weight in groups["embedding"] and len(groups["embedding"]) == 1 + 2  # layers 0, 2
    assert any(p is model.smear_gate.weight for p in groups["scalar"])  # a 24 -> 1 gate: AdamW, not Muon
    assert all(p.ndim == 1 for p in groups["scalar"] if p is not model.smear_gate.weight)


def test_bf16_autocast_cpu_keeps_logits_fp32():
    model = build(tiny(n_kv_head=2, window_pattern="SL", short_window=8))
    idx = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        loss = model(idx, idx)
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = tiny(n_kv_head=2, window_pattern="SL", short_window=16)
    model = build(cfg)
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5,
                                  weight_decay=0.0)
    batch = torch.randint(0, 64, (4, 33))
    idx, tgt = batch[:, :-1], batch[:, 1:]
    first = None
    for _ in range(60):
        loss = model(idx, tgt)
        first = loss.item() if first is None else first
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert first > 3.5 and loss.item() < 0.1, (first, loss.item())


def test_import_does_not_initialise_cuda():
    code = ("import torch, daychat.model, daychat.model.accounting, daychat.optim\n"
            "from daychat.model import GPT, GPTConfig\n"
            "m = GPT(GPTConfig(vocab_size=64, sequence_len=16, depth=2, aspect_ratio=32, head_dim=16,"
            " window_pattern='SL', short_window=4)); m.init_weights(); m(torch.zeros(1, 16, dtype=torch.long))\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_evaluation_never_takes_the_recompiling_flex_kernel():
    """Training on CUDA uses FlexAttention for window layers; evaluation (no grad: CORE, chat_eval,
    generation, whose batch shapes change at every call) takes the dense-mask SDPA path, so a compiled
    flex kernel is never recompiled per shape. The CPU always takes the dense path."""
    from daychat.model.gpt import window_kernel_for

    assert window_kernel_for("auto", "cuda", grad_enabled=True) == "flex"
    assert window_kernel_for("auto", "cuda", grad_enabled=False) == "dense"
    assert window_kernel_for("auto", "cpu", grad_enabled=True) == "dense"
    assert window_kernel_for("flex", "cpu", grad_enabled=False) == "flex"  # an explicit choice is kept


def test_masked_attention_with_gqa_equals_repeated_heads():
    """The explicit-mask path (window layers in evaluation, a KV-cache prefill) with grouped kv heads gives
    what SDPA gives with the kv heads repeated (on CUDA it repeats them itself, to keep the memory-efficient
    kernel)."""
    from daychat.model.gpt import masked_attention, sliding_window_dense_mask

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    mask = sliding_window_dense_mask(16, 5, torch.device("cpu"))
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(masked_attention(q, k, v, mask), expected)


def test_head_and_hidden_are_the_forward_split_in_two():
    """forward = head(hidden(ids)), in training (grad) and in evaluation (no grad: the softcap in place),
    bit for bit; head_columns equals head's columns."""
    model = build(tiny())
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.c_proj.weight.normal_(0, 0.02)
    idx = torch.randint(0, 64, (2, 16))
    logits = model(idx)
    assert torch.equal(model.head(model.hidden(idx)), logits)
    with torch.no_grad():
        assert torch.equal(model.head(model.hidden(idx)), logits)
        cols = torch.tensor([3, 7, 11])
        h = model.hidden(idx)[:, -1]
        torch.testing.assert_close(model.head_columns(h, cols), model.head(h)[:, cols])
