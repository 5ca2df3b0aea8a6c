"""Scaling laws: how big a model and how many tokens for a compute budget, and fits of loss against compute.

1. The size rule (`ScalingRule`). Compute-optimal parameters N and tokens D are power laws of the training
   compute C (FLOPs):

       N_opt(C) = k_N * C^a,      D_opt(C) = k_D * C^b,      a + b ~ 1 since C ~ 6 N D

   Chinchilla (Hoffmann et al. 2022, arXiv:2203.15556, Table 2) measured a ~ b ~ 0.5 (0.49-0.50 / 0.50-0.51
   for its approaches 1 and 2), i.e. a constant tokens:params ratio at the optimum. The level (k_N, k_D) is
   anchored on a small-model fit of our own architecture family rather than on Chinchilla's (whose ~20
   tokens/param counted embeddings and used a different model and optimizer): nanochat's scaling-law sweep
   (karpathy/nanochat, Muon + AdamW, params = block matrices + lm_head) puts the optimum at 1e19 FLOPs at
   ~380M parameters and ~3.8B tokens (ARCHITECTURE.md, "Numbers that shape the design"), a ratio of ~10.
   With a = b = 0.5 that gives
       k_N = 3.8e8 / (1e19)^0.5 = 0.120,   k_D = 3.8e9 / (1e19)^0.5 = 1.20.
   Check: 6 * N * D = 6 * 3.8e8 * 3.8e9 = 8.7e18, the rest of the 1e19 being attention FLOPs at T = 2048.
   Every number is a field, so a recipe (or a better fit) can replace it.

2. The fitter (`fit_loss_curve`). L(C) = E + A * C^(-alpha) (Kaplan et al. 2020, arXiv:2001.08361, with an
   irreducible term as in Chinchilla), or the pure power law E = 0, which is a straight line in log-log and
   the only form a handful of points constrains. The band is a residual bootstrap: refit on the fitted
   curve plus resampled residuals (in log space), and take percentiles of the projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ScalingRule:
    """N_opt = k_N C^a and D_opt = k_D C^b, anchored at (ref_compute, ref_params, ref_tokens)."""

    ref_compute: float = 1e19  # FLOPs
    ref_params: float = 3.8e8  # matmul params (block matrices + lm_head) optimal at ref_compute (nanochat)
    ref_tokens: float = 3.8e9  # tokens optimal at ref_compute (nanochat)
    a: float = 0.5  # N_opt ~ C^a (Chinchilla)
    b: float = 0.5  # D_opt ~ C^b (Chinchilla)

    @property
    def k_params(self) -> float:
        return self.ref_params / self.ref_compute ** self.a

    @property
    def k_tokens(self) -> float:
        return self.ref_tokens / self.ref_compute ** self.b

    def params(self, compute: float) -> float:
        """Compute-optimal parameter count at `compute` FLOPs."""
        return self.k_params * compute ** self.a

    def tokens(self, compute: float) -> float:
        """Compute-optimal token count at `compute` FLOPs."""
        return self.k_tokens * compute ** self.b

    def describe(self) -> str:
        return (f"N_opt = {self.k_params:.4g} * C^{self.a:g}, D_opt = {self.k_tokens:.4g} * C^{self.b:g} "
                f"(anchored at {self.ref_params:.3g} params / {self.ref_tokens:.3g} tokens at {self.ref_compute:.3g} FLOPs)")


# ----------------------------------------------------------------------------------------------------------
# Loss-vs-compute fits


@dataclass(frozen=True)
class LossFit:
    """L(C) = E + A * C^(-alpha), fitted on `compute`, `loss`; `form` 'power' (E = 0) or 'saturating'."""

    form: str
    E: float
    A: float
    alpha: float
    compute: tuple[float, ...]
    loss: tuple[float, ...]
    residual_std: float  # of log(L - E), the fit's scatter
    boot: tuple[tuple[float, float, float], ...] = field(default=(), repr=False)  # (E, A, alpha) refits

    def predict(self, compute) -> np.ndarray:
        return self.E + self.A * np.asarray(compute, dtype=float) ** (-self.alpha)

    def band(self, compute, lo: float = 5.0, hi: float = 95.0) -> tuple[np.ndarray, np.ndarray]:
        """Percentile band of the bootstrap refits' predictions at `compute` (the fit itself when no refits)."""
        c = np.asarray(compute, dtype=float)
        if not self.boot:
            p = self.predict(c)
            return p, p
        preds = np.array([E + A * c ** (-alpha) for E, A, alpha in self.boot])  # (n_boot, len(c))
        return np.percentile(preds, lo, axis=0), np.percentile(preds, hi, axis=0)

    def describe(self) -> str:
        head = f"L(C) = {self.E:.4g} + {self.A:.4g} * C^-{self.alpha:.4g}" if self.form == "saturating" else \
            f"L(C) = {self.A:.4g} * C^-{self.alpha:.4g}"
        return f"{head} (fit on {len(self.compute)} points, log-residual std {self.residual_std:.3g})"


