"""Parameter, FLOP and MFU accounting for the GPT, from the config alone (no model is built).

The counts are analytical, so a planner can size d24 or d32 without allocating it; tests check that they
equal what `GPT.num_params()` / `GPT.estimate_flops()` count on real modules.

Per layer (C = model_dim = H * D, Hkv kv heads, D head_dim, V vocab padded to a multiple of 64):
    attention  c_q C*C + c_k C*Hkv*D + c_v C*Hkv*D + c_proj C*C
    MLP        c_fc C*4C + c_proj 4C*C
    ve_gate    min(ve_gate_inputs = 12, C) * Hkv   (value-embedding layers only)
and once: wte V*C, lm_head V*C, value embeddings V*Hkv*D per value-embedding layer, 2 scalars per layer,
the smear gate (min(24, C) weights + its lambda) and backout's lambda. The smear gate is a 24 -> 1 matmul
but is counted with the scalars (AdamW, 48 FLOPs a token: nothing).

Training FLOPs per token (nanochat's convention, so MFU figures compare with its reports):
    6 * (block matrices + lm_head) + sum over layers of 12 * H * D * T_eff,
T_eff = T for global layers and min(window, T) for window layers (PaLM, arXiv:2204.02311, App. B).
Embedding lookups and the per-layer scalars cost no matmul FLOPs and are not counted.

`python -m daychat.model.accounting` prints the table for depths 12..24 at vocab 32768, T 2048.
"""

from __future__ import annotations

from daychat.model.gpt import GPTConfig

# Dense (no sparsity) bf16 tensor-core peak with fp32 accumulate, TFLOPS, matched by substring of
# torch.cuda.get_device_name(), first match wins (so the specific names come before the generic ones).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    # NVIDIA RTX Blackwell GPU Architecture whitepaper, GeForce RTX 5090: FP16/BF16 tensor, FP32 accumulate,
    # 209.5 dense (419 with sparsity).
    ("rtx 5090", 209.5),
    # NVIDIA Ada GPU Architecture whitepaper (Appendix A), GeForce RTX 4090: peak BF16 tensor TFLOPS with FP32
    # accumulate 165.2 dense (330.4 sparse). GeForce Ada runs FP32-accumulate at half the FP16-accumulate rate.
    ("rtx 4090", 165.2),
    # NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3090: peak BF16 tensor TFLOPS with FP32
    # accumulate 71 dense (142 sparse).
    ("rtx 3090", 71.0),
    # NVIDIA A100 Tensor Core GPU datasheet: BF16 tensor core 312 TFLOPS dense (624 with sparsity); SXM and PCIe.
    ("a100", 312.0),
    # NVIDIA H100 datasheet: BF16 tensor core 1,979 (SXM) / 1,671 (NVL) / 1,513 (PCIe) TFLOPS *with sparsity*;
    # dense is half.
    ("h100 nvl", 835.5),
    ("h100 pcie", 756.5),
    ("h100", 989.0),
    # NVIDIA H200 datasheet: BF16 tensor core 1,979 (SXM) / 1,671 (NVL) TFLOPS with sparsity; dense is half.
    ("h200 nvl", 835.5),
    ("h200", 989.0),
]


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak in FLOP/s for a device name like 'NVIDIA GeForce RTX 4090', or None if not in the table."""
    name = device_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the card's dense bf16 peak (0..1)."""
    return tokens_per_s * flops_per_token / peak_flops


def param_counts(config: GPTConfig) -> dict[str, int]:
    """The same keys as GPT.num_params(): matrix, embedding, lm_head, scalar, wte, value_embeds, matmul, total."""
    C, H, Hkv, D, L = config.model_dim, config.n_head, config.kv_heads, config.head_dim, config.depth
    V = config.padded_vocab_size
    n_ve = len(config.value_embed_layers())
    attn = C * H * D + 2 * C * Hkv * D + H * D * C
    mlp = 2 * 4 * C * C
    matrix = L * (attn + mlp) + n_ve * config.ve_gate_channels * Hkv
    wte = V * C
    value_embeds = n_ve * V * Hkv * D
    lm_head = V * C
    scalar = (2 * L if config.resid_lambdas else 0) + (config.smear_channels + 1 if config.smear else 0) \
        + (1 if config.backout else 0)
    return {
        "matrix": matrix, "embedding": wte + value_embeds, "lm_head": lm_head, "scalar": scalar,
        "wte": wte, "value_embeds": value_embeds, "matmul": matrix + lm_head,
        "total": matrix + wte + value_embeds + lm_head + scalar,
    }


def attention_flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """12 * H * D * T_eff summed over layers (QK^T and AV, forward + backward)."""
    T = config.sequence_len if seq_len is None else seq_len
    return float(sum(12 * config.n_head * config.head_dim * (T if w is None else min(w, T))
                     for w in config.layer_windows()))


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token; equals GPT(config).estimate_flops(seq_len)."""
    return 6.0 * param_counts(config)["matmul"] + attention_flops_per_token(config, seq_len)


def table(depths=(12, 16, 20, 24), vocab_size: int = 32768, sequence_len: int = 2048, head_dim: int = 128,
          **overrides) -> str:
    """A markdown table of the parameter breakdown and FLOPs per token for a few depths."""
    rows = ["| depth | dim | heads | matrix | wte | value_embeds | lm_head | scalar | total | matmul "
            "| 6N | attn | FLOPs/token |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for depth in depths:
        cfg = GPTConfig(vocab_size=vocab_size, sequence_len=sequence_len, depth=depth, head_dim=head_dim,
                        **overrides)
        p = param_counts(cfg)
        attn = attention_flops_per_token(cfg)
        rows.append(f"| {depth} | {cfg.model_dim} | {cfg.n_head} | {p['matrix']:,} | {p['wte']:,} "
                    f"| {p['value_embeds']:,} | {p['lm_head']:,} | {p['scalar']} | {p['total']:,} "
                    f"| {p['matmul']:,} | {6 * p['matmul']:.3e} | {attn:.3e} | {flops_per_token(cfg):.3e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
