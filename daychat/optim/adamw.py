"""AdamW with fp32 arithmetic whatever the parameters' dtype, for embeddings stored in bf16.

torch.optim.AdamW's foreach path computes in the parameter's dtype: with bf16 embeddings its moment
updates (1 - beta2 = 0.005 of the squared gradient) fall below bf16's resolution (2^-8 of the value) and
round away. Here every step upcasts the parameter, its gradient and both moments to fp32, does the
decoupled-decay AdamW update (Loshchilov & Hutter, arXiv:1711.05101), and writes the results back in
their storage dtype, as nanochat's `adamw_step_fused` does (nanochat/optim.py). fp32 parameters are
updated in place with no copies, so for them this is plain AdamW (tests/test_optim.py checks it against
torch.optim.AdamW).

The moments are stored like the parameter (bf16 for bf16 embeddings: half the memory, nanochat does the
same); what that loses is what the ablation measures (reports/ablate.md, `embedding_dtype`).
"""

from __future__ import annotations

import torch


class AdamW(torch.optim.Optimizer):
    """AdamW: per group lr, betas, eps, weight_decay (decoupled: p <- p (1 - lr wd) before the step)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: bad hyperparameters lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                exact = p.dtype == torch.float32  # fp32: in place; otherwise fp32 copies written back
                p32 = p if exact else p.float()
                m = state["exp_avg"] if exact else state["exp_avg"].float()
                v = state["exp_avg_sq"] if exact else state["exp_avg_sq"].float()
                g = p.grad.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.lerp_(g.square(), 1 - beta2)
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
                p32.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
                if not exact:
                    p.copy_(p32)
                    state["exp_avg"].copy_(m)
                    state["exp_avg_sq"].copy_(v)
        return loss
