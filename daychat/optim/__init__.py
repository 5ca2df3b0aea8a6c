"""Optimizers for the GPT: Muon for the 2-D block matrices, AdamW for embeddings, lm_head and scalars.

`build_optimizers` follows nanochat's `GPT.setup_optimizer` (nanochat/gpt.py):
- Muon for the "matrix" group: momentum 0.95 (Nesterov), 5 Polar-Express steps, NorMuon beta2 0.95, and the
  recipe's weight_decay as cautious weight decay. The matrices' LR is not width-scaled: Muon's update has a
  fixed spectral size whatever the width (its shape scale is inside Muon).
- AdamW for "lm_head" (unembedding_lr), "embedding" (embedding_lr; token and value embeddings alike), with
  both LRs multiplied by (model_dim / 768) ** -0.5, since nanochat tuned them at width 768 and scales them
  as 1/sqrt(width) for other widths (muP-like). betas adam_betas (nanochat: (0.8, 0.95)), eps 1e-10, and no
  weight decay on any AdamW group (nanochat).
- "scalar" per-layer lambdas (AdamW, not width-scaled): resid_lambdas at scalar_lr * 0.01, x0_lambdas at
  scalar_lr with betas (0.96, 0.95) (nanochat).
Every param group stores `initial_lr` and `initial_weight_decay`; a schedule sets lr = initial_lr * multiplier
(`set_lr_multiplier`), and likewise for weight decay (`set_weight_decay_multiplier`).
nanochat's defaults for reference: matrix 0.02, embedding 0.3, unembedding 0.004, scalar 0.5, wd 0.2.
"""

from __future__ import annotations

import torch

from daychat.optim.muon import Muon, orthogonalize

__all__ = ["Muon", "orthogonalize", "build_optimizers", "set_lr_multiplier", "set_muon_momentum",
           "set_weight_decay_multiplier"]


def build_optimizers(model, *, matrix_lr: float, embedding_lr: float, unembedding_lr: float, scalar_lr: float,
                     weight_decay: float, adam_betas: tuple[float, float] = (0.8, 0.95)) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] for a daychat GPT (anything with param_groups() and config.model_dim)."""
    groups = model.param_groups()
    dmodel_scale = (model.config.model_dim / 768) ** -0.5
    resid = getattr(model, "resid_lambdas", None)
    x0 = getattr(model, "x0_lambdas", None)

    adam_groups = [
        dict(name="lm_head", params=groups["lm_head"], lr=unembedding_lr * dmodel_scale),
        dict(name="embedding", params=groups["embedding"], lr=embedding_lr * dmodel_scale),
    ]
    for p in groups["scalar"]:
        if p is resid:
            adam_groups.append(dict(name="resid_lambdas", params=[p], lr=scalar_lr * 0.01))
        elif p is x0:  # a slower-moving average for the embedding skip (nanochat)
            adam_groups.append(dict(name="x0_lambdas", params=[p], lr=scalar_lr, betas=(0.96, 0.95)))
        else:
            adam_groups.append(dict(name="scalar", params=[p], lr=scalar_lr))
    adam_params = [p for g in adam_groups for p in g["params"]]
    # the fused kernel is CUDA-only; elsewhere let torch pick (foreach)
    fused = True if adam_params and all(p.is_cuda for p in adam_params) else None
    adamw = torch.optim.AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=0.0, fused=fused)

    muon = Muon([dict(name="matrix", params=groups["matrix"])], lr=matrix_lr, momentum=0.95, nesterov=True,
                ns_steps=5, weight_decay=weight_decay, beta2=0.95)

    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
            group["initial_weight_decay"] = group["weight_decay"]
    return optimizers


def set_lr_multiplier(optimizers, mult: float) -> None:
    """lr = initial_lr * mult for every param group (warmup / warmdown schedules)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult


def set_muon_momentum(optimizers, momentum: float) -> None:
    """Set Muon's momentum (nanochat warms it from 0.85 to 0.95 over the first 300 steps)."""
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = momentum


def set_weight_decay_multiplier(optimizers, mult: float) -> None:
    """weight_decay = initial_weight_decay * mult (nanochat ramps Muon's weight decay down to 0 over training)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["weight_decay"] = group["initial_weight_decay"] * mult
