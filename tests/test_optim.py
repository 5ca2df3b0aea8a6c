"""Muon and the optimizer wiring: orthogonality, LR scaling, cautious weight decay, state round trip."""

import copy

import pytest
import torch

from daychat.model.gpt import GPT, GPTConfig
from daychat.optim import (AdamW, Muon, build_optimizers, orthogonalize, set_lr_multiplier, set_muon_momentum,
                           set_weight_decay_multiplier)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

def conditioned(m: int, n: int, cond: float, batch: tuple = (), seed: int = 0):
    """A matrix U diag(s) V^T with known singular vectors and singular values log-spaced in [1/cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k)
    return U @ torch.diag_embed(s.expand(*batch, k)) @ V.mT, U, V


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (3, 48, 16)])
@pytest.mark.parametrize("method,band", [("polar_express", (0.8, 1.2)), ("newton_schulz", (0.6, 1.25))])
def test_orthogonalize_pushes_singular_values_to_one(shape, method, band):
    *batch, m, n = shape
    G, U, V = conditioned(m, n, cond=100.0, batch=tuple(batch))
    O = orthogonalize(G, steps=5, method=method)
    assert O.shape == G.shape and O.dtype == torch.float32  # fp32 on CPU
    D = U.mT @ O @ V  # in G's singular basis the result must be diagonal: same singular vectors
    diag = torch.diagonal(D, dim1=-2, dim2=-1)
    assert (D - torch.diag_embed(diag)).abs().max() < 1e-4
    sv = torch.linalg.svdvals(O)
    assert band[0] < sv.min() and sv.max() < band[1], (sv.min().item(), sv.max().item())


def test_orthogonalize_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        orthogonalize(torch.randn(4, 4), method="svd")


@pytest.mark.parametrize("rows,cols", [(32, 32), (128, 32), (32, 128)])
def test_muon_update_is_orthogonal_and_shape_scaled(rows, cols):
    """Without momentum, second moment and decay, one step moves W by lr * max(1, rows/cols)^0.5 * orth(G)."""
    G, _, _ = conditioned(rows, cols, cond=50.0, seed=1)
    w = torch.nn.Parameter(torch.randn(rows, cols))
    w0 = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.0, nesterov=False, beta2=None, eq=False, renorm=False)
    w.grad = G.clone()
    opt.step()
    scale = 0.1 * max(1.0, rows / cols) ** 0.5
    update = (w0 - w.detach()) / scale
    torch.testing.assert_close(update, orthogonalize(G), atol=1e-5, rtol=1e-5)
    sv = torch.linalg.svdvals(update)
    assert 0.8 < sv.min() and sv.max() < 1.2


def test_muon_normuon_keeps_update_norm():
    """NorMuon rescales rows but keeps the Frobenius norm of the orthogonalised update."""
    G, _, _ = conditioned(64, 32, cond=10.0, seed=2)
    w = torch.nn.Parameter(torch.zeros(64, 32))
    opt = Muon([w], lr=1.0, momentum=0.0, nesterov=False, beta2=0.95, eq=False, renorm=False)
    w.grad = G.clone()
    opt.step()
    expected = orthogonalize(G).norm() * 2 ** 0.5  # lr scale sqrt(64/32)
    torch.testing.assert_close(w.detach().norm(), expected, rtol=1e-4, atol=0)
    assert opt.state[w]["second_momentum"].shape == (64, 1)


def test_muon_cautious_weight_decay():
    """With a zero gradient the update is 0, every entry agrees in sign (0 * w >= 0): plain decay by lr*wd."""
    w = torch.nn.Parameter(torch.randn(16, 8))
    w0 = w.detach().clone()
    opt = Muon([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.zeros_like(w)
    opt.step()
    # the shape scale sqrt(16/8) multiplies the decay too (nanochat applies lr * scale to both terms)
    torch.testing.assert_close(w.detach(), w0 * (1 - 0.1 * 2 ** 0.5 * 0.5))
    # with a gradient, entries where the update opposes the weight are not decayed
    w2 = torch.nn.Parameter(torch.ones(8, 8))
    opt2 = Muon([w2], lr=0.1, weight_decay=1.0, momentum=0.0, nesterov=False, beta2=None, eq=False, renorm=False)
    g = torch.eye(8)
    g[0, 0] = -1.0  # orth(g) = g up to scale: entry (0, 0) pushes w up, against the decay
    w2.grad = g
    opt2.step()
    u = orthogonalize(g)
    decay_mask = (u * torch.ones(8, 8)) >= 0
    torch.testing.assert_close(w2.detach(), torch.ones(8, 8) - 0.1 * decay_mask - 0.1 * u)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def tiny_model() -> GPT:
    model = GPT(GPTConfig(vocab_size=64, sequence_len=16, depth=2, aspect_ratio=32, head_dim=16, n_kv_head=2))
    torch.manual_seed(0)
    model.init_weights()
    return model


def train_steps(model, optimizers, batches):
    for idx in batches:
        model(idx[:, :-1], idx[:, 1:]).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


LRS = dict(matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5, weight_decay=0.1)


def test_build_optimizers_groups_and_lrs():
    model = tiny_model()
    optimizers = build_optimizers(model, **LRS)
    adamw, muon = optimizers
    assert isinstance(adamw, AdamW) and isinstance(muon, Muon)
    seen = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    assert [id(p) for p in muon.param_groups[0]["params"]] == [id(p) for p in model.param_groups()["matrix"]]
    scale = (64 / 768) ** -0.5  # model_dim 64
    groups = {g["name"]: g for g in adamw.param_groups}
    lr = {name: g["lr"] for name, g in groups.items()}
    # nanochat's setup_optimizer (gpt.py at 92d63d4): per-group LRs, betas and constant weight decays
    assert lr["lm_head"] == pytest.approx(0.004 * scale) and groups["lm_head"]["betas"] == (0.8, 0.96)
    assert lr["wte"] == pytest.approx(0.3 * scale) and groups["wte"]["betas"] == (0.8, 0.995)
    assert lr["value_embeds"] == pytest.approx(0.5 * 0.3 * scale)
    assert lr["resid_lambdas"] == pytest.approx(0.5 * 0.01) and lr["x0_lambdas"] == pytest.approx(0.5)
    assert groups["x0_lambdas"]["betas"] == (0.96, 0.95) and lr["smear_backout"] == 0.2
    assert {n: g["weight_decay"] for n, g in groups.items()} == {
        "lm_head": 0.01, "wte": 0.001, "value_embeds": 0.01, "resid_lambdas": 0.05, "x0_lambdas": 0.0,
        "smear_backout": 0.0}
    m = muon.param_groups[0]
    assert (m["lr"], m["weight_decay"], m["beta2"], m["eq"], m["renorm"]) == (0.02, 0.1, 0.9, True, True)
    for opt in optimizers:
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]
    set_lr_multiplier(optimizers, 0.25)
    assert all(g["lr"] == pytest.approx(0.25 * g["initial_lr"]) for o in optimizers for g in o.param_groups)
    set_weight_decay_multiplier(optimizers, 0.5)  # Muon's only: the AdamW decays are constant (nanochat)
    assert m["weight_decay"] == pytest.approx(0.05) and groups["wte"]["weight_decay"] == 0.001
    set_muon_momentum(optimizers, 0.85)
    assert m["momentum"] == 0.85 and groups["lm_head"]["betas"] == (0.8, 0.96)
    # daychat's first version: shared betas, no AdamW decay, value embeddings at the full embedding LR;
    # the batch factor multiplies every LR but nanochat's constant 0.2 of smear and backout
    old = {g["name"]: g for g in build_optimizers(model, **LRS, adam_groups="shared", adam_betas=(0.7, 0.9),
                                                  lr_factor=0.5)[0].param_groups}
    assert all(g["weight_decay"] == 0.0 for g in old.values())
    assert old["lm_head"]["betas"] == (0.7, 0.9) and old["x0_lambdas"]["betas"] == (0.96, 0.95)
    assert old["value_embeds"]["lr"] == old["wte"]["lr"] == pytest.approx(0.5 * 0.3 * scale)
    assert old["smear_backout"]["lr"] == 0.2


def test_adamw_matches_torch_in_fp32_and_keeps_bf16_embeddings_close():
    torch.manual_seed(0)
    grads = [torch.randn(32, 16) for _ in range(5)]
    ref, ours, low = (torch.nn.Parameter(torch.randn(32, 16, generator=torch.Generator().manual_seed(1)))
                      for _ in range(3))
    low.data = low.data.bfloat16()
    kw = dict(lr=0.01, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01)
    opts = [torch.optim.AdamW([ref], **kw), AdamW([ours], **kw), AdamW([low], **kw)]
    for g in grads:
        for p, opt in zip((ref, ours, low), opts):
            p.grad = g.to(p.dtype)
            opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    # bf16 storage: fp32 arithmetic, results rounded to bf16 (2^-8 relative) once per step
    assert low.dtype == opts[2].state[low]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(low.detach().float(), ref.detach(), rtol=0.02, atol=0.02)
    assert opts[1].state[ours]["step"] == 5


def test_muon_eq_and_plus():
    """MuonEq equalises the row norms before orthogonalising; Muon+ snaps the result's Frobenius norm to
    sqrt(min(rows, cols)) (nanochat/optim.py muon_step_fused)."""
    G, _, _ = conditioned(48, 16, cond=20.0, seed=3)
    G = G * torch.linspace(0.1, 3.0, 48)[:, None]  # rows of very different norms
    w = torch.nn.Parameter(torch.zeros(48, 16))
    opt = Muon([w], lr=1.0, momentum=0.0, nesterov=False, beta2=None, eq=True, renorm=True)
    w.grad = G.clone()
    opt.step()
    update = -w.detach() / 3 ** 0.5  # shape scale sqrt(48/16)
    torch.testing.assert_close(update.norm(), torch.tensor(16 ** 0.5), rtol=1e-5, atol=0)
    eq = G * (G.norm() / 48 ** 0.5 / G.norm(dim=1, keepdim=True))
    expected = orthogonalize(eq)
    torch.testing.assert_close(update, expected * (16 ** 0.5 / expected.norm()), rtol=1e-4, atol=1e-5)
    plain = torch.nn.Parameter(torch.zeros(48, 16))
    opt = Muon([plain], lr=1.0, momentum=0.0, nesterov=False, beta2=None, eq=False, renorm=False)
    plain.grad = G.clone()
    opt.step()
    assert not torch.allclose(-plain.detach() / 3 ** 0.5, update, atol=1e-3)


def test_optimizer_state_round_trip_resumes_identically():
    """Saving both optimizers' state and loading it into fresh ones continues the run bit for bit."""
    torch.manual_seed(1)
    batches = [torch.randint(0, 64, (2, 17)) for _ in range(4)]
    model = tiny_model()
    optimizers = build_optimizers(model, **LRS)
    train_steps(model, optimizers, batches[:2])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
    train_steps(model, optimizers, batches[2:])

    resumed = tiny_model()
    resumed.load_state_dict(saved_model)
    resumed_opts = build_optimizers(resumed, **LRS)
    for opt, state in zip(resumed_opts, saved_opts):
        opt.load_state_dict(state)
    train_steps(resumed, resumed_opts, batches[2:])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_transfer_rule_reproduces_nanochat_at_its_reference_and_scales_weight_decay_with_the_horizon():
    from daychat.optim.transfer import B_REF, D_REF, transfer

    ref = transfer(total_batch=B_REF, model_dim=768, weight_decay=0.28, tokens=D_REF)
    assert (ref.lr_factor, ref.adam_width_factor, ref.weight_decay) == (1.0, 1.0, pytest.approx(0.28))
    # nanochat's own rule (exponent 0.5): lr x sqrt(B/B_ref), wd x sqrt(B/B_ref) x D_ref/D
    nano = transfer(total_batch=B_REF // 4, model_dim=1536, weight_decay=0.28, tokens=2 * D_REF, lr_batch_exponent=0.5)
    assert nano.lr_factor == pytest.approx(0.5) and nano.weight_decay == pytest.approx(0.28 * 0.5 / 2)
    assert nano.adam_width_factor == pytest.approx(2 ** -0.5)
    # daychat's (exponent 0): LRs do not move with the batch; lr x wd x steps is held, so wd x B/B_ref x D_ref/D
    ours = transfer(total_batch=B_REF // 4, model_dim=768, weight_decay=0.28, tokens=2 * D_REF)
    assert ours.lr_factor == 1.0 and ours.weight_decay == pytest.approx(0.28 / 4 / 2)
    steps = lambda t, b: t / b  # noqa: E731
    assert ours.weight_decay * steps(2 * D_REF, B_REF // 4) == pytest.approx(0.28 * steps(D_REF, B_REF))
    assert transfer(total_batch=4096, model_dim=128, weight_decay=0.28, tokens=10 ** 6, wd_rule="none").weight_decay == 0.28
    assert transfer(total_batch=4096, model_dim=128, weight_decay=0.28, tokens=0).weight_decay == 0.28  # unknown horizon
    assert "0.28 ->" in ours.describe() and "not scaled" in transfer(total_batch=1, model_dim=1, weight_decay=0.1,
                                                                    tokens=0).describe()