def _fit_power(logc: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares of log(y) = log A - alpha log C; returns (A, alpha, sse in log space)."""
    slope, intercept = np.polyfit(logc, np.log(y), 1)
    resid = np.log(y) - (intercept + slope * logc)
    return math.exp(intercept), -slope, float(resid @ resid)


def _fit_once(compute: np.ndarray, loss: np.ndarray, form: str) -> tuple[float, float, float]:
    logc = np.log(compute)
    if form == "power":
        A, alpha, _ = _fit_power(logc, loss)
        return 0.0, A, alpha
    # Saturating: for each E on a grid below min(loss) the rest is a straight line in log-log (closed-form
    # least squares, vectorised over the grid); keep the E whose curve has the least squared error in loss
    # space, then refine on a finer grid around it. Robust with few points, where a gradient fit from a poor
    # start wanders off to E -> -inf or alpha -> 0.
    top = float(loss.min()) * 0.999
    x = logc - logc.mean()  # (n,)
    grid = np.linspace(0.0, top, 200)
    for _ in range(2):
        logy = np.log(loss[None, :] - grid[:, None])  # (G, n)
        slope = (logy - logy.mean(axis=1, keepdims=True)) @ x / (x @ x)  # (G,)
        intercept = logy.mean(axis=1) - slope * logc.mean()
        pred = grid[:, None] + np.exp(intercept[:, None] + slope[:, None] * logc[None, :])
        i = int(np.argmin(np.sum((pred - loss[None, :]) ** 2, axis=1)))
        E, A, alpha = float(grid[i]), float(math.exp(intercept[i])), float(-slope[i])
        step = grid[1] - grid[0]
        grid = np.clip(np.linspace(E - step, E + step, 100), 0.0, top)
    return E, A, alpha


def fit_loss_curve(compute, loss, form: str = "power", n_boot: int = 1000, seed: int = 0) -> LossFit:
    """Fit L(C) to (compute, loss) points and bootstrap the residuals for a band.

    form: 'power' (L = A C^-alpha, 2 parameters, needs >= 2 points) or 'saturating' (L = E + A C^-alpha,
    needs >= 4 points). The bootstrap draws residuals of log(L - E) with replacement, adds them to the fit,
    refits `n_boot` times (seeded: the same points give the same band).
    """
    c = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    need = {"power": 2, "saturating": 4}[form]
    if c.shape != y.shape or c.size < need:
        raise ValueError(f"a {form} fit needs >= {need} (compute, loss) points, got {c.size}")
    if np.any(c <= 0) or np.any(y <= 0):
        raise ValueError("compute and loss must be positive")
    E, A, alpha = _fit_once(c, y, form)
    fitted = E + A * c ** (-alpha)
    resid = np.log(y - E) - np.log(fitted - E)
    dof = max(1, c.size - (2 if form == "power" else 3))
    residual_std = float(math.sqrt(resid @ resid / dof))
    rng = np.random.default_rng(seed)
    boot = []
    # Residuals are rescaled by sqrt(n / dof) so the bootstrap does not understate the scatter of a fit that
    # used up some of the points' freedom (Davison & Hinkley 1997, eq. 6.9).
    scaled = resid * math.sqrt(c.size / dof)
    for _ in range(n_boot if c.size > 2 else 0):
        draw = rng.choice(scaled, size=c.size, replace=True)
        y_b = E + (fitted - E) * np.exp(draw)
        boot.append(_fit_once(c, y_b, form))
    return LossFit(form, E, A, alpha, tuple(c.tolist()), tuple(y.tolist()), residual_std, tuple(boot))
