"""The CORE metric (DCLM, https://arxiv.org/abs/2406.11794), computed the way nanochat computes it.

CORE is the mean, over 22 in-context-learning tasks, of each task's accuracy centered on its random
baseline: centered = (acc - b/100) / (1 - b/100), so chance scores 0 and perfect scores 1. GPT-2 1.5B
scores 0.2565. Every rule below follows nanochat's `nanochat/core_eval.py` and `scripts/base_eval.py`
(the rule is named where it is applied), because a CORE number is only comparable if it is computed
exactly the same way:

- items: each task's file is shuffled with `random.Random(1337)` and cut to `max_per_task` (0 = all);
  few-shot examples are drawn from that (possibly cut) list, per item, with `random.Random(1234 + idx)`,
  never the item itself;
- prompts: few-shot examples joined by "\\n\\n", then the item, BOS prepended (render_* below);
- multiple_choice: one prompt per choice, shared context; the continuation starts where the token
  sequences first differ; the choice with the lowest mean per-token loss over its continuation wins;
- schema: one prompt per context option, shared continuation (the common token suffix); lowest mean
  loss wins;
- language_modeling: correct only if the argmax at every continuation position is the next token;
- ties go to the first option (`list.index(min(...))`);
- long prompts are scored uncropped, as the reference scores them (nanochat's GPT over-allocates its rotary
  table tenfold and has no `max_seq_len`, so its core_eval.py never crops): squad and boolq reach ~2.4k
  tokens, past a 2,048-token training context. Only a sequence longer than the model's rotary table is
  cropped (the reference's crop rule, `crop` below), and the result counts it as `cropped`.

The model is daychat's GPT, scored through its `hidden`/`head` pair (daychat.eval.scoring), or any
callable `(B, T) int64 ids -> (B, T, V) logits`, so tests can use a fake one. The tokenizer needs
`encode(text) -> list[int]` (ordinary text, no special tokens) and `bos_id`.

Speed and memory: the sequences of many items go through the model together (right-padded with BOS: a
causal model's losses before the padding do not depend on it, so batching changes no score), sorted by
length to waste little on padding, under bf16 autocast on CUDA. A batch holds at most `batch_tokens`
tokens (rows x padded width; daychat.plan.memory sizes it for the card) and the head runs only at the
scored positions, a chunk at a time, so the memory of a batch does not grow with the number of items or
choices. The shared context of a multiple-choice item is still recomputed once per choice.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from daychat.eval.scoring import DEFAULT_CHUNK_ROWS, losses_at

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # base_eval.py: shuffle each task's items once, so that max_per_task takes a fair sample
FEWSHOT_SEED = 1234  # core_eval.py: few-shot examples for item idx come from random.Random(1234 + idx)
DEFAULT_DELIMITER = " "  # base_eval.py: task.get('continuation_delimiter', ' ')

class TokenizerLike(Protocol):
    bos_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class Task:
    """One ICL task of the bundle: core.yaml's entry, its random baseline (percent) and its items."""

    label: str
    type: str
    num_fewshot: int
    delimiter: str
    baseline: float  # eval_meta_data.csv "Random baseline", in percent
    uri: str = ""
    items: list[dict] = field(default_factory=list, repr=False)


# ----------------------------------------------------------------------------------------------------
# Item selection and few-shot sampling


