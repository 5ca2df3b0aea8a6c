"""How learning rates and weight decay move with the total batch, the width (depth) and the horizon.

The base values in params.yaml (matrix_lr 0.02, embedding_lr 0.3, unembedding_lr 0.008, scalar_lr 0.5,
weight_decay 0.28) are nanochat's, tuned at its reference point: d12 (model_dim 768), B_ref = 2^19 tokens
a step, D_ref = 12 x its scaling parameters = 1.32B tokens (nanochat scripts/base_train.py: B_REF, D_REF,
target_param_data_ratio 12). daychat moves them to another run by this rule:

1. Width (depth x aspect_ratio): the AdamW learning rates (embeddings, lm_head) x (model_dim / 768)^-0.5
   (nanochat setup_optimizer, muP-like); Muon's is not width-scaled, its update has a fixed spectral size
   whatever the width (its shape factor max(1, rows/cols)^0.5 is inside Muon).
2. Batch: every learning rate x (B / B_ref)^lr_batch_exponent. nanochat uses 0.5 (the AdamW sqrt rule,
   applied to Muon as an assumption). daychat's default is 0: Muon's orthogonalised update does not grow
   with a cleaner gradient, and at CPU scale (B = 8k tokens, 1/64 of B_ref) the sqrt factor cuts every LR
   by 8x and costs 2.47 vs 1.95 val bpb (issue 17's measurement); reports/ablate.md measures both at two
   scales.
3. Horizon and batch for the weight decay: the timescale of the decay, in units of the run, is held at the
   reference's (the T_epoch rule of Wang & Aitchison, arXiv:2405.13698, as nanochat applies it): with
   tau = B / (lr wd D) constant, wd = wd_ref x (B / B_ref) x (lr_ref / lr) x (D_ref / D)
                                  = wd_ref x (B / B_ref)^(1 - lr_batch_exponent) x (D_ref / D).
   With exponent 0.5 this is nanochat's sqrt(B / B_ref) x (D_ref / D). `wd_rule: none` keeps wd as given.

`describe()` says what the rule did, in the stage log; the pretrain stage records the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass

# nanochat's reference point (scripts/base_train.py at 92d63d4): the d12 it tunes on, trained at a 12:1
# tokens:scaling-parameter ratio with 2^19-token steps. d12's scaling parameters = its block matrices
# (12 x 12 x 768^2 + 6 value-embedding gates of 12 x 6) + lm_head (32768 x 768) = 110,100,912.
B_REF = 2 ** 19
D_REF = 12 * 110_100_912
WIDTH_REF = 768


@dataclass(frozen=True)
class Transfer:
    """The factors applied to a recipe's base values (see the module docstring)."""

    lr_factor: float  # x every learning rate (batch rule)
    adam_width_factor: float  # x the AdamW embedding and lm_head learning rates (width rule)
    weight_decay: float  # Muon's weight decay after the rule
    base_weight_decay: float
    tokens: int  # the horizon the weight decay was scaled for (0: not scaled)

    def describe(self) -> str:
        wd = (f"Muon weight decay {self.base_weight_decay:g} -> {self.weight_decay:.4g} for {self.tokens:,} tokens"
              if self.tokens else f"Muon weight decay {self.weight_decay:g} (not scaled)")
        return (f"LRs x{self.lr_factor:.4g} for the batch, AdamW embedding/lm_head LRs x{self.adam_width_factor:.4g} "
                f"for the width; {wd}")


def transfer(*, total_batch: int, model_dim: int, weight_decay: float, tokens: int, lr_batch_exponent: float = 0.0,
             wd_rule: str = "horizon") -> Transfer:
    """The factors for a run of `tokens` tokens (0 or wd_rule 'none': weight decay as given) in steps of
    `total_batch` tokens, on a model of width `model_dim`."""
    if wd_rule not in ("horizon", "none"):
        raise ValueError(f"wd_rule must be 'horizon' or 'none', got {wd_rule!r}")
    ratio = total_batch / B_REF
    wd, horizon = weight_decay, 0
    if wd_rule == "horizon" and tokens > 0:
        wd = weight_decay * ratio ** (1.0 - lr_batch_exponent) * (D_REF / tokens)
        horizon = tokens
    return Transfer(lr_factor=ratio ** lr_batch_exponent, adam_width_factor=(model_dim / WIDTH_REF) ** -0.5,
                    weight_decay=wd, base_weight_decay=weight_decay, tokens=horizon)
