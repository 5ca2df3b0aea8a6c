"""Muon and the optimizer wiring: orthogonality, LR scaling, cautious weight decay, state round trip."""

import copy

import pytest
import torch

from daychat.model.gpt import GPT, GPTConfig
from daychat.optim import (Muon, build_optimizers, orthogonalize, set_lr_multiplier, set_muon_momentum,
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
    opt = Muon([w], lr=0.1, momentum=0.0, nesterov=False, beta2=None)
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
    opt = Muon([w], lr=1.0, momentum=0.0, nesterov=False, beta2=0.95)
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
    opt2 = Muon([w2], lr=0.1, weight_decay=1.0, momentum=0.0, nesterov=False, beta2=None)
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
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    seen = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    assert [id(p) for p in muon.param_groups[0]["params"]] == [id(p) for p in model.param_groups()["matrix"]]
    scale = (64 / 768) ** -0.5  # model_dim 64
    lr = {g["name"]: g["lr"] for g in adamw.param_groups}
    assert lr["lm_head"] == pytest.approx(0.004 * scale)
    assert lr["embedding"] == pytest.approx(0.3 * scale)
    assert lr["resid_lambdas"] == pytest.approx(0.5 * 0.01) and lr["x0_lambdas"] == pytest.approx(0.5)
    assert all(g["weight_decay"] == 0.0 for g in adamw.param_groups)
    assert muon.param_groups[0]["lr"] == 0.02 and muon.param_groups[0]["weight_decay"] == 0.1
    for opt in optimizers:
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]
    set_lr_multiplier(optimizers, 0.25)
    assert all(g["lr"] == pytest.approx(0.25 * g["initial_lr"]) for o in optimizers for g in o.param_groups)
    set_weight_decay_multiplier(optimizers, 0.5)
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.05)
    set_muon_momentum(optimizers, 0.85)
    assert muon.param_groups[0]["momentum"] == 0.85 and adamw.param_groups[0]["betas"] == (0.8, 0.95)


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