def select_items(items: Sequence[dict], max_per_task: int = 0, seed: int = SHUFFLE_SEED) -> list[dict]:
    """base_eval.py's rule: shuffle a copy with Random(1337), keep the first max_per_task (0 = all). The
    same seed gives the same items every run, so proxies over a few items compare across checkpoints."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:max_per_task] if max_per_task > 0 else items


def fewshot_indices(n_items: int, idx: int, num_fewshot: int) -> list[int]:
    """core_eval.py's rule: Random(1234 + idx).sample of the other items' indices.

    The reference raises when a task has fewer than num_fewshot other items (only possible with a tiny
    max_per_task); here the sample shrinks to what there is instead, which is the same draw otherwise.
    """
    if num_fewshot <= 0:
        return []
    available = [i for i in range(n_items) if i != idx]
    return random.Random(FEWSHOT_SEED + idx).sample(available, min(num_fewshot, len(available)))


# ----------------------------------------------------------------------------------------------------
# Prompt rendering: the reference renders Jinja templates; these are the same strings in plain Python.
# Each few-shot example is "<context><delimiter><gold continuation>\n\n", then the item follows.


def render_mc(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """multiple_choice: one prompt per choice; the query (context) is shared."""
    shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """schema: one prompt per context option; the continuation is shared."""
    shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{shots}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_lm(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """language_modeling: [prompt without the continuation, prompt with it].

    As the reference: contexts are trimmed (some files have trailing whitespace), and the prompt without
    the continuation is stripped, so that its tokens are a clean prefix of the full prompt's tokens
    (a trailing space would otherwise merge into the continuation's first token).
    """
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    head = f"{shots}{item['context'].strip()}{delimiter}"
    return [head.strip(), head + item["continuation"]]


RENDER = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}


def render_item(task: Task, items: Sequence[dict], idx: int) -> list[str]:
    """The prompts for items[idx] of a task, with its few-shot examples drawn from `items`."""
    fewshot = [items[i] for i in fewshot_indices(len(items), idx, task.num_fewshot)]
    return RENDER[task.type](items[idx], task.delimiter, fewshot)


# ----------------------------------------------------------------------------------------------------
# Tokens and the span each prompt is scored on


def common_length(seqs: Sequence[Sequence[int]], direction: str = "left") -> int:
    """Length of the common prefix ('left') or suffix ('right') of token sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        pos = i if direction == "left" else -1 - i
        if any(s[pos] != seqs[0][pos] for s in seqs):
            return i
    return n


@dataclass
class Scorable:
    """One item as token sequences, each scored on tokens [start, end) (end exclusive)."""

    tokens: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None  # index of the right option (None for language_modeling)


def tokenize_item(task_type: str, prompts: list[str], tokenizer: TokenizerLike, gold: int | None,
                  max_seq_len: int | None = None) -> Scorable:
    bos = tokenizer.bos_id
    tokens = [[bos, *tokenizer.encode(p)] for p in prompts]  # BOS prepended to every prompt
    if task_type == "multiple_choice":
        start = common_length(tokens, "left")  # the continuations begin where the choices first differ
        item = Scorable(tokens, [start] * len(tokens), [len(t) for t in tokens], gold)
    elif task_type == "schema":
        suffix = common_length(tokens, "right")  # the shared continuation is the common suffix
        item = Scorable(tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens], gold)
    elif task_type == "language_modeling":
        without, with_ = tokens
        if not (len(without) < len(with_) and with_[:len(without)] == without):
            # the reference asserts the same; a tokenizer that merges across the boundary cannot be scored
            raise ValueError(f"the prompt without the continuation does not tokenize to a prefix of the "
                             f"prompt with it: {prompts[1][-80:]!r}")
        item = Scorable([with_], [len(without)], [len(with_)], None)  # one sequence: the full prompt
    else:
        raise ValueError(f"unknown task type {task_type!r} (known: {', '.join(TASK_TYPES)})")
    return crop(item, max_seq_len) if max_seq_len else item


def crop(item: Scorable, max_seq_len: int) -> Scorable:
    """core_eval.py's rule for models with a fixed context (its `model.max_seq_len` branch): a sequence
    longer than the context keeps its LAST max_seq_len tokens (dropping BOS and the oldest few-shot text)
    and its span shifts down by the number dropped. The reference asserts the span stays in the window;
    here a continuation longer than the whole window is scored on the part of it that fits (start >= 1,
    since the first kept token has no prediction)."""
    tokens, starts, ends = [], [], []
    for t, s, e in zip(item.tokens, item.starts, item.ends):
        cut = max(0, len(t) - max_seq_len)
        tokens.append(t[cut:])
        starts.append(max(1, s - cut) if cut else s)
        ends.append(e - cut)
    return Scorable(tokens, starts, ends, item.gold)


# ----------------------------------------------------------------------------------------------------
# Scoring


