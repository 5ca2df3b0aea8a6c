"""SFT data sources: where conversations come from (params.yaml `sft.sources`) and how rows become them.

A source is one entry of `sft.sources`:

    - name: gsm8k                     # unique; names the source in the metrics (conversations_gsm8k, ...)
      kind: url                       # local | url | synthetic
      format: gsm8k                   # how a row becomes a conversation (FORMATS), or a synthetic task
      url: https://.../train-00000-of-00001.parquet   # kind url: one URL or a list of URLs
      path: ../data/gsm8k/train.jsonl # kind local: a file or a glob
      conversations: 0                # at most this many (a seeded sample; 0 = all); synthetic: how many
      epochs: 2.0                     # times each is seen per pass over the mixture (0.5 = a seeded half)

Files are .jsonl, .json (a list of objects) or .parquet, read by extension. A URL is downloaded once into
the cache folder (under a temporary name, renamed when complete and readable; retried with backoff) and
never again: a run on a machine without internet works from the cache, and no test needs the network.

Formats (row -> conversation):
- gsm8k: `question`, `answer` with `<<expr=result>>` calculator annotations. Each annotation becomes a
  tool_call part (expr) and a tool_output part (result) between the text before and after it, exactly as
  nanochat's tasks/gsm8k.py does; the text after the last annotation keeps the final `#### answer` line.
- mmlu: `question`, `subject`, `choices` (list), `answer` (index) -> a multiple-choice question whose
  assistant answer is the letter (cais/mmlu auxiliary_train wraps rows in a `train` field: unwrapped).
- arc: `question`, `choices` {text, label}, `answerKey` -> the same multiple-choice form.
- gpteacher: `instruction`, `input`, `response` (the input, if any, follows the instruction).
- alpaca_eval: `instruction`, `output` (one generator's outputs file, e.g. gpt4_model_outputs.json).
- smoltalk: `messages`, a list of {role, content} (HuggingFaceTB/smol-smoltalk and any chat-format data).
A row without the fields its format needs raises ConversationError("bad_row"): counted and skipped.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from daychat.chat.format import Conversation, ConversationError
from daychat.errors import UserError
from daychat.sections import ParamsError
from daychat.sft import synthetic

KINDS = ("local", "url", "synthetic")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
LETTERS = "ABCDEFGHIJ"
KEYS = {"name", "kind", "format", "path", "url", "conversations", "epochs"}
USER_AGENT = "daychat-sft/1"


@dataclass(frozen=True)
class SourceSpec:
    name: str
    kind: str
    format: str
    path: str = ""
    urls: tuple[str, ...] = ()
    conversations: int = 0  # cap (0 = all); synthetic: how many to generate
    epochs: float = 1.0


# ----------------------------------------------------------------------------------------------------
# Formats


def multiple_choice(question: str, choices: list[str], answer: int, labels: str | list[str] = LETTERS,
                    subject: str = "") -> Conversation:
    """A multiple-choice question whose assistant answer is the letter of the right choice.

    The layout follows nanochat's render_mc (choices listed with their letters, then an instruction to
    answer with the letter only), so the letter is the single trained answer token(s)."""
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    lines = "\n".join(f"{label}. {choice}" for label, choice in zip(labels, choices))
    user = (f"Multiple choice question{about}:\n{question}\n\n{lines}\n\n"
            "Respond only with the letter of the correct answer.")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": labels[answer]}]


def _need(row: Any, *fields: str) -> list[Any]:
    if not isinstance(row, dict):
        raise ConversationError("bad_row", f"a row must be an object, got {type(row).__name__}")
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise ConversationError("bad_row", f"the row lacks {', '.join(missing)}")
    return [row[f] for f in fields]


ANNOTATION = re.compile(r"<<([^<>]*)>>")


def gsm8k_conversation(row: dict) -> Conversation:
    question, answer = _need(row, "question", "answer")
    parts: list[dict] = []
    last = 0
    for m in ANNOTATION.finditer(answer):
        if m.start() > last:
            parts.append({"type": "text", "text": answer[last:m.start()]})
        expr, _, result = m.group(1).rpartition("=")
        if not expr:  # "<<72>>" without "=": no call to make, keep the text
            parts.append({"type": "text", "text": m.group(1)})
        else:
            parts += [{"type": "tool_call", "text": expr}, {"type": "tool_output", "text": result}]
        last = m.end()
    if last < len(answer):
        parts.append({"type": "text", "text": answer[last:]})
    return [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]


def mmlu_conversation(row: dict) -> Conversation:
    if isinstance(row, dict) and isinstance(row.get("train"), dict):
        row = row["train"]  # cais/mmlu's auxiliary_train config nests each row in a "train" field
    question, choices, answer = _need(row, "question", "choices", "answer")
    if not isinstance(choices, list) or not isinstance(answer, int) or not 0 <= answer < min(len(choices), len(LETTERS)):
        raise ConversationError("bad_row", f"answer {answer!r} does not index choices {choices!r}")
    return multiple_choice(question, [str(c) for c in choices], answer, subject=row.get("subject") or "")


def arc_conversation(row: dict) -> Conversation:
    question, choices, key = _need(row, "question", "choices", "answerKey")
    try:
        texts, labels = list(choices["text"]), list(choices["label"])
        answer = labels.index(key)
    except (TypeError, KeyError, ValueError):
        raise ConversationError("bad_row", f"answerKey {key!r} is not one of the choices' labels") from None
    return multiple_choice(question, texts, answer, labels=labels)


def gpteacher_conversation(row: dict) -> Conversation:
    instruction, response = _need(row, "instruction", "response")
    extra = row.get("input") or ""
    user = f"{instruction}\n\n{extra}" if str(extra).strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def alpaca_eval_conversation(row: dict) -> Conversation:
    instruction, output = _need(row, "instruction", "output")
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]


def messages_conversation(row: dict) -> Conversation:
    (messages,) = _need(row, "messages")
    if not isinstance(messages, list):
        raise ConversationError("bad_row", "messages must be a list of {role, content}")
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in messages]


FORMATS: dict[str, Callable[[dict], Conversation]] = {
    "gsm8k": gsm8k_conversation,
    "mmlu": mmlu_conversation,
    "arc": arc_conversation,
    "gpteacher": gpteacher_conversation,
    "alpaca_eval": alpaca_eval_conversation,
    "smoltalk": messages_conversation,
}


# ----------------------------------------------------------------------------------------------------
# The params entries


def parse_sources(entries: list, key: str = "sft.sources") -> list[SourceSpec]:
    """Checked SourceSpecs; any mistake is a ParamsError naming the entry's key, e.g. sft.sources[1].path.
    daychat.params runs it on `sft.sources` when it reads the section."""
    if not isinstance(entries, list) or not entries:
        raise ParamsError(key, "must list at least one source ({name, kind, format, ...})")
    specs, names = [], set()
    for i, entry in enumerate(entries):
        at = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ParamsError(at, f"must be a mapping {{name, kind, format, ...}}, got {entry!r}")
        for k in entry:
            if k not in KEYS:
                close = difflib.get_close_matches(str(k), sorted(KEYS), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(KEYS))}"
                raise ParamsError(f"{at}.{k}", f"is not a known key ({hint})")
        for k in ("name", "kind", "format"):
            if not isinstance(entry.get(k), str) or not entry[k]:
                raise ParamsError(f"{at}.{k}", f"is required (a string), got {entry.get(k)!r}")
        name, kind, fmt = entry["name"], entry["kind"], entry["format"]
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ParamsError(f"{at}.name", f"must be letters, digits and _ (it names metrics), got {name!r}")
        if name in names:
            raise ParamsError(f"{at}.name", f"{name!r} is used twice; names must be unique")
        names.add(name)
        if kind not in KINDS:
            raise ParamsError(f"{at}.kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
        formats = synthetic.TASKS if kind == "synthetic" else tuple(FORMATS)
        if fmt not in formats:
            raise ParamsError(f"{at}.format", f"must be one of {', '.join(formats)} for kind {kind}, got {fmt!r}")
        conversations = entry.get("conversations", 0)
        if isinstance(conversations, bool) or not isinstance(conversations, int) or conversations < 0:
            raise ParamsError(f"{at}.conversations", f"must be an integer >= 0, got {conversations!r}")
        if kind == "synthetic" and conversations < 1:
            raise ParamsError(f"{at}.conversations", "must be >= 1 for a synthetic source (how many to generate)")
        epochs = entry.get("epochs", 1.0)
        if isinstance(epochs, str):  # PyYAML leaves 1e-1 as a string (see daychat.sections)
            try:
                epochs = float(epochs)
            except ValueError:
                pass
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0:
            raise ParamsError(f"{at}.epochs", f"must be a number > 0, got {epochs!r}")
        path, urls = entry.get("path", ""), entry.get("url", ())
        urls = (urls,) if isinstance(urls, str) else tuple(urls) if isinstance(urls, list) else urls
        if kind == "local" and (not isinstance(path, str) or not path):
            raise ParamsError(f"{at}.path", "is required (a file or glob) when kind is local")
        if kind == "url":
            if not urls or not isinstance(urls, tuple) or not all(isinstance(u, str) for u in urls):
                raise ParamsError(f"{at}.url", "is required (a URL or a list of URLs) when kind is url")
            for u in urls:
                if not u.startswith(("http://", "https://", "file://")):
                    raise ParamsError(f"{at}.url", f"must start with http://, https:// or file://, got {u!r}")
                if not _suffix(urllib.parse.urlsplit(u).path):
                    raise ParamsError(f"{at}.url", f"must name a {', '.join(FILE_SUFFIXES)} file, got {u!r}")
        if kind != "local" and "path" in entry:
            raise ParamsError(f"{at}.path", f"is only for kind local (this source is {kind})")
        if kind != "url" and "url" in entry:
            raise ParamsError(f"{at}.url", f"is only for kind url (this source is {kind})")
        specs.append(SourceSpec(name, kind, fmt, path or "", urls if kind == "url" else (), conversations, float(epochs)))
    return specs


# ----------------------------------------------------------------------------------------------------
# Reading rows


def read_rows(spec: SourceSpec, cache: str | os.PathLike, *, seed: int = 0, retries: int = 5,
              timeout_s: float = 60.0) -> list[Any]:
    """All rows of a source: file records (local or downloaded) or, for synthetic, generated conversations."""
    if spec.kind == "synthetic":
        return synthetic.generate(spec.format, spec.conversations, seed)
    if spec.kind == "local":
        files = local_files(spec.path, spec.name)
    else:
        files = [fetch(url, Path(cache), retries=retries, timeout_s=timeout_s) for url in spec.urls]
    rows: list[Any] = []
    for f in files:
        rows.extend(read_file(f))
    return rows


def local_files(pattern: str, name: str = "") -> list[Path]:
    where = f"sft source {name}" if name else "sft source"
    files = sorted(Path(f) for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not files:
        raise UserError(f"{where}: no file matches {pattern!r} (in {Path.cwd()}); fix its path in params.yaml")
    for f in files:
        if not _suffix(f.name):
            raise UserError(f"{where}: {f} is not {', '.join(FILE_SUFFIXES)}")
    return files


def _suffix(name: str) -> str:
    return next((s for s in FILE_SUFFIXES if name.endswith(s)), "")


def read_file(path: str | os.PathLike) -> list[Any]:
    """Records of a .jsonl, .json (list) or .parquet file; an unreadable file is a UserError naming it."""
    path = Path(path)
    suffix = _suffix(path.name)
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise ValueError("a .json source must hold a list of objects")
            return data
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {number}: {e}") from None
        return rows
    except Exception as e:  # pyarrow, json, unicode and OS errors alike: one line naming the file
        raise UserError(f"{path} cannot be read as {suffix} ({type(e).__name__}: {e}); fix or delete it") from None


def cache_path(url: str, cache: Path) -> Path:
    """Where a URL is kept: <cache>/<host>/<path> (readable, and two URLs never share a file)."""
    parts = urllib.parse.urlsplit(url)
    rel = re.sub(r"[^\w./-]+", "_", urllib.parse.unquote(parts.netloc + parts.path))
    rel = "/".join(seg for seg in rel.split("/") if seg not in ("", ".", ".."))
    return cache / rel


def fetch(url: str, cache: Path, *, retries: int = 5, timeout_s: float = 60.0, backoff_s: float = 1.0) -> Path:
    """The file at `url` in the cache: downloaded once (to `.part`, checked readable, renamed), then reused."""
    dest = cache_path(url, cache)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".part-{dest.name}")  # same suffix: read_file can check it before the rename
    error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), 30.0))
        try:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout_s) as response, open(part, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            read_file(part)  # a truncated or wrong file fails here and is fetched again
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            e.close()
            if e.code < 500 and e.code != 429:  # 404, 403: asking again will not help
                part.unlink(missing_ok=True)
                raise UserError(f"sft source download failed (HTTP {e.code} {e.reason}): {url}") from None
            error = e
        except (OSError, UserError) as e:  # URLError, timeouts, resets, a truncated file
            error = e
        part.unlink(missing_ok=True)
    raise UserError(f"sft source download failed {retries + 1} attempts ({error}): {url}")


def conversations_of(spec: SourceSpec, rows: list[Any]) -> Iterator[Conversation | ConversationError]:
    """Each row as a conversation, or the ConversationError that says why it is not one."""
    convert = (lambda row: row) if spec.kind == "synthetic" else FORMATS[spec.format]
    for row in rows:
        try:
            yield convert(row)
        except ConversationError as e:
            yield e
