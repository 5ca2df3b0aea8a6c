"""Peak training memory of the daychat GPT, from the config alone (no model is built).

    est = estimate_memory(GPTConfig(vocab_size=32768, depth=20), device_batch=4, seq_len=2048)
    est.total_bytes, est.describe()       # bytes at the peak of one training step, and one line in GiB
    largest_fit(config, seq_len, budget_bytes)   # the largest device_batch whose peak fits a budget

What is counted (every term below says where it comes from in the code):

- static, for the whole run: master weights (gpt.py: fp32, but the token and value embeddings in
  config.embedding_dtype, bf16 on CUDA by default), gradients (a .grad has its parameter's dtype),
  optimizer state (daychat/optim: AdamW exp_avg + exp_avg_sq in the parameter's dtype, for embeddings,
  lm_head and scalars; Muon one fp32 momentum buffer per block matrix plus NorMuon's factored second
  moment, one fp32 per row or column);
- per micro-batch, at the start of backward: the activations autograd saves for backward, per layer per
  token (by precision; eager vs torch.compile; with or without activation checkpointing), the logits
  buffers (fp32 logits, softcap and cross-entropy and their gradients: at a 32k vocabulary these are as
  large as a dozen layers), the bf16 copies of the weights autocast makes, and the fresh gradient of the
  lm_head that gradient accumulation adds into .grad;
- the optimizer step's temporaries (Muon stacks every matrix of one shape and orthogonalises the stack:
  ~4 copies of the largest stack on CUDA, 1/3 of the block matrices each), which peak after the
  activations are freed: the step peak is max(backward, optimizer step). At d26 with a 32k vocabulary
  this is 4.3 GiB;
- slack: the CUDA context and the caching allocator's fragmentation on a GPU; on a CPU, scratch buffers.

The peak assumes gradient accumulation (>= 2 micro-batches a step, as every real recipe has): from the
second micro-batch on, all gradients are held while the activations are. It also assumes the optimizer
state exists (any step after the first). With one micro-batch the true peak is a little lower.

Validated on CPU (fp32, eager) against measured peaks of real training steps: bench/memory.py writes the
error table to reports/bench/memory.json; tests/test_memory.py checks a small grid. The bf16 / compile
terms are derived from what autograd and Inductor's min-cut partitioner save (comments below) and are
checked on CUDA by the probe stage (measured max_memory_allocated vs this estimate, per config).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daychat.model.accounting import param_counts
from daychat.model.gpt import GPTConfig

GiB = 2 ** 30
FP32, BF16 = 4, 2

# A CUDA process holds its context, cuBLAS/cuDNN workspaces and kernel images outside PyTorch's allocator:
# ~0.3-0.6 GiB on Ada/Hopper with torch 2.x (nvidia-smi minus torch.cuda.memory_reserved); we take 0.5.
CUDA_CONTEXT_BYTES = GiB // 2
# The caching allocator rounds blocks and keeps freed ones; with expandable_segments (stages/pretrain.py
# sets it) fragmentation stays within a few percent of the per-step (dynamic) memory. 5% is our margin.
CUDA_FRAGMENTATION = 0.05
# On a CPU (measured, bench/memory.py): oneDNN / OpenMP scratch and glibc arena overhead, a fixed amount.
CPU_SCRATCH_BYTES = 16 * 2 ** 20


@dataclass
class MemoryEstimate:
    """Bytes per part at the peak of a training step; `phase` says when the peak happens."""

    breakdown: dict[str, int]
    phase: str = "backward"  # "backward" (activations held) or "optimizer step" (Muon's temporaries)
    detail: dict[str, float] = field(default_factory=dict)  # per-token figures, for reports and tests

    @property
    def total_bytes(self) -> int:
        return int(sum(self.breakdown.values()))

    @property
    def allocated_bytes(self) -> int:
        """What torch.cuda.max_memory_allocated would show: the total without the CUDA context."""
        return self.total_bytes - self.breakdown.get("cuda_context", 0)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in self.breakdown.items() if value)
        return f"{self.total_bytes / GiB:.2f} GiB at the {self.phase} peak ({parts} GiB)"


def matrix_shapes(config: GPTConfig) -> list[tuple[int, int]]:
    """(rows, cols) of every Muon matrix, as nn.Linear stores them (out_features, in_features)."""
    C, HD, kvd = config.model_dim, config.n_head * config.head_dim, config.kv_heads * config.head_dim
    ve_layers = set(config.value_embed_layers())
    shapes = []
    for i in range(config.depth):
        shapes += [(HD, C), (kvd, C), (kvd, C), (C, HD), (4 * C, C), (C, 4 * C)]  # c_q c_k c_v c_proj c_fc c_proj
        if i in ve_layers:
            shapes.append((config.kv_heads, config.ve_gate_channels))
    return shapes


def embedding_bytes(config: GPTConfig) -> int:
    """Bytes per element of the token and value embeddings (GPTConfig.embedding_dtype)."""
    return BF16 if config.embedding_dtype == "bf16" else FP32


def static_bytes(config: GPTConfig) -> dict[str, int]:
    """Weights, gradients and optimizer state: allocated once, held for the whole run."""
    p = param_counts(config)
    E = embedding_bytes(config)
    rest = p["total"] - p["embedding"]  # block matrices, lm_head, scalars: fp32
    # NorMuon's second moment is (rows, 1) for tall/square and (1, cols) for wide matrices (optim/muon.py).
    normuon = sum(max(r, c) for r, c in matrix_shapes(config))
    return {
        "weights": FP32 * rest + E * p["embedding"],  # fp32 master weights, embeddings in embedding_dtype
        "grads": FP32 * rest + E * p["embedding"],  # .grad has the parameter's dtype
        # AdamW (optim/adamw.py): exp_avg + exp_avg_sq in the parameter's dtype; Muon: momentum_buffer
        # (zeros_like the parameter) + the factored fp32 second moment.
        "optimizer": 2 * E * p["embedding"] + 2 * FP32 * (p["lm_head"] + p["scalar"]) + FP32 * p["matrix"]
                     + FP32 * normuon,
    }


def layer_bytes_per_token(config: GPTConfig, has_ve: bool, precision: str, compile: bool) -> int:
    """Bytes autograd keeps per token for one transformer block (and the residual mixing before it), from
    the forward until its backward. C = model_dim, HD = query width, kvd = key/value width.

    fp32 eager, one entry per saved tensor (gpt.py, in order):
      x_prev        the previous block's output, saved by resid_lambdas[i] * x             C
      x_in          the mixed block input, saved by rms_norm                              C  (resid_lambdas)
      h1 = norm     saved by c_q / c_k / c_v (input of a matmul)                          C
      v             c_v's output, saved by SDPA (q, k are freed once rotated: cos and sin   kvd
                    need no grad, so x1 * cos saves only cos); with a value embedding v is
                    replaced by v + gate * ve, same size, and the looked-up ve is saved by the
                    gate multiply: + kvd
      rotary cat    q, k after rotation, saved by the qk rms_norm                          HD + kvd
      qn, kn        normed q, k, saved by SDPA (CPU/CUDA flash: q, k, v, out, logsumexp)   HD + kvd
      attn out      SDPA's output, saved by its backward                                   HD
      y             transpose + reshape copy, saved by c_proj                              HD
      x_mid         x + attn, saved by the second rms_norm                                 C
      h2            norm(x_mid), saved by c_fc                                             C
      relu(fc)      saved by relu (its output) and square (its input)                      4C
      relu^2        saved by the MLP's c_proj                                              4C
    = 6C + 5HD + 4kvd (+ kvd with a value embedding) floats: 20C for MHA.

    bf16 autocast, eager: the residual stream (x_prev, x_in, x_mid) stays fp32 (wte is fp32, block outputs
    are fp32 + bf16 = fp32); each Linear casts its fp32 input to bf16 and saves that copy, so h1 is saved
    three times (c_q, c_k, c_v); the rotary math promotes to fp32 and is cast back; the qk rms_norm runs in
    fp32 (autocast's fp32 list) and saves its fp32 input; everything else is bf16.

    bf16 under torch.compile: Inductor's min-cut partitioner saves matmul inputs/outputs in bf16 and
    recomputes the cheap pointwise work (norms, rotary, relu^2 inputs) in the backward: x_prev (fp32),
    x_mid (fp32), h1, h2, q, k, v, qn, kn, attn out, c_fc out and relu^2 (bf16), counted conservatively
    (the partitioner may recompute qn, kn and relu^2 too).
    """
    C, HD, kvd, H = config.model_dim, config.n_head * config.head_dim, config.kv_heads * config.head_dim, config.n_head
    mix = 1 if config.resid_lambdas else 0
    # per-token fp32 scalars: rstd of 2 block norms + H + Hkv qk norms, SDPA's logsumexp per head
    small = FP32 * (2 + H + config.kv_heads + H)
    if precision == "fp32":
        floats = (1 + mix) * C + C + kvd + (HD + kvd) * 2 + 2 * HD + 2 * C + 8 * C
        floats += kvd if has_ve else 0
        if compile:  # the same saved set, minus what Inductor recomputes (rotary cat, y copy, x_in, relu input)
            floats -= (HD + kvd) + HD + mix * C + 4 * C
        return FP32 * floats + small
    if compile:
        b = (FP32 * C                       # x_prev (x_in is recomputed from it and x0)
             + BF16 * C                     # h1
             + BF16 * (HD + 2 * kvd)        # q, k, v (v after the value embedding)
             + BF16 * (HD + kvd)            # qn, kn
             + BF16 * HD                    # attn out (y is a view of it for c_proj)
             + FP32 * C                     # x_mid
             + BF16 * C                     # h2
             + BF16 * 4 * C * 2)            # c_fc out, relu^2
        b += BF16 * kvd if has_ve else 0  # the looked-up value embedding, cast to bf16
        return b + small
    b = (FP32 * (1 + mix) * C               # x_prev, x_in
         + 3 * BF16 * C                     # h1 cast once per Linear (c_q, c_k, c_v)
         + BF16 * (HD + 2 * kvd)            # q, k, v
         + FP32 * (HD + kvd)                # fp32 input of the qk rms_norm (rotary output, promoted)
         + BF16 * (HD + kvd)                # qn, kn cast back to bf16 for SDPA
         + BF16 * 2 * HD                    # attn out, y copy
         + FP32 * C                         # x_mid
         + BF16 * C                         # h2 cast for c_fc
         + BF16 * 4 * C * 2)                # relu(fc), relu^2
    b += BF16 * kvd if has_ve else 0  # ve cast to bf16 and saved by the gate multiply
    return b + small


def logits_bytes_per_token(config: GPTConfig, precision: str, compile: bool) -> int:
    """Logit buffers per token at their peak, the first step of backward (V = vocab_size, Vp padded).

    Eager (fp32 or bf16 autocast): forward saves tanh's output (softcap backward) and log_softmax's
    output (cross-entropy backward), fp32 V each; the backward then holds the gradient of log_softmax's
    output and of its input at the same time: 4 fp32 V. Under autocast the lm_head output is bf16 (2 Vp)
    and is cast to fp32 by .float() (the bf16 copy is freed at once), so the peak is the same.
    torch.compile fuses crop, .float(), softcap and log_softmax into one kernel that keeps the fp32
    softcapped logits (4 V) and writes the gradient in fp32 then bf16 for the lm_head matmul (4 V + 2 Vp).
    The softcap off saves one fp32 V in eager mode.
    """
    V, Vp = config.vocab_size, config.padded_vocab_size
    if compile and precision != "fp32":
        return FP32 * V + FP32 * V + BF16 * Vp
    floats = 4 * V if config.softcap > 0 else 3 * V
    return FP32 * floats


def estimate_memory(config: GPTConfig, device_batch: int, seq_len: int, *, precision: str = "bf16",
                    compile: bool = True, activation_checkpointing: bool = False,
                    device: str = "cuda", ema: bool = False) -> MemoryEstimate:
    """Peak bytes of one training micro-batch of `device_batch` rows of `seq_len` tokens (plus the step).

    precision: "bf16" (autocast over fp32 weights) or "fp32" ("auto" = bf16 on CUDA, fp32 on CPU);
    compile: torch.compile (the training loop uses it on CUDA only, so it is ignored for device "cpu").
    ema: an exponential moving average of the weights is kept (daychat/train/ema.py: one fp32 copy of
    every parameter on the device).
    """
    if device_batch < 1 or seq_len < 1:
        raise ValueError(f"device_batch and seq_len must be >= 1, got {device_batch}, {seq_len}")
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16, fp32 or auto, got {precision!r}")
    compile = compile and device == "cuda"  # daychat.train.loop compiles on CUDA only
    N = device_batch * seq_len  # tokens in a micro-batch
    C, H, kvd = config.model_dim, config.n_head, config.kv_heads * config.head_dim
    p = param_counts(config)
    parts = static_bytes(config)
    parts["rotary"] = rotary_bytes(config)
    if ema:
        parts["ema"] = FP32 * p["total"]

    # Activations: per layer per token, plus the embedding (wte output saved by rms_norm, x0 saved by every
    # layer's x0_lambdas multiply) and the final norm's output saved by lm_head (bf16 copy under autocast).
    # Smear keeps the normalised embedding from before the smear alive (its gate and the product with the
    # previous position save views of it) beside the smeared x0: one more fp32 C. Backout adds nothing
    # net: the final norm saves x - lambda x_mid instead of the last block's output, and x_mid is the next
    # layer's saved input anyway.
    ve_layers = set(config.value_embed_layers())
    per_layer = [layer_bytes_per_token(config, i in ve_layers, precision, compile) for i in range(config.depth)]
    head_in = FP32 * C if precision == "fp32" else BF16 * C
    outside = 2 * FP32 * C + head_in + (FP32 * C if config.smear else 0)
    if activation_checkpointing:
        # torch.utils.checkpoint keeps each block's inputs (x_in fp32, its value embedding fp32) and the
        # block output stays saved by the next layer's mixing; backward recomputes one block at a time, so
        # one layer's full set is alive on top (the largest, a value-embedding layer if there is one).
        kept = [FP32 * C * (2 if config.resid_lambdas else 1) + (FP32 * kvd if i in ve_layers else 0)
                for i in range(config.depth)]
        act_per_token = sum(kept) + max(per_layer) + outside
    else:
        act_per_token = sum(per_layer) + outside
    # Window layers on a CPU run SDPA with a dense (T, T) mask (gpt.py): the math path keeps the (B, H, T, T)
    # attention weights and its gradient (not validated: the CPU is a test device). FlexAttention on CUDA
    # never forms them.
    dense = sum(1 for w in config.layer_windows() if w is not None and w < seq_len) if device != "cuda" else 0
    act_per_token += dense * 2 * FP32 * H * seq_len
    activations = act_per_token * N
    logits = logits_bytes_per_token(config, precision, compile) * N
    # bf16 copies of every matmul weight for the micro-batch: autocast's cast cache (eager) or the casts a
    # compiled graph saves for the backward's dX = dY W.
    weight_casts = BF16 * p["matmul"] if precision == "bf16" else 0
    # Gradient accumulation: from the 2nd micro-batch on, each parameter's new gradient is computed and
    # then added into .grad; the lm_head's (Vp x C, the largest) arrives while the logit buffers are alive.
    accumulate = FP32 * p["lm_head"]
    backward = activations + logits + weight_casts + accumulate

    # Optimizer step (activations freed). Muon (optim/muon.py) works on one stack of same-shape matrices at
    # a time (S = the largest stack's fp32 bytes) and holds the Nesterov updates (torch._foreach_lerp, S) and
    # their torch.stack (S) through the Polar Express loop, whose iteration keeps X, B @ X, a * X and the new
    # X. In bf16 on CUDA those are S/2 each: 4 S in all, the same as NorMuon's U, scaled and rescaled copies
    # afterwards. In fp32 on a CPU they are S each, plus the norm's temporary: measured ~8 S (bench/memory.py,
    # the optimizer-step-bound config d12-v1k-wide).
    # AdamW (optim/adamw.py) goes one tensor at a time: an fp32 tensor needs one temporary (the
    # denominator; the squared gradient is freed before it), a bf16 one its fp32 copies of the parameter,
    # gradient and both moments plus the denominator: 5 fp32 copies of the largest embedding table.
    stacks: dict[tuple[int, int], int] = {}
    for r, c in matrix_shapes(config):
        stacks[(r, c)] = stacks.get((r, c), 0) + r * c
    muon_tmp = (4 if device == "cuda" else 8) * FP32 * max(stacks.values())
    largest_table = max(p["wte"], config.kv_heads * config.head_dim * config.padded_vocab_size if ve_layers else 0)
    adam_tmp = max(FP32 * p["lm_head"], (5 if embedding_bytes(config) != FP32 else 1) * FP32 * largest_table)
    step = max(muon_tmp, adam_tmp)

    if backward >= step:
        parts.update(weight_casts=weight_casts, activations=activations, logits=logits, accumulate=accumulate)
        phase, dynamic = "backward", backward
    else:
        parts.update(optimizer_step=step)
        phase, dynamic = "optimizer step", step
    if device == "cuda":
        parts["fragmentation"] = int(CUDA_FRAGMENTATION * dynamic)
        parts["cuda_context"] = CUDA_CONTEXT_BYTES
    else:
        parts["scratch"] = CPU_SCRATCH_BYTES
    detail = {"activation_bytes_per_token": act_per_token, "logit_bytes_per_token": logits / N,
              "tokens": N, "backward_bytes": backward, "step_bytes": step, "weight_casts": weight_casts,
              "activations": activations, "logits": logits, "accumulate": accumulate}
    return MemoryEstimate(breakdown={k: int(v) for k, v in parts.items()}, phase=phase, detail=detail)


def largest_fit(config: GPTConfig, seq_len: int, budget_bytes: float, *, max_batch: int = 4096, **kwargs) -> int:
    """The largest device_batch whose estimated peak is <= budget_bytes at seq_len (0 if not even 1 fits).
    kwargs go to estimate_memory (precision, compile, activation_checkpointing, device)."""
    def fits(b: int) -> bool:
        return estimate_memory(config, b, seq_len, **kwargs).total_bytes <= budget_bytes

    return largest_true(fits, 1, max_batch)


def largest_true(fits, lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with fits(n), for a `fits` that is true up to some n and false after (the
    peak grows with the batch): bisection. 0 when not even fits(lo)."""
    if not fits(lo):
        return 0
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------------------------------------
# Evaluation and generation: no gradients, no saved activations. What a forward under torch.no_grad keeps
# is the few tensors alive at once inside one block, plus what the phase holds for the whole pass (the model,
# and during pretraining the optimizer state). Validated on CPU (fp32, eager) by bench/memory.py's scoring
# configs and the rehearsal (daychat/plan/rehearse.py); the bf16 terms follow the same walk with autocast's
# dtypes.

# Measured on CPU (bench/memory.py, scoring configs): a no-grad forward's fixed overhead beyond its tensors
# (oneDNN and SDPA scratch), ~2.6 MiB whatever the batch; counted as 4 MiB.
CPU_INFERENCE_SCRATCH_BYTES = 4 * 2 ** 20
# Positions the head scores at once when nothing else is asked (daychat.eval.scoring.DEFAULT_CHUNK_ROWS).
HEAD_CHUNK_ROWS = 2048
# A scoring batch larger than this many tokens buys no speed on any card here (a 64k-token forward of a
# d17 is ~3 TFLOP of matmuls: tens of ms on a 4090), so the automatic budget stops there.
MAX_SCORING_TOKENS = 65536


def inference_bytes_per_token(config: GPTConfig, precision: str) -> int:
    """Peak bytes per token of the trunk's forward under no_grad (eager), at its worst point: the MLP of a
    value-embedding layer. Alive there (gpt.py, in order of allocation):

      x            the block input, still held by the caller's loop variable             C
      x'           x + attention, the block's own running sum                            C
      x0           the normalised embedding, fed to every layer                          C
      ve           the layer's looked-up value embedding (loop variable)                  kvd (VE layers)
      h            norm(x'), the MLP input                                               C
      fc, relu     c_fc's output and relu's, both alive while relu runs (then relu^2 replaces fc)   4C + 4C
      x_mid        with config.backout, the stream after block depth // 2, kept to the end           C

    (smear mixes the previous position's embedding in before the first block: its temporaries are gone
    before the blocks run.)

    fp32 (CPU): 4 bytes each = 4 (12 C + kvd); measured 13.65 C floats for MHA with value embeddings,
    12.67 C without (bench/memory.py), the rest a fixed scratch. bf16 autocast (CUDA): the residual stream,
    x0 and h stay fp32 (rms_norm runs in fp32), the value embedding is an fp32 lookup, the MLP's outputs
    are bf16, and c_fc reads a bf16 copy of h: 4 (4 C + kvd) + 2 C + 2 (8 C). Attention's tensors (q, k,
    v, the rotary copies, SDPA's output) are smaller than the MLP's for every shape here (H x D = C).
    """
    C, kvd = config.model_dim, config.kv_heads * config.head_dim
    ve = kvd if config.value_embeds else 0
    mid = C if config.backout else 0  # backout keeps the mid-depth stream (fp32) for the layers after it
    if precision == "fp32":
        return FP32 * (12 * C + ve + mid)
    return FP32 * (4 * C + ve + mid) + BF16 * C + BF16 * 8 * C


def head_bytes_per_row(vocab_size: int, padded_vocab: int | None = None, precision: str = "bf16") -> int:
    """Bytes per scored position while the head runs on a chunk (daychat.eval.scoring.losses_at): the fp32
    softcapped logits (the softcap runs in place under no_grad, GPT.head) and cross-entropy's fp32
    log-softmax, 8 V; under autocast the lm_head's bf16 output (2 Vp) is alive beside the fp32 copy before
    that, which is less. On CPU the crop of a padded vocabulary copies: 4 (Vp - V) more. Measured 8.0-8.4 V
    on CPU (bench/memory.py)."""
    Vp = padded_vocab or vocab_size
    extra = FP32 * (Vp - vocab_size) if precision == "fp32" else 0
    return max(FP32 * 2 * vocab_size, BF16 * Vp + FP32 * vocab_size) + extra


def weight_cast_bytes(config: GPTConfig, precision: str) -> int:
    """bf16 copies of the matmul weights that autocast makes and caches for the length of an autocast
    region (it caches casts of leaf tensors that require grad, which parameters do even under no_grad)."""
    return BF16 * param_counts(config)["matmul"] if precision == "bf16" else 0


def scoring_bytes(config: GPTConfig, tokens: int, *, precision: str, scored: int | None = None,
                  columns: int | None = None, head_rows: int = HEAD_CHUNK_ROWS) -> int:
    """Transient bytes of scoring one batch of `tokens` tokens (rows x padded width) through
    daychat.eval.scoring: the trunk's peak, or afterwards the kept final hidden states (fp32 C a token), a
    gathered copy of the `scored` positions' rows (None: every position, read in place: val bpb) and one
    head chunk of at most `head_rows` of them, over the whole vocabulary or only `columns` of it (letter
    scoring); whichever is larger."""
    C = config.model_dim
    trunk = inference_bytes_per_token(config, precision) * tokens
    n = tokens if scored is None else scored
    gathered = 0 if scored is None else FP32 * C * scored
    per_row = (head_bytes_per_row(config.vocab_size, config.padded_vocab_size, precision) if columns is None
               else 2 * FP32 * columns)
    head = per_row * min(head_rows, max(n, 1))
    return max(trunk, FP32 * C * tokens + gathered + head)


def rotary_bytes(config: GPTConfig) -> int:
    """The rotary tables, cos and sin fp32 for ROTARY_HEADROOM x sequence_len positions (gpt.py)."""
    from daychat.model.gpt import ROTARY_HEADROOM

    return 2 * FP32 * ROTARY_HEADROOM * config.sequence_len * (config.head_dim // 2)


def kv_cache_bytes(config: GPTConfig, max_len: int, precision: str, rows: int = 1) -> int:
    """The generation cache (gpt.KVCache): keys and values of every layer, (rows, Hkv, max_len, D) each, in
    the activations' dtype (bf16 under autocast, fp32 on CPU), allocated whole at the first forward."""
    size = BF16 if precision == "bf16" else FP32
    return 2 * config.depth * rows * config.kv_heads * max_len * config.head_dim * size


@dataclass
class Phase:
    """One GPU phase of a stage: what it holds for its whole length (`static`), its transient peak
    (`dynamic`), and the slack on top. `total_bytes` is what the card must hold."""

    name: str
    static: dict[str, int]
    dynamic: dict[str, int]
    device: str = "cuda"
    shape: str = ""  # e.g. "4 x 2048" or "32,768 tokens a batch"
    cpu_scratch: int = CPU_INFERENCE_SCRATCH_BYTES  # training's is CPU_SCRATCH_BYTES

    @property
    def slack(self) -> int:
        if self.device == "cuda":
            return int(CUDA_FRAGMENTATION * sum(self.dynamic.values())) + CUDA_CONTEXT_BYTES
        return self.cpu_scratch

    @property
    def total_bytes(self) -> int:
        return int(sum(self.static.values()) + sum(self.dynamic.values()) + self.slack)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in {**self.static, **self.dynamic}.items() if v)
        return f"{self.name} {self.total_bytes / GiB:.2f} GiB ({parts} GiB)"


def _precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def training_phases(config: GPTConfig, device_batch: int, seq_len: int, *, precision: str = "bf16",
                    compile: bool = True, activation_checkpointing: bool = False, device: str = "cuda",
                    ema: bool = False, prefix: str = "") -> list[Phase]:
    """The training step's two peaks as phases: forward + backward of a micro-batch (activations held) and
    the optimizer step (Muon's temporaries), from estimate_memory."""
    est = estimate_memory(config, device_batch, seq_len, precision=precision, compile=compile,
                          activation_checkpointing=activation_checkpointing, device=device, ema=ema)
    static = {k: est.breakdown[k] for k in ("weights", "grads", "optimizer", "rotary", "ema") if k in est.breakdown}
    backward = {k: int(est.detail[k]) for k in ("weight_casts", "activations", "logits", "accumulate")}
    step = int(est.detail["step_bytes"])
    shape = f"{device_batch} x {seq_len}"
    return [Phase(f"{prefix}train step", static, backward, device, shape, CPU_SCRATCH_BYTES),
            Phase(f"{prefix}optimizer step", static, {"optimizer_step": step}, device, shape, CPU_SCRATCH_BYTES)]


def scoring_phase(name: str, config: GPTConfig, tokens: int, *, static: dict[str, int], precision: str,
                  device: str, scored: int | None = None, columns: int | None = None,
                  head_rows: int = HEAD_CHUNK_ROWS, shape: str = "") -> Phase:
    """A no-grad scoring pass of `tokens` tokens a batch beside `static` (the model; the optimizer state
    during pretraining); `scored`, `columns` as scoring_bytes."""
    precision = _precision(precision, device)
    dynamic = {"weight_casts": weight_cast_bytes(config, precision),
               "scoring": scoring_bytes(config, tokens, precision=precision, scored=scored, columns=columns,
                                        head_rows=head_rows)}
    return Phase(name, static, dynamic, device, shape or f"{tokens:,} tokens a batch")


def generation_phase(config: GPTConfig, prompt_tokens: int, *, static: dict[str, int], precision: str,
                     device: str, max_len: int | None = None) -> Phase:
    """Generation with the KV cache (daychat.chat.engine): the cache for the whole context, and the
    prefill's forward of the prompt (the head at its last position only)."""
    precision = _precision(precision, device)
    cache = kv_cache_bytes(config, max_len or config.sequence_len, precision)
    prefill = inference_bytes_per_token(config, precision) * prompt_tokens
    dynamic = {"weight_casts": weight_cast_bytes(config, precision), "kv_cache": cache, "prefill": prefill}
    return Phase("generation", static, dynamic, device, f"prompt {prompt_tokens:,}, cache {max_len or config.sequence_len:,}")


def model_bytes(config: GPTConfig) -> dict[str, int]:
    """An evaluation stage's static memory: the model's weights (load_model_folder keeps them fp32, the
    embeddings in config.embedding_dtype as trained) and its rotary tables."""
    return {"weights": static_bytes(config)["weights"], "rotary": rotary_bytes(config)}


def in_training_static(config: GPTConfig, ema: bool = False) -> dict[str, int]:
    """What stays on the card while a training stage evaluates: weights, optimizer state, the EMA; the
    gradients are freed (zero_grad(set_to_none=True) after every step)."""
    parts = static_bytes(config)
    parts.pop("grads")
    parts["rotary"] = rotary_bytes(config)
    if ema:
        parts["ema"] = FP32 * param_counts(config)["total"]
    return parts


def scoring_batch_tokens(config: GPTConfig, budget_bytes: float, *, static: dict[str, int], precision: str,
                         device: str, longest: int = 1, columns: int | None = None,
                         cap: int = MAX_SCORING_TOKENS) -> int:
    """The largest scoring batch (tokens) whose phase fits `budget_bytes` beside `static`, at most `cap`;
    0 when not even one sequence of `longest` tokens fits. Every position is taken as scored and gathered
    (the worst case), or with `columns`, one position a row over that many vocabulary columns (letter
    scoring). Scoring memory grows with the batch, so this bisects on a monotone function."""
    def fits(tokens: int) -> bool:
        scored = tokens if columns is None else max(1, tokens // max(longest, 1))
        phase = scoring_phase("scoring", config, tokens, static=static, precision=precision, device=device,
                              scored=scored, columns=columns)
        return phase.total_bytes <= budget_bytes

    return largest_true(fits, longest, max(longest, cap))