def _autocast(device: torch.device):
    # bf16 on CUDA, as pretraining runs; on CPU the model runs in fp32 (bf16 on CPU is slow and not needed)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def judge(item: Scorable, span_losses: Sequence[torch.Tensor], span_preds: Sequence[torch.Tensor],
          task_type: str) -> bool:
    """Whether the model got the item right, from each of its sequences' losses / argmax predictions over
    the scored span: position t of a span predicts token t+1, so the span [s, e) is read at [s-1, e-1)."""
    if task_type == "language_modeling":
        s, e = item.starts[0], item.ends[0]
        return bool(torch.equal(span_preds[0], torch.tensor(item.tokens[0][s:e])))
    means = [losses.mean().item() for losses in span_losses]
    means = [m if math.isfinite(m) else math.inf for m in means]
    return means.index(min(means)) == item.gold  # lowest mean loss wins; ties go to the first option


def batches_by_tokens(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into right-padded batches of at most `batch_tokens` tokens (rows x the
    longest row), longest first so that a batch pads little. A sequence longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def span_scores(model: Any, items: Sequence[Scorable], pad_id: int, device: str | torch.device = "cpu",
                batch_tokens: int = 8192, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                predictions: bool = False) -> list[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Per item, per sequence: (losses, argmax predictions or None) over its scored span, CPU tensors.

    Every sequence of every item is one row; rows are batched by a token budget (`batch_tokens` = rows x
    padded width per forward; daychat.plan.memory sizes it for a card), the trunk runs once per batch and
    the head only at the scored positions, `chunk_rows` at a time (daychat.eval.scoring): memory is bounded
    by the budget, not by how many items or choices there are. Rows are right-padded with BOS, as the
    reference pads: a causal model's outputs before the padding do not depend on it, so batching changes
    no score."""
    device = torch.device(device)
    seqs = [(i, k) for i, item in enumerate(items) for k in range(len(item.tokens))]
    lengths = [len(items[i].tokens[k]) for i, k in seqs]
    out: list[list] = [[None] * len(item.tokens) for item in items]
    for batch in batches_by_tokens(lengths, batch_tokens):
        width = lengths[batch[0]]
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        rows, cols = [], []
        for row, j in enumerate(batch):
            i, k = seqs[j]
            tokens, s, e = items[i].tokens[k], items[i].starts[k], items[i].ends[k]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            rows += [row] * max(0, e - s)
            cols += range(s - 1, e - 1)  # position t predicts token t+1
        ids = ids.to(device)
        targets = torch.roll(ids, shifts=-1, dims=1)  # targets[:, t] = ids[:, t+1] wherever t is scored
        index = (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device))
        with _autocast(device):
            losses, preds = losses_at(model, ids, targets, index, chunk_rows=chunk_rows, predictions=predictions)
        losses = losses.cpu()
        preds = preds.cpu() if preds is not None else None
        at = 0
        for j in batch:
            i, k = seqs[j]
            n = max(0, items[i].ends[k] - items[i].starts[k])
            out[i][k] = (losses[at:at + n], preds[at:at + n] if preds is not None else None)
            at += n
    return out


def score_items(model: Any, items: Sequence[Scorable], task_type: str, pad_id: int,
                device: str | torch.device = "cpu", batch_tokens: int = 8192,
                chunk_rows: int = DEFAULT_CHUNK_ROWS) -> list[bool]:
    """Correctness of each item (span_scores, then the task type's rule in `judge`)."""
    scores = span_scores(model, items, pad_id, device, batch_tokens, chunk_rows,
                         predictions=task_type == "language_modeling")
    return [judge(item, [s[0] for s in per_seq], [s[1] for s in per_seq], task_type)
            for item, per_seq in zip(items, scores)]


# ----------------------------------------------------------------------------------------------------
# Aggregation


def centered(accuracy: float, baseline_percent: float) -> float:
    """base_eval.py: (acc - 0.01 b) / (1 - 0.01 b), b the task's random baseline in percent."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


def core_metric(centered_by_task: dict[str, float]) -> float:
    """CORE: the plain mean of the tasks' centered accuracies."""
    return sum(centered_by_task.values()) / len(centered_by_task)


def scorable_items(task: Task, tokenizer: TokenizerLike, max_per_task: int = 0,
                   max_seq_len: int | None = None) -> list[Scorable]:
    """A task's selected items rendered with their few-shot examples and tokenized (cropped to max_seq_len
    only where a sequence is longer: see `crop`)."""
    items = select_items(task.items, max_per_task)
    return [tokenize_item(task.type, render_item(task, items, idx), tokenizer, items[idx].get("gold"), max_seq_len)
            for idx in range(len(items))]


def evaluate_task(model: Any, tokenizer: TokenizerLike, task: Task, max_per_task: int = 0,
                  device: str | torch.device = "cpu", batch_tokens: int = 8192,
                  max_seq_len: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict[str, Any]:
    """Accuracy of one task: {accuracy, centered, n, shots, type, baseline, seconds, longest, cropped}.

    max_seq_len: the longest sequence the model can read (a GPT's max_positions, ten times its training
    context, as the reference's rotary table): prompts are scored uncropped up to it, as the reference
    scores them. `cropped` counts the items that had to be cut (0 with the real bundle), `longest` is the
    longest sequence's tokens."""
    t0 = time.perf_counter()
    full = scorable_items(task, tokenizer, max_per_task)
    longest = max((len(t) for item in full for t in item.tokens), default=0)
    cropped = sum(any(len(t) > max_seq_len for t in item.tokens) for item in full) if max_seq_len else 0
    scorable = [crop(item, max_seq_len) for item in full] if cropped else full
    correct = score_items(model, scorable, task.type, tokenizer.bos_id, device, batch_tokens, chunk_rows)
    accuracy = sum(correct) / len(correct) if correct else 0.0
    return {"accuracy": accuracy, "centered": centered(accuracy, task.baseline), "n": len(scorable),
            "shots": task.num_fewshot, "type": task.type, "baseline": task.baseline,
            "seconds": time.perf_counter() - t0, "longest": longest, "cropped": cropped}


def evaluate_core(model: Any, tokenizer: TokenizerLike, tasks: Iterable[Task], max_per_task: int = 0,
                  device: str | torch.device = "cpu", batch_tokens: int = 8192, max_seq_len: int | None = None,
                  on_task: Callable[[str, dict], None] | None = None,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict[str, Any]:
    """CORE over `tasks`: {core, tasks: {label: evaluate_task's dict}, examples, seconds, examples_per_s,
    cropped}.

    `model`: a GPT (scored through its hidden/head pair, memory-bounded) or any callable ids -> logits.
    Usable mid-training as a proxy: pass a small max_per_task (the same items every time, since the
    shuffle is seeded) and the training model in eval mode. `on_task(label, result)` is called as each
    task finishes (a log line, a progress bar).
    """
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for task in tasks:
        results[task.label] = evaluate_task(model, tokenizer, task, max_per_task, device, batch_tokens, max_seq_len,
                                            chunk_rows)
        if on_task:
            on_task(task.label, results[task.label])
    if not results:
        raise ValueError("no tasks to evaluate")
    seconds = time.perf_counter() - t0
    examples = sum(r["n"] for r in results.values())
    return {"core": core_metric({label: r["centered"] for label, r in results.items()}), "tasks": results,
            "examples": examples, "seconds": seconds, "examples_per_s": examples / seconds if seconds else 0.0,
            "cropped": sum(r["cropped"] for r in results.values())}


def longest_sequence(tasks: Iterable[Task], tokenizer: TokenizerLike, max_per_task: int = 0) -> dict[str, int]:
    """Per task, the tokens of its longest scored sequence (few-shot prompt + continuation + BOS): what the
    memory preflight and the rehearsal size the CORE phase by."""
    return {task.label: max((len(t) for item in scorable_items(task, tokenizer, max_per_task) for t in item.tokens),
                            default=0) for task in tasks}


def longest_prompt_bound(tasks: Iterable[Task], max_per_task: int = 0) -> int:
    """An upper bound on the tokens of the longest sequence the tasks will score, without tokenizing: its
    UTF-8 bytes plus BOS (a byte-level BPE token covers at least one byte). The memory preflight sizes the
    CORE phase by it before anything is allocated; `longest_sequence` gives the exact figure."""
    longest = 0
    for task in tasks:
        items = select_items(task.items, max_per_task)
        for idx in range(len(items)):
            longest = max(longest, *(len(p.encode("utf-8")) + 1 for p in render_item(task, items, idx)))
    return longest
