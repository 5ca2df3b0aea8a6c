"""
The daychat GPT: a decoder-only transformer in the current best-known small-model form.

Design choices (the optional ones are GPTConfig switches):
- Width from depth: model_dim = depth * aspect_ratio, rounded UP to a multiple of head_dim, with a fixed
  head_dim (nanochat's "one knob" sizing), so a recipe scales the model with `depth` alone.
- Rotary position embeddings (RoFormer, arXiv:2104.09864); no learned positions.
- QK-norm: q and k are RMS-normalised per head before the dot product (arXiv:2010.04245, ViT-22B
  arXiv:2302.05442), which keeps attention logits bounded and lets Muon use large learning rates; then
  both are multiplied by `qk_scale` (1.2: sharper attention than unit-norm q, k allow; nanochat gpt.py,
  tuned at d12 by its autoresearch rounds of 2026-03).
- Parameter-free RMSNorm (arXiv:1910.07467) via F.rms_norm: after the token embedding, before attention
  and MLP (pre-norm), and before the lm_head. No gains, no biases anywhere.
- ReLU^2 MLP with 4x hidden width (Primer, arXiv:2109.08668).
- Untied token embedding and lm_head: they want very different learning rates (see daychat.optim).
- Logit soft-capping softcap * tanh(logits / softcap) (Gemma 2, arXiv:2408.00118; modded-nanogpt,
  nanochat use 15), computed in fp32 together with the loss.
- Zero-initialised output projections (attn.c_proj, mlp.c_proj): every block starts as the identity, so
  the initial residual stream is the (normalised) token embedding (modded-nanogpt, nanochat).
- Per-layer learnable residual scalars, as in modded-nanogpt / nanochat: before block i,
  x <- resid_lambdas[i] * x + x0_lambdas[i] * x0, where x0 is the normalised embedding. Initialised as
  ramps over depth (`lambda_init: ramp`, nanochat gpt.py init_weights): resid 1.15 -> 1.05 and x0 0.20 ->
  0.05 from the first layer to the last (early layers lean on the embedding more); `flat` = 1.0 and 0.1.
- Value embeddings (value residual, ResFormer arXiv:2410.17897; modded-nanogpt): alternating layers,
  the last one always included (nanochat's layout), own a token -> value-vector table that is added to V
  through a per-kv-head input-dependent gate ve_gate_scale * sigmoid(W x[:, :ve_gate_inputs]); nanochat
  today: 3 * sigmoid over 12 channels, W ~ U(0, 0.02), so the gate starts slightly above 1.5.
- Smear (`smear`, a bigram gate; modded-nanogpt, nanochat gpt.py): each position's normalised embedding
  gets a gated share of the previous position's, x_t += smear_lambda * sigmoid(W x_t[:24]) * x_{t-1},
  smear_lambda = 0 at init (the identity). Cheap bigram information before the first block.
- Backout (`backout`, modded-nanogpt, nanochat gpt.py): the residual stream after block depth // 2 is
  kept, and backout_lambda (0.2 at init) times it is subtracted before the final norm, taking low-level
  features out of what the lm_head reads.
- Grouped-query attention (arXiv:2305.13245): n_kv_head <= n_head key/value heads.
- A window pattern: one char per layer, cycled, L = global causal, S = sliding window of `short_window`
  keys (the query itself included); the final layer is always global, as in nanochat. Window layers run on
  a kernel that really skips the masked blocks (FlexAttention with a block mask, arXiv:2412.05496) on CUDA.
- Precision: the block matrices, lm_head and scalars are fp32 master weights; the token and value
  embeddings are stored in `embedding_dtype` (bf16 halves their weights, gradients and Adam state, the
  largest tables of the model: nanochat stores them in bf16 too; fp32 = off). On CUDA the training loop
  runs forward under torch.autocast("cuda", torch.bfloat16). The residual stream is fp32 on purpose
  (looked-up embeddings are cast to fp32; a block's bf16 output added to fp32 stays fp32): every layer
  adds into it, and bf16's 8-bit mantissa would round small updates away. Logits, softcap and
  cross-entropy are always fp32.

Shapes: B batch, T time, C = model_dim, H query heads, Hkv key/value heads, D = head_dim, V vocab.
This file imports nothing from daychat and touches no CUDA at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# Vocab rows are padded to a multiple of this for tensor-core friendly lm_head shapes (nanochat pads to 64);
# the extra rows are never a target and the logits are cropped back to vocab_size.
PAD_VOCAB_TO = 64
# The rotary tables cover this many times config.sequence_len. Training never goes past sequence_len, but
# evaluation may: the reference CORE evaluation (nanochat's core_eval.py) feeds few-shot prompts uncropped
# (squad and boolq reach ~2.4k tokens) to a model whose rotary table it over-allocates by the same 10x.
# The tables are derived data (not in checkpoints): 10 x 2048 positions x 64 frequencies x 2 is 10 MB.
ROTARY_HEADROOM = 10
# The smear gate reads this many leading channels of the normalised embedding (nanochat gpt.py: 24).
SMEAR_CHANNELS = 24
EMBEDDING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class GPTConfig:
    vocab_size: int
    sequence_len: int = 2048  # longest T the rotary table covers (and T in the FLOP count)
    depth: int = 12  # number of transformer blocks
    aspect_ratio: int = 64  # model_dim = depth * aspect_ratio, rounded up to a multiple of head_dim
    head_dim: int = 128
    n_kv_head: int | None = None  # None = n_head (no GQA)
    window_pattern: str = "L"  # one char per layer, cycled: L = global, S = window of short_window
    short_window: int = 1024
    softcap: float = 15.0  # 0 = off
    qk_norm: bool = True
    value_embeds: bool = True
    zero_init_proj: bool = True
    # Defaults below are nanochat's tuned state (nanochat/gpt.py at 92d63d4, 2026-07); the previous value
    # (daychat before issue 17, nanochat before 2026-03) is given for each; reports/ablate.md measures them.
    rope_base: float = 100000.0  # rotary base theta (was 10,000; nanochat 2026-03-09: 10K -> 100K)
    qk_scale: float = 1.2  # q and k multiplied by this after QK-norm (was 1.0)
    ve_gate_inputs: int = 12  # leading channels the value-embedding gate reads (was 32)
    ve_gate_scale: float = 3.0  # gate = ve_gate_scale * sigmoid(...), range (0, scale) (was 2.0)
    ve_gate_init: float = 0.02  # gate weights ~ U(0, ve_gate_init); 0 = zeros, gate neutral at init (was 0)
    fc_init_scale: float = 0.4  # mlp.c_fc's uniform bound x this (was 1.0)
    wte_init_std: float = 0.8  # token embedding ~ N(0, std) (was 1.0)
    resid_lambdas: bool = True  # per-layer learnable residual / x0 scalars
    lambda_init: str = "ramp"  # ramp: resid 1.15 -> 1.05, x0 0.20 -> 0.05 over depth; flat: 1.0, 0.1 (was flat)
    smear: bool = True  # previous-token embedding gate before the first block (was off)
    backout: bool = True  # subtract backout_lambda x the mid-depth residual before the final norm (was off)
    embedding_dtype: str = "fp32"  # storage of wte and value embeddings: fp32 or bf16

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")

        for name in ("vocab_size", "sequence_len", "depth", "aspect_ratio", "head_dim", "short_window"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.head_dim % 2 == 0, f"head_dim must be even (rotary embeddings rotate pairs), got {self.head_dim}")
        if self.n_kv_head is not None:
            need(isinstance(self.n_kv_head, int) and self.n_kv_head >= 1,
                 f"n_kv_head must be a positive integer or None, got {self.n_kv_head!r}")
            need(self.n_head % self.n_kv_head == 0,
                 f"n_head ({self.n_head} = model_dim {self.model_dim} / head_dim {self.head_dim}) must be a "
                 f"multiple of n_kv_head ({self.n_kv_head})")
        need(len(self.window_pattern) > 0 and set(self.window_pattern) <= {"L", "S"},
             f"window_pattern must be a non-empty string of 'L' (global) and 'S' (short window) characters, "
             f"got {self.window_pattern!r}")
        need(self.softcap >= 0, f"softcap must be >= 0 (0 = off), got {self.softcap}")
        need(self.rope_base > 0, f"rope_base must be > 0, got {self.rope_base}")
        need(isinstance(self.ve_gate_inputs, int) and self.ve_gate_inputs >= 1,
             f"ve_gate_inputs must be a positive integer, got {self.ve_gate_inputs!r}")
        need(self.qk_scale > 0 and self.ve_gate_scale > 0 and self.fc_init_scale > 0 and self.wte_init_std > 0,
             "qk_scale, ve_gate_scale, fc_init_scale and wte_init_std must be > 0")
        need(self.ve_gate_init >= 0, f"ve_gate_init must be >= 0, got {self.ve_gate_init}")
        need(self.lambda_init in ("ramp", "flat"), f"lambda_init must be 'ramp' or 'flat', got {self.lambda_init!r}")
        need(self.embedding_dtype in EMBEDDING_DTYPES,
             f"embedding_dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {self.embedding_dtype!r}")

    @property
    def model_dim(self) -> int:
        return -(-self.depth * self.aspect_ratio // self.head_dim) * self.head_dim

    @property
    def n_head(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def kv_heads(self) -> int:
        """n_kv_head resolved (None means one kv head per query head)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // PAD_VOCAB_TO) * PAD_VOCAB_TO

    @property
    def ve_gate_channels(self) -> int:
        return min(self.ve_gate_inputs, self.model_dim)

    @property
    def smear_channels(self) -> int:
        return min(SMEAR_CHANNELS, self.model_dim)

    @property
    def backout_layer(self) -> int:
        """The block after which the residual stream is kept for backout (nanochat: n_layer // 2)."""
        return self.depth // 2

    def layer_windows(self) -> list[int | None]:
        """Per layer: None for global causal attention, else the window (keys visible, the query included)."""
        chars = [self.window_pattern[i % len(self.window_pattern)] for i in range(self.depth)]
        chars[-1] = "L"  # the last layer always sees the whole context (nanochat)
        return [self.short_window if c == "S" else None for c in chars]

    def value_embed_layers(self) -> list[int]:
        """Layers with a value embedding: every other layer, the last always included (nanochat's has_ve)."""
        if not self.value_embeds:
            return []
        return [i for i in range(self.depth) if i % 2 == (self.depth - 1) % 2]


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, T, nh, D) by position-dependent angles; cos, sin: (1, T, 1, D/2).

    The math runs in the dtype of cos/sin (fp32) and the result is cast back to x's dtype (bf16 under autocast).
    """
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Attention kernels
#
# Global layers: F.scaled_dot_product_attention(is_causal=True), which on CUDA in bf16 dispatches to the
# flash backend (FA2 on Ada/Hopper; it supports enable_gqa) and never forms a T x T matrix.
# Window layers on CUDA: FlexAttention with a sliding-window BlockMask. The mask is built once per
# (T, window, device) and cached; blocks entirely outside the window are skipped by the kernel, so a
# window of W costs ~W/T of a global layer, which is what estimate_flops counts.
# Window layers on CPU, and in evaluation (no grad) on CUDA: SDPA with an explicit boolean T x T mask. It
# costs a full global layer; on CPU it exists so tests can check correctness, on CUDA it spares evaluation's
# ever-changing batch shapes a FlexAttention recompile each (see GPT._window_masks).


def _sliding_window_mod(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return mask_mod


@lru_cache(maxsize=64)
def sliding_window_block_mask(T: int, window: int, device: torch.device) -> BlockMask:
    """FlexAttention BlockMask: query t sees keys t-window+1 .. t. Shared by all heads and batch rows."""
    return create_block_mask(_sliding_window_mod(window), B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


@lru_cache(maxsize=8)  # evaluation meets many widths: a few T x T bool masks (<= 7 MB each at 2.6k) cached
def sliding_window_dense_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """The same mask as a dense (T, T) bool tensor, True = attend: the CPU path, and evaluation on CUDA."""
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]  # (T, T): query index - key index
    return (diff >= 0) & (diff < window)


def window_kernel_for(setting: str, device_type: str, grad_enabled: bool) -> str:
    """The kernel for window layers: "flex" or "dense" as set, or for "auto": FlexAttention when training
    on CUDA (compiled once per curriculum shape), dense-mask SDPA otherwise. Evaluation (no grad) sees a new
    batch shape at almost every call (CORE, chat_eval, generation), and a compiled flex kernel recompiles
    for each until it falls back to an unfused path that materialises the scores; the dense-mask path runs
    SDPA's memory-efficient kernel on CUDA (never a T x T score matrix: masked_attention) at a full layer's
    cost, which evaluation can afford."""
    if setting != "auto":
        return setting
    return "flex" if device_type == "cuda" and grad_enabled else "dense"


_compiled_flex = None


def _flex(q, k, v, block_mask: BlockMask, enable_gqa: bool) -> torch.Tensor:
    """flex_attention, compiled on CUDA. Unfused (eager) flex materialises the scores, so on CUDA we always
    call a compiled flex: inside an outer torch.compile region the plain function is traced and fused there;
    outside one, a lazily created torch.compile(flex_attention) is used. Eager flex is only for CPU tests."""
    global _compiled_flex
    if q.is_cuda and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: BlockMask | torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention. q: (B, H, T, D); k, v: (B, Hkv, T, D) with H % Hkv == 0 -> (B, H, T, D).

    mask None = global causal; a BlockMask = FlexAttention; a bool (T, T) tensor = SDPA with that mask.
    """
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, BlockMask):
        return _flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    return masked_attention(q, k, v, mask)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA with an explicit boolean mask (True = attend), broadcast over batch and heads.

    On CUDA, with a mask, only SDPA's math backend is sure to take enable_gqa, and it materialises
    (B, H, T, S) fp32 scores: 4.7 GB for 32 rows of 2048 at 9 heads. Repeating the kv heads instead (a
    B x H x S x D copy, small) keeps the memory-efficient kernel, which never forms the scores."""
    gqa = q.size(1) != k.size(1)
    if gqa and q.is_cuda:
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# ----------------------------------------------------------------------------------------------------------
# Generation with a KV cache. A new token's keys and values never change once computed (attention is causal),
# so generation keeps them per layer and runs the model on the new tokens only: one token per step instead of
# the whole context. Rotary positions of the new tokens start at the cache position. Training never comes
# here (kv_cache=None keeps the path above untouched).


class KVCache:
    """Keys and values of the positions seen so far, per layer k, v: (B, Hkv, max_len, D).

    `pos` is the number of filled positions, i.e. the absolute position of the next token fed. A layer's
    buffers are allocated at its first `update` with the dtype and device of its keys (bf16 under CUDA
    autocast, fp32 on CPU), so the cache needs nothing from the model up front. `GPT.forward(idx,
    kv_cache=cache)` advances `pos` by idx's T after the last layer.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        # smear: the normalised embedding of the last position fed (B, 1, C), which the next token mixes in
        self.prev_embedding: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at positions pos..pos+T-1 -> all keys and values (B, Hkv, pos+T, D)."""
        B, Hkv, T, D = k.shape
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len}")
        if layer not in self.k:
            self.k[layer] = k.new_zeros(B, Hkv, self.max_len, D)
            self.v[layer] = v.new_zeros(B, Hkv, self.max_len, D)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int,
                     window: int | None) -> torch.Tensor:
    """Attention of new queries over cached + new keys. q: (B, H, T, D) at positions pos..pos+T-1;
    k, v: (B, Hkv, pos+T, D) at positions 0..pos+T-1 -> (B, H, T, D).

    Query p sees key s when s <= p and, in a window layer, p - s < window (the training masks' rule). One new
    token (decoding) sees every key there is, or the last `window`: a slice, no mask. Several new tokens
    (a prompt, an injected tool output) need the explicit (T, pos+T) mask: SDPA's is_causal aligns the
    triangle to the top-left corner, which is wrong once pos > 0.
    """
    gqa = q.size(1) != k.size(1)
    T, S = q.size(2), k.size(2)
    if T == 1:
        if window is not None:
            k, v = k[:, :, -window:], v[:, :, -window:]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # (T, S) bool, built without an int64 (T, S) index grid: row t is query position p = pos + t, which sees
    # key s when s <= p (tril at diagonal pos) and, in a window layer, s > p - window.
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril_(pos)
    if window is not None:
        mask &= ~torch.ones(T, S, dtype=torch.bool, device=q.device).tril_(pos - window)
    return masked_attention(q, k, v, mask)


# ----------------------------------------------------------------------------------------------------------
# The network


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.qk_norm = config.qk_norm
        C = config.model_dim
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        # one gate per kv head, read from the first few channels of the input (cheap: 12 x Hkv weights)
        self.ve_gate_channels, self.ve_gate_scale = config.ve_gate_channels, config.ve_gate_scale
        self.qk_scale = config.qk_scale
        has_ve = layer_idx in config.value_embed_layers()
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None
        self.layer_idx, self.window = layer_idx, config.layer_windows()[layer_idx]  # for the KV-cache path

    def forward(self, x, ve, cos_sin, mask, kv_cache: KVCache | None = None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)

        if ve is not None:  # value residual: v += gate * value_embedding(token), gate in (0, ve_gate_scale)
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)

        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if self.qk_norm:  # rotation preserves the norm, so norm-after-rotary = rotary-after-norm
            q, k = norm(q), norm(k)
        if self.qk_scale != 1.0:  # split between q and k: logits scale by qk_scale^2 (1.44 at 1.2)
            q, k = q * self.qk_scale, k * self.qk_scale
        # Attention kernels want one dtype: that of the projections (bf16 under autocast, fp32 on CPU).
        q, k, v = (t.transpose(1, 2).to(v.dtype) for t in (q, k, v))  # (B, nh, T, D)
        if kv_cache is None:
            y = causal_attention(q, k, v, mask)  # (B, H, T, D)
        else:  # generation: x holds only the new tokens; the cache holds the keys/values before them
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, pos+T, D)
            y = cached_attention(q, k, v, kv_cache.pos, self.window)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.model_dim
        self.c_fc = nn.Linear(C, 4 * C, bias=False)
        self.c_proj = nn.Linear(4 * C, C, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, mask, kv_cache: KVCache | None = None):
        x = x + self.attn(norm(x), ve, cos_sin, mask, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    """Build on 'meta' (or CPU), move with to_empty(device=...), then call init_weights().

    `window_kernel` picks the kernel for sliding-window layers: "auto" (FlexAttention on CUDA, dense-mask
    SDPA elsewhere), "flex" or "dense" (tests compare the two on CPU).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.window_kernel = "auto"
        V, C = config.padded_vocab_size, config.model_dim
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.depth)])
        self.lm_head = nn.Linear(C, V, bias=False)
        kv_dim = config.kv_heads * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embed_layers()})
        if config.resid_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.depth))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.depth))
        else:
            self.resid_lambdas = self.x0_lambdas = None
        if config.smear:  # a 24 -> 1 gate and its overall strength (AdamW, like the scalars)
            self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        else:
            self.smear_gate = self.smear_lambda = None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self._windows = config.layer_windows()
        # Rotary tables are derived data: not saved in checkpoints, recomputed by init_weights (after to_empty).
        cos, sin = self._rotary_tables(self.max_positions, device=self.wte.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # ------------------------------------------------------------------------------------------------------
    # init

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer; deterministic under torch.manual_seed.

        All values below are nanochat's init_weights (nanochat/gpt.py), each behind its GPTConfig switch:
        wte ~ N(0, wte_init_std = 0.8)  (it is RMS-normalised right away, so the std only sets how large
            Adam's steps are relative to it)
        lm_head ~ N(0, 0.001)  (near-zero logits at init: the initial loss is ~ln V)
        c_q, c_k, c_v, value embeddings ~ U(-a, a) with a = sqrt(3 / C), i.e. std 1/sqrt(C); uniform
            avoids the outliers of a normal; c_fc ~ U(-fc_init_scale a, fc_init_scale a) (0.4 a)
        attn.c_proj, mlp.c_proj = 0 when zero_init_proj (else uniform with std 1/sqrt(fan_in))
        ve_gate ~ U(0, ve_gate_init = 0.02) (0: zeros); smear_gate ~ U(0, 0.02), smear_lambda = 0 (smear is
            off at init), backout_lambda = 0.2
        resid_lambdas, x0_lambdas: ramps 1.15 -> 1.05 and 0.20 -> 0.05 over depth (lambda_init: ramp) or
            1.0 and 0.1 (flat)
        Then the embeddings are cast to embedding_dtype.
        """
        cfg = self.config
        C = cfg.model_dim
        a = (3 / C) ** 0.5
        nn.init.normal_(self.wte.weight, mean=0.0, std=cfg.wte_init_std)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            for w in (attn.c_q.weight, attn.c_k.weight, attn.c_v.weight):
                nn.init.uniform_(w, -a, a)
            nn.init.uniform_(mlp.c_fc.weight, -a * cfg.fc_init_scale, a * cfg.fc_init_scale)
            for w in (attn.c_proj.weight, mlp.c_proj.weight):
                if self.config.zero_init_proj:
                    nn.init.zeros_(w)
                else:
                    bound = (3 / w.size(1)) ** 0.5
                    nn.init.uniform_(w, -bound, bound)
            if attn.ve_gate is not None:
                nn.init.uniform_(attn.ve_gate.weight, 0.0, cfg.ve_gate_init)  # U(0, 0) = zeros
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -a, a)
        if self.resid_lambdas is not None:
            if cfg.lambda_init == "ramp":
                frac = torch.arange(cfg.depth, dtype=torch.float32) / max(cfg.depth - 1, 1)  # 0 .. 1 over layers
                self.resid_lambdas.copy_(1.15 - 0.10 * frac)  # a stronger residual early, weaker deep
                self.x0_lambdas.copy_(0.20 - 0.15 * frac)  # more of the embedding fed back early
            else:
                self.resid_lambdas.fill_(1.0)  # plain residual at init
                self.x0_lambdas.fill_(0.1)  # a little of the embedding fed back into every layer
        if self.smear_gate is not None:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.zero_()
        if self.backout_lambda is not None:
            self.backout_lambda.fill_(0.2)
        dtype = EMBEDDING_DTYPES[cfg.embedding_dtype]
        self.wte.to(dtype=dtype)
        for ve in self.value_embeds.values():
            ve.to(dtype=dtype)
        self.cos, self.sin = self._rotary_tables(self.max_positions, device=self.wte.weight.device)

    @property
    def max_positions(self) -> int:
        """The longest sequence the model can read: its rotary table (ROTARY_HEADROOM x sequence_len).
        Training uses sequence_len; evaluation may score longer prompts, as the reference does."""
        return ROTARY_HEADROOM * self.config.sequence_len

    def _rotary_tables(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin of shape (1, T, 1, D/2); frequencies base^(-2i/D) (RoFormer)."""
        D = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
        t = torch.arange(T, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (T, D/2)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    # ------------------------------------------------------------------------------------------------------
    # accounting

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The optimizer's view: "matrix" (2-D block weights -> Muon), "embedding" (token + value embeddings),
        "lm_head", "scalar" (per-layer lambdas, the smear gate and lambda, backout's lambda) -> AdamW. Every
        parameter is in exactly one group."""
        scalars = [self.resid_lambdas, self.x0_lambdas, getattr(self.smear_gate, "weight", None),
                   self.smear_lambda, self.backout_lambda]
        groups = {
            "matrix": list(self.blocks.parameters()),
            "embedding": [self.wte.weight, *(ve.weight for ve in self.value_embeds.values())],
            "lm_head": [self.lm_head.weight],
            "scalar": [p for p in scalars if p is not None],
        }
        assert all(p.ndim == 2 for p in groups["matrix"])
        assert sum(len(g) for g in groups.values()) == len(list(self.parameters()))
        return groups

    def num_params(self) -> dict[str, int]:
        """Parameter counts: total, per optimizer group, plus wte / value_embeds and matmul (matrix + lm_head,
        the parameters that cost FLOPs). Padded vocab rows are counted: they exist and are optimised."""
        counts = {name: sum(p.numel() for p in ps) for name, ps in self.param_groups().items()}
        counts["wte"] = self.wte.weight.numel()
        counts["value_embeds"] = counts["embedding"] - counts["wte"]
        counts["matmul"] = counts["matrix"] + counts["lm_head"]
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def estimate_flops(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), counted as nanochat does so MFU figures compare.

        6 per matmul weight (2 forward, 4 backward; embeddings are lookups, not matmuls; the lm_head counts),
        plus 12 * H * D * T_eff per layer for QK^T and AV (PaLM, arXiv:2204.02311, App. B), where T_eff = T
        for global layers and min(window, T) for window layers. The causal half is not discounted.
        seq_len defaults to config.sequence_len (pass the current T under a sequence-length curriculum).
        """
        T = self.config.sequence_len if seq_len is None else seq_len
        H, D = self.config.n_head, self.config.head_dim
        attn = sum(12 * H * D * (T if w is None else min(w, T)) for w in self._windows)
        return float(6 * self.num_params()["matmul"] + attn)

    # ------------------------------------------------------------------------------------------------------
    # forward

    @torch.compiler.disable
    def _window_masks(self, T: int, device: torch.device) -> list:
        """Per layer: None (global) or the mask object its kernel needs. Masks are cached per (T, window).
        Kept out of torch.compile graphs (Python-side caching): a compiled model sees one graph break here,
        and only when the pattern has S layers."""
        kernel = window_kernel_for(self.window_kernel, device.type, torch.is_grad_enabled())
        build = sliding_window_block_mask if kernel == "flex" else sliding_window_dense_mask
        return [None if w is None or w >= T else build(T, w, device) for w in self._windows]

    def _trunk(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> residual stream after the last block, before the final norm: (B, T, C)."""
        B, T = idx.size()
        if T > self.cos.size(1):
            raise ValueError(f"sequence of {T} tokens is longer than the rotary table ({self.cos.size(1)} positions "
                             f"= {ROTARY_HEADROOM} x config.sequence_len)")
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        if any(w is not None for w in self._windows):
            masks = self._window_masks(T, idx.device)
        else:  # all global: no masks, and no graph break under torch.compile
            masks = [None] * len(self.blocks)
        x = self._embed(idx, None)  # (B, T, C)
        x0, x_mid = x, None
        for i, block in enumerate(self.blocks):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None  # (B, T, Hkv*D)
            if self.training and getattr(self, "activation_checkpointing", False):
                # Activation checkpointing (set by the trainer, not a GPTConfig field): keep only the block's
                # inputs, recompute its activations in backward, one block at a time (~1/3 more FLOPs).
                x = torch.utils.checkpoint.checkpoint(block, x, ve, cos_sin, masks[i], use_reentrant=False)
            else:
                x = block(x, ve, cos_sin, masks[i])
            if i == self.config.backout_layer:
                x_mid = x
        return self._backout(x, x_mid)

    def _embed(self, idx: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """Token ids (B, T) -> the normalised embeddings (B, T, C) in fp32, smeared when config.smear.

        prev (B, 1, C): the normalised embedding of the position before idx[:, 0] (generation with a KV
        cache), or None when idx[:, 0] is the first position (it then gets nothing mixed in)."""
        x = norm(self.wte(idx).float())  # fp32 residual stream whatever the table's dtype
        if self.smear_gate is None:
            return x
        shifted = x[:, :-1] if prev is None else torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        cur = x[:, 1:] if prev is None else x  # the positions that have a predecessor
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(cur[..., :self.config.smear_channels]))  # (B, T', 1)
        mixed = cur + gate.to(cur.dtype) * shifted
        return mixed if prev is not None else torch.cat([x[:, :1], mixed], dim=1)

    def _backout(self, x: torch.Tensor, x_mid: torch.Tensor | None) -> torch.Tensor:
        """x - backout_lambda * x_mid (the stream after block depth // 2) when config.backout."""
        if self.backout_lambda is None or x_mid is None:
            return x
        return x - self.backout_lambda.to(x.dtype) * x_mid

    def _trunk_cached(self, idx: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """_trunk for generation: idx (B, T) are the tokens at positions kv_cache.pos .. pos+T-1, attending
        also to the cached positions before them -> (B, T, C). Advances kv_cache.pos by T."""
        B, T = idx.size()
        pos = kv_cache.pos
        if pos + T > self.cos.size(1):
            raise ValueError(f"position {pos + T} is beyond the rotary table ({self.cos.size(1)} positions)")
        cos_sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]  # rotary angles of the absolute positions
        prev = kv_cache.prev_embedding if pos > 0 else None
        if self.smear_gate is not None:  # what the token after these mixes in (before smearing, as training)
            kv_cache.prev_embedding = norm(self.wte(idx[:, -1:]).float())
        x = self._embed(idx, prev)  # (B, T, C)
        x0, x_mid = x, None
        for i, block in enumerate(self.blocks):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None  # (B, T, Hkv*D)
            x = block(x, ve, cos_sin, None, kv_cache)
            if i == self.config.backout_layer:
                x_mid = x
        kv_cache.pos += T
        return self._backout(x, x_mid)

    def hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> the normalised final hidden states (B, T, C) that the lm_head reads.

        Evaluation runs this once and applies `head` to the positions it needs, a chunk at a time
        (daychat.eval.scoring), so it never holds fp32 logits for a whole batch."""
        return norm(self._trunk(idx) if kv_cache is None else self._trunk_cached(idx, kv_cache))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> fp32 softcapped logits (..., V), padding rows cropped.

        Under no_grad (evaluation) the softcap runs in place on the fp32 copy: the same values, one fp32
        buffer instead of three alive at once. With gradients it is out of place, as autograd needs."""
        logits = self.lm_head(x)  # (..., V_padded); bf16 under autocast
        logits = logits[..., :self.config.vocab_size].float()  # crop the padding; fp32 from here on
        if self.config.softcap > 0:
            c = self.config.softcap
            if torch.is_grad_enabled():
                logits = c * torch.tanh(logits / c)  # smoothly bounded to (-c, c)
            else:  # a copy only where the crop left a view of an fp32 lm_head output (CPU, padded vocab)
                logits = logits.contiguous()
                logits.div_(c).tanh_().mul_(c)
        return logits

    def head_columns(self, x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, C) -> fp32 softcapped logits of the given vocab `columns` only (N, len(columns)):
        what letter scoring needs, without the other ~32k columns. Equal to head(x)[:, columns] up to the
        float summation order of a smaller matmul."""
        logits = F.linear(x, self.lm_head.weight[columns]).float()  # (N, K); bf16 matmul under autocast
        if self.config.softcap > 0:
            c = self.config.softcap
            logits = c * torch.tanh(logits / c)
        return logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_reduction: str = "mean", kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> fp32 softcapped logits (B, T, V); with targets (B, T) -> cross-entropy loss.

        With a kv_cache (generation), idx holds only the tokens after the cached positions; see KVCache.

        Targets equal to -1 are ignored. loss_reduction: "mean" (scalar), "sum" (scalar) or "none" (B, T)
        per-token losses (0 where ignored), which bits-per-byte needs. This is the training path: it holds
        the whole batch's fp32 logits, as the backward needs them; evaluation scores through `hidden` and
        `head` in chunks instead (daychat.eval.scoring).
        """
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        B, T = idx.size()
        logits = self.head(self.hidden(idx, kv_cache))  # (B, T, V) fp32
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss
