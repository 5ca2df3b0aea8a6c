"""FP8 matmuls for the transformer blocks' linears: dynamic tensorwise scaling, all three GEMMs in FP8.

`convert_to_fp8(model)` swaps every block linear (attn c_q, c_k, c_v, c_proj; mlp c_fc, c_proj) for an
`FP8Linear` that SHARES the original weight Parameter: fp32 master weights, the optimizers' parameter lists
and state_dict keys are all unchanged, so a checkpoint or model folder written from an FP8 run loads into
the plain GPT. The lm_head stays in bf16 (its logits feed a softcap and an fp32 loss over a 32k vocab; an
FP8 head is where modded-nanogpt needed hand-tuned static scales), and so do the embeddings and the tiny
value-embedding gates.

The recipe is torchao.float8's "tensorwise" one (Float8LinearRecipeName.TENSORWISE: dynamic per-tensor
scales, cuBLAS's tensorwise FP8 kernel through torch._scaled_mm), written out here in ~60 lines:

    forward      y  = x @ W^T            x, W in float8_e4m3fn (3 mantissa bits, max 448)
    backward     dx = dy @ W             dy in float8_e5m2 (2 mantissa bits, max 57344: gradients need the
                 dW = dy^T @ x           range more than the precision), W and x reuse their forward casts

Each operand's scale is amax(|t|) / fp8_max, computed per call (no delayed-scaling history to checkpoint),
so a tensor fills the FP8 range whatever its magnitude; _scaled_mm multiplies the scales back in its
fp32 accumulator. As in torchao's Float8GemmConfig, the forward uses cuBLAS's fast accumulation and the two
backward GEMMs do not (their sums run over many tokens, where the fast path's reduced-precision
accumulator loses the most). dW comes out in fp32 (the master weight's gradient), y and dx in the
activation dtype (bf16 under autocast).

Only FP8 tensor cores make this fast: compute capability 8.9+ (RTX 4090 "Ada", H100). torch._scaled_mm also
runs on the CPU in torch 2.13 (emulated, slow), which is what the tests use to check the numerics.
_scaled_mm needs every matrix dimension it contracts or lays out column-major to be a multiple of 16: the
weight dims are checked when converting; the token count (which the weight gradient contracts over) is
zero-padded in the backward when it is not.
"""

from __future__ import annotations

import torch
import torch.nn as nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ALIGN = 16  # torch._scaled_mm: dims multiple of 16
EPS = 1e-12  # keeps the scale of an all-zero tensor (zero-initialised projections) finite


def fp8_supported(device: torch.device) -> bool:
    """Whether `device` has FP8 tensor cores (CUDA compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale cast to `dtype`, scale) with scale = amax(|t|) / dtype's max: one fp32 scale per tensor."""
    fp8_max = torch.finfo(dtype).max
    scale = t.detach().abs().amax().float().clamp(min=EPS) / fp8_max
    # the clamp is a no-op up to rounding; the cast does not saturate on its own
    return (t.float() / scale).clamp(-fp8_max, fp8_max).to(dtype), scale


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix with column-major strides (what _scaled_mm wants for its second operand)."""
    return t.t().contiguous().t()


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """t (M, K) fp8 with zero rows appended up to a multiple of 16.

    The padding is done on the bytes (a uint8 view; +0.0 is the all-zero byte in both e4m3fn and e5m2):
    filling or copying into an fp8 tensor makes Inductor promote between fp8 and another dtype, which it
    refuses under torch.compile ("Promotion for Float8 Types is not supported") whenever M is not a
    multiple of 16."""
    pad = -t.size(0) % ALIGN
    if not pad:
        return t
    raw = t.view(torch.uint8)
    return torch.cat([raw, raw.new_zeros((pad, t.size(1)))]).view(t.dtype)


class _FP8Matmul(torch.autograd.Function):
    """y = x @ w^T for x (M, K), w (N, K) with FP8 operands; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, sx = to_fp8(x, E4M3)  # (M, K)
        w8, sw = to_fp8(w, E4M3)  # (N, K); w8.t() is (K, N) column-major as _scaled_mm wants
        y = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype, use_fast_accum=True)
        ctx.save_for_backward(x8, sx, w8, sw)  # the FP8 casts: 1 byte an element instead of 2-4
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return y  # (M, N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x8, sx, w8, sw = ctx.saved_tensors
        dy8, sdy = to_fp8(dy.contiguous(), E5M2)  # (M, N)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx = dy @ w: (M, N) @ (N, K), w8 read column-major
            dx = torch._scaled_mm(dy8, _column_major(w8), scale_a=sdy, scale_b=sw,
                                  out_dtype=ctx.x_dtype, use_fast_accum=False)
        if ctx.needs_input_grad[1]:  # dw = dy^T @ x: (N, M) @ (M, K), contracting over the M tokens
            dy8p, x8p = _pad_rows(dy8), _pad_rows(x8)  # zero rows add nothing to the sum
            dw = torch._scaled_mm(dy8p.t().contiguous(), _column_major(x8p), scale_a=sdy, scale_b=sx,
                                  out_dtype=torch.float32, use_fast_accum=False).to(ctx.w_dtype)
        return dx, dw, None


class FP8Linear(nn.Linear):
    """A bias-free nn.Linear whose matmul runs in FP8 (same parameters, same state_dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            # Evaluation (val bpb, the CORE proxy, generation) runs the plain bf16 matmul, so in-training
            # metrics compare with core_eval's on the saved model, whose linears are ordinary ones.
            return nn.functional.linear(x, self.weight)
        # Under autocast the surrounding ops are bf16, so is our output; otherwise x's own dtype.
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        else:
            out_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):  # the casts and _scaled_mm are explicit
            y = _FP8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight, out_dtype)  # (B*T, N)
        return y.view(*x.shape[:-1], y.size(-1))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        if linear.bias is not None:
            raise ValueError("FP8Linear: linears with a bias are not supported (the GPT has none)")
        out_features, in_features = linear.weight.shape
        bad = [d for d in (in_features, out_features) if d % ALIGN]
        if bad:
            raise ValueError(f"an FP8 matmul needs both dims of a weight to be multiples of {ALIGN} "
                             f"(torch._scaled_mm), got {out_features} x {in_features}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = in_features, out_features
        new.weight = linear.weight  # the same Parameter object: optimizers and checkpoints are unaffected
        new.register_parameter("bias", None)
        return new


BLOCK_LINEARS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def convert_to_fp8(model: nn.Module) -> int:
    """Swap the block linears of a GPT (model.blocks) for FP8Linear in place; returns how many were swapped.

    Raises ValueError naming the first linear whose shape _scaled_mm cannot take."""
    count = 0
    for i, block in enumerate(model.blocks):
        for path in BLOCK_LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            linear = getattr(parent, name)
            if isinstance(linear, FP8Linear):
                continue
            try:
                setattr(parent, name, FP8Linear.from_linear(linear))
            except ValueError as e:
                raise ValueError(f"blocks.{i}.{path}: {e}") from None
            count += 1
    return count
