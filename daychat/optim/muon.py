"""
Muon: MomentUm Orthogonalized by Newton-Schulz (Keller Jordan, https://kellerjordan.github.io/posts/muon/),
for the 2-D weight matrices of the transformer blocks. Embeddings, lm_head and scalars go to AdamW.

One step, per parameter W (rows x cols) with gradient G (nanochat nanochat/optim.py, modded-nanogpt):
1. Nesterov momentum: M <- beta M + (1 - beta) G; U = (1 - beta) G + beta M (U = M without Nesterov).
   MuonEq (`eq`, arXiv:2603.28254, nanochat since 2026-07): every row of U is rescaled to the RMS row norm
   of U, so the spectrum that enters the orthogonalisation is better conditioned.
2. Orthogonalise: U -> ~ U_s V_s^T (the polar factor of U = U_s S V_s^T), by 5 Polar-Express iterations
   (Amsel, Persson, Musco, Gower, arXiv:2505.16932; the coefficients nanochat uses, computed for 5 iterations,
   safety factor 2e-2, cushion 2) or the classic quintic Newton-Schulz (3.4445, -4.7750, 2.0315) of
   modded-nanogpt. Odd matrix polynomials keep the singular vectors and push every singular value towards 1;
   they run stably in bf16, which is what we use on CUDA (fp32 on CPU). Muon+ (`renorm`,
   arXiv:2602.21545, nanochat since 2026-07): the result is rescaled to Frobenius norm sqrt(min(rows,
   cols)), that of an exactly semi-orthogonal matrix, undoing the iteration's under-convergence.
3. NorMuon (arXiv:2510.05491, as in nanochat): a factored second moment of the orthogonalised update, per
   row (or per column for wide matrices), evens out the update scale across neurons; the Frobenius norm of
   the update is kept. beta2=None turns it off; nanochat's beta2 is 0.9 (0.95 before 2026-03).
4. Update W <- W - lr * s * U', with the shape scale s = max(1, rows / cols) ** 0.5 (nanochat optim.py and
   modded-nanogpt: tall matrices, e.g. the MLP up-projection, get sqrt(4) = 2x), and *cautious* decoupled
   weight decay W <- W - lr * s * wd * W only where the update and W agree in sign (nanochat dev/LOG.md;
   like nanochat, the shape scale s multiplies the decay as well).

Parameters of one shape are stacked, so each iteration is one batched matmul per shape. State is kept per
parameter (momentum buffer, second moment), so state_dict / load_state_dict work as for any optimizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Polar Express coefficients for num_iters=5, safety_factor=2e-2, cushion=2 (arXiv:2505.16932), as used in
# nanochat/optim.py. Iteration i applies X <- a X + (b A + c A^2) X with A = X X^T.
POLAR_EXPRESS_COEFFS: list[tuple[float, float, float]] = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
# modded-nanogpt's quintic Newton-Schulz, the same polynomial every step; it trades exact convergence for
# slope at 0 and leaves singular values in roughly (0.7, 1.2).
NEWTON_SCHULZ_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def orthogonalize(G: Tensor, steps: int = 5, method: str = "polar_express") -> Tensor:
    """Approximate polar factor of G (..., m, n): same singular vectors, singular values pushed to ~1.

    Inputs whose singular values are above ~1e-3 of ||G||_F come out in about [0.85, 1.15] (Polar Express,
    5 steps) or [0.68, 1.2] (Newton-Schulz). Runs in bf16 on CUDA, fp32 elsewhere; returns that dtype.
    """
    if method == "polar_express":
        coeffs = [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]
        safety = 1.01  # PE's coefficients assume ||X||_2 <= 1 with a little margin (nanochat: 1.01)
    elif method == "newton_schulz":
        coeffs = [NEWTON_SCHULZ_COEFFS] * steps
        safety = 1.0
    else:
        raise ValueError(f"orthogonalize: method must be 'polar_express' or 'newton_schulz', got {method!r}")
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation: A = X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety + 1e-7)  # ||X||_2 <= ||X||_F <= 1
    for a, b, c in coeffs:
        A = X @ X.mT  # (..., m, m), m <= n
        B = b * A + c * (A @ A)
        X = a * X + B @ X  # an odd quintic in X: X (a + b X^T X + c (X^T X)^2)
    if tall:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Hyperparameters (per group): lr, momentum, nesterov, ns_steps, weight_decay
    (cautious, decoupled, multiplied by lr as in AdamW), beta2 (NorMuon second moment; None = off), method
    ('polar_express' or 'newton_schulz'), eq (MuonEq row equilibration), renorm (Muon+)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, beta2: float | None = 0.9, method: str = "polar_express",
                 eq: bool = True, renorm: bool = True):
        if lr < 0 or not 0 <= momentum < 1 or ns_steps < 1 or weight_decay < 0:
            raise ValueError(f"Muon: bad hyperparameters lr={lr} momentum={momentum} ns_steps={ns_steps} "
                             f"weight_decay={weight_decay}")
        if beta2 is not None and not 0 <= beta2 < 1:
            raise ValueError(f"Muon: beta2 must be in [0, 1) or None, got {beta2}")
        if method not in ("polar_express", "newton_schulz"):
            raise ValueError(f"Muon: method must be 'polar_express' or 'newton_schulz', got {method!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, beta2=beta2, method=method, eq=eq, renorm=renorm)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon: only 2-D parameters, got shape {tuple(p.shape)} "
                                     "(embeddings, heads and scalars belong to AdamW)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault((tuple(p.shape), p.device, p.dtype), []).append(p)
            for params in by_shape.values():
                self._step_stack(group, params)
        return loss

    def _step_stack(self, group: dict, params: list[Tensor]) -> None:
        rows, cols = params[0].shape
        beta, beta2 = group["momentum"], group["beta2"]
        grads = [p.grad for p in params]
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
                if beta2 is not None:  # factored: one entry per row (tall/square) or per column (wide)
                    shape = (rows, 1) if rows >= cols else (1, cols)
                    state["second_momentum"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        bufs = [self.state[p]["momentum_buffer"] for p in params]

        # 1. momentum (Nesterov: step along the gradient blended with the updated buffer)
        torch._foreach_lerp_(bufs, grads, 1 - beta)
        updates = torch._foreach_lerp(grads, bufs, beta) if group["nesterov"] else bufs

        # 2. orthogonalise all same-shape matrices at once: (n, rows, cols)
        X = torch.stack(updates).float()
        if group.get("eq", False):  # MuonEq: every row to the RMS row norm ||X||_F / sqrt(rows)
            target = X.norm(dim=(-2, -1), keepdim=True) / rows ** 0.5
            X = X * (target / X.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        U = orthogonalize(X, group["ns_steps"], group["method"]).float()
        if group.get("renorm", False):  # Muon+: Frobenius norm of a semi-orthogonal matrix, sqrt(min(rows, cols))
            U = U * (min(rows, cols) ** 0.5 / U.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))

        # 3. NorMuon: divide by the RMS of each row (column) tracked over steps, then restore the total norm
        if beta2 is not None:
            red_dim = -1 if rows >= cols else -2
            v = U.square().mean(dim=red_dim, keepdim=True)  # (n, rows, 1) or (n, 1, cols)
            second = torch.stack([self.state[p]["second_momentum"] for p in params])
            second.lerp_(v, 1 - beta2)
            for p, s in zip(params, second.unbind(0)):
                self.state[p]["second_momentum"].copy_(s)
            scaled = U * second.clamp_min(1e-10).rsqrt()
            U = scaled * (U.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))

        # 4. cautious weight decay + update, with the shape-dependent LR scale
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        wd = group["weight_decay"]
        for p, u in zip(params, U.to(params[0].dtype).unbind(0)):
            if wd > 0:
                p.sub_(p * (u * p >= 0), alpha=lr * wd)
            p.sub_(u, alpha=lr)
