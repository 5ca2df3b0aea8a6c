"""Optimizers for the GPT: Muon for the 2-D block matrices, AdamW for embeddings, lm_head and scalars.

`build_optimizers` follows nanochat's `GPT.setup_optimizer` (nanochat/gpt.py at 92d63d4, 2026-07); each
change since daychat's first version is a switch whose default is nanochat's current value:
- Muon for the "matrix" group: Nesterov momentum (scheduled: daychat.train.schedule), 5 Polar-Express
  steps, NorMuon beta2 `muon_beta2` (0.9; was 0.95), MuonEq row equilibration and Muon+ renormalisation
  (`muon_eq`, `muon_plus`), cautious weight decay (scheduled: cosine to 0 over the run). The matrices' LR
  is not width-scaled: Muon's update has a fixed spectral size whatever the width.
- AdamW (daychat.optim.adamw: fp32 arithmetic, so bf16 embeddings lose nothing to the update itself),
  eps 1e-10, the embedding and lm_head LRs x (model_dim / 768)^-0.5 (nanochat tuned them at width 768).
  `adam_groups: tuned` (nanochat today) gives each group its own betas and a small constant weight decay:
      lm_head        unembedding_lr            betas (0.8, 0.96)   wd 0.01
      wte            embedding_lr              betas (0.8, 0.995)  wd 0.001
      value embeds   embedding_lr x 0.5        betas (0.8, 0.995)  wd 0.01
      resid_lambdas  scalar_lr x 0.01          betas (0.8, 0.95)   wd 0.05
      x0_lambdas     scalar_lr                 betas (0.96, 0.95)  wd 0
      smear, backout 0.2 (nanochat's constant) betas (0.8, 0.95)   wd 0
  `adam_groups: shared` is daychat's first version: `adam_betas` for every group but x0 (0.96, 0.95), no
  weight decay, value embeddings at the full embedding LR.
- `lr_factor` multiplies every LR but the smear/backout constant (the batch rule, daychat.optim.transfer).
Every param group stores `initial_lr` and `initial_weight_decay`; a schedule sets lr = initial_lr * multiplier
(`set_lr_multiplier`), and Muon's weight decay likewise (`set_weight_decay_multiplier`; the AdamW groups'
decays are constant, as in nanochat).
nanochat's base values today: matrix 0.02, embedding 0.3, unembedding 0.008, scalar 0.5, weight decay 0.28.
"""

from __future__ import annotations

import torch

from daychat.optim.adamw import AdamW
from daychat.optim.muon import Muon, orthogonalize

__all__ = ["AdamW", "Muon", "orthogonalize", "build_optimizers", "set_lr_multiplier", "set_muon_momentum",
           "set_weight_decay_multiplier", "ADAM_GROUPS"]

ADAM_GROUPS = ("tuned", "shared")
SMEAR_LR = 0.2  # nanochat setup_optimizer: smear gate, smear and backout lambdas (not batch-scaled there)


def build_optimizers(model, *, matrix_lr: float, embedding_lr: float, unembedding_lr: float, scalar_lr: float,
                     weight_decay: float, adam_betas: tuple[float, float] = (0.8, 0.95), adam_groups: str = "tuned",
                     lr_factor: float = 1.0, muon_beta2: float | None = 0.9, muon_eq: bool = True,
                     muon_plus: bool = True) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] for a daychat GPT (anything with param_groups() and config.model_dim)."""
    if adam_groups not in ADAM_GROUPS:
        raise ValueError(f"adam_groups must be one of {ADAM_GROUPS}, got {adam_groups!r}")
    tuned = adam_groups == "tuned"
    groups = model.param_groups()
    width = (model.config.model_dim / 768) ** -0.5
    wte = model.wte.weight
    ident = {id(getattr(model, name, None)): name for name in ("resid_lambdas", "x0_lambdas", "smear_lambda",
                                                               "backout_lambda")}
    if getattr(model, "smear_gate", None) is not None:
        ident[id(model.smear_gate.weight)] = "smear_gate"

    def group(name, params, lr, betas, wd):
        return dict(name=name, params=params, lr=lr, betas=betas if tuned else adam_betas, weight_decay=wd if tuned else 0.0)

    emb_lr = embedding_lr * width * lr_factor
    adam_groups_ = [
        group("lm_head", groups["lm_head"], unembedding_lr * width * lr_factor, (0.8, 0.96), 0.01),
        group("wte", [wte], emb_lr, (0.8, 0.995), 0.001),
    ]
    value_embeds = [p for p in groups["embedding"] if p is not wte]
    if value_embeds:
        adam_groups_.append(group("value_embeds", value_embeds, emb_lr * (0.5 if tuned else 1.0), (0.8, 0.995), 0.01))
    gates = []
    for p in groups["scalar"]:
        name = ident.get(id(p), "scalar")
        if name == "resid_lambdas":
            adam_groups_.append(group(name, [p], scalar_lr * 0.01 * lr_factor, (0.8, 0.95), 0.05))
        elif name == "x0_lambdas":  # a slower-moving average for the embedding skip (nanochat, both modes)
            adam_groups_.append({**group(name, [p], scalar_lr * lr_factor, (0.96, 0.95), 0.0), "betas": (0.96, 0.95)})
        elif name in ("smear_gate", "smear_lambda", "backout_lambda"):
            gates.append(p)
        else:
            adam_groups_.append(group(name, [p], scalar_lr * lr_factor, (0.8, 0.95), 0.0))
    if gates:
        adam_groups_.append(group("smear_backout", gates, SMEAR_LR, (0.8, 0.95), 0.0))
    adamw = AdamW(adam_groups_, eps=1e-10)
    muon = Muon([dict(name="matrix", params=groups["matrix"])], lr=matrix_lr * lr_factor, momentum=0.95,
                nesterov=True, ns_steps=5, weight_decay=weight_decay, beta2=muon_beta2, eq=muon_eq, renorm=muon_plus)

    optimizers = [adamw, muon]
    for opt in optimizers:
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
            g["initial_weight_decay"] = g["weight_decay"]
    return optimizers


def set_lr_multiplier(optimizers, mult: float) -> None:
    """lr = initial_lr * mult for every param group (warmup / warmdown schedules)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult


def set_muon_momentum(optimizers, momentum: float) -> None:
    """Set Muon's momentum (the schedule: nanochat warms it 0.85 -> 0.97 and lowers it to 0.90 in the warmdown)."""
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = momentum


def set_weight_decay_multiplier(optimizers, mult: float) -> None:
    """Muon's weight_decay = initial_weight_decay * mult (nanochat: a cosine to 0 over the run). The AdamW
    groups keep their constant decays, as in nanochat."""
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["weight_decay"] = group["initial_weight_decay"] * mult
