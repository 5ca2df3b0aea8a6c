"""An exponential moving average (EMA) of the model's weights, evaluated beside the raw weights at the end.

After every optimizer step, for every parameter w with its average e (fp32, on w's device):

    e <- e + (1 - decay) * (w - e)            (torch._foreach_lerp_: one fused kernel per dtype/device group)

so after k steps from e_0 = w_0 (the initial weights),

    e_k = decay^k * w_0 + (1 - decay) * sum_{i=1..k} decay^(k - i) * w_i.

The average is parameterised by its half-life in TOKENS, not by a per-step decay:
decay = 0.5 ** (total_batch / halflife_tokens). A per-step decay of 0.999 means a window of ~700 steps, which
is 360M tokens at a 2^19-token batch and 23M at the demo's 8k: the same number would average very different
spans of training when a recipe changes its batch, while a half-life in tokens keeps the span it names.
(Weight averaging in LM pretraining: Sanyal et al. arXiv:2306.03241 "early weight averaging"; with a
warmup-stable-decay schedule the warmdown already averages much of the benefit away, which is why the stage
evaluates both and keeps the better, not the EMA blindly.)

The average costs 4 bytes a parameter on the device (d20: ~1.9 GB) and one lerp over the weights a step.
It is part of the checkpoint, so a resumed run continues the same average exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

STATE_FORMAT = "daychat.ema/1"


def decay_for(halflife_tokens: float, total_batch: int) -> float:
    """Per-step decay whose half-life is `halflife_tokens` tokens at `total_batch` tokens a step."""
    if halflife_tokens <= 0 or total_batch <= 0:
        raise ValueError(f"halflife_tokens and total_batch must be > 0, got {halflife_tokens}, {total_batch}")
    return 0.5 ** (total_batch / halflife_tokens)


class EMA:
    """fp32 moving average of `model.parameters()` (in their order), kept on each parameter's device."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]  # e_0 = w_0
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One averaging step, after an optimizer step."""
        weights = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, weights, 1.0 - self.decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own weights again after it.

        Swaps in place, one parameter at a time (a torch.compile'd wrapper of the model sees the swap too, and
        the extra memory is that of the largest parameter, not of a second model); fp32 <-> fp32 copies are
        exact, so the raw weights come back bit for bit."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for p, e in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(e)
            e.copy_(tmp)

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "decay": self.decay, "updates": self.updates,
                "shadow": dict(zip(self.names, self.shadow))}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT or set(state["shadow"]) != set(self.names):
            raise ValueError("the EMA state does not match this model's parameters")
        if state["decay"] != self.decay:
            raise ValueError(f"the EMA state was saved with decay {state['decay']}, this run uses {self.decay}")
        for name, e in zip(self.names, self.shadow):
            e.copy_(state["shadow"][name])
        self.updates = state["updates"]
