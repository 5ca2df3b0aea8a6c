"""SFT: sources -> conversations, the mixture and its skip counts, packed batches, resume, a tiny model that
learns its conversations, and the sft stage end to end."""

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, run_stage

from daychat.chat.format import render, render_prompt
from daychat.errors import UserError
from daychat.model import GPT, GPTConfig
from daychat.optim import build_optimizers
from daychat.params import ParamsError, parse_section
from daychat.sample import generate
from daychat.sft import synthetic
from daychat.sft.batches import (
    ConversationSet,
    SftBatches,
    build_mixture,
    evaluate_loss,
    val_batches,
)
from daychat.sft.sources import fetch, gsm8k_conversation, parse_sources, read_rows
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import write_model_folder
from daychat.train.loop import LoopSettings, Trainer
from daychat.train.schedule import BatchPlan, Horizon, Schedule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from daychat.chat.format import text_of

    convs = [c for task in synthetic.TASKS for c in synthetic.generate(task, 60, seed=1)] + CONVERSATIONS
    return Tokenizer.train([text_of(m["content"]) for c in convs for m in c], vocab_size=400)


def spec(**entry):
    return parse_sources([entry])[0]


# ----------------------------------------------------------------------------------------------------
# Sources


def test_gsm8k_annotations_become_calculator_calls(shared_data):
    row = json.loads((shared_data / "sft/gsm8k/train.jsonl").open().readline())
    conv = gsm8k_conversation(row)
    assert conv[0] == {"role": "user", "content": row["question"]}
    assert conv[1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "tool_call", "text": "48/2"}, {"type": "tool_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "tool_call", "text": "48+24"}, {"type": "tool_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]


def test_shared_files_parse_by_format(shared_data, tok):
    sft = shared_data / "sft"
    mmlu = read_rows(spec(name="m", kind="local", format="mmlu", path=str(sft / "mmlu/mmlu_dev.jsonl")), "")
    from daychat.sft.sources import FORMATS
    conv = FORMATS["mmlu"](mmlu[0])  # answer 1 of ["0", "1", "2", "3"]
    assert "abstract algebra" in conv[0]["content"] and "B. 1" in conv[0]["content"] and conv[1]["content"] == "B"
    arc = FORMATS["arc"](read_rows(spec(name="a", kind="local", format="arc", path=str(sft / "arc/ARC-Easy_validation.jsonl")), "")[0])
    assert arc[1]["content"] == "A" and "A. cellular telephone" in arc[0]["content"]
    teacher = read_rows(spec(name="g", kind="local", format="gpteacher", path=str(sft / "gpteacher/codegen-instruct.json")), "")
    conv = FORMATS["gpteacher"](teacher[0])
    assert conv[0]["content"].endswith("\n\nwidth: 5, height: 8") and conv[1]["content"].startswith("#include")
    alpaca = read_rows(spec(name="e", kind="local", format="alpaca_eval", path=str(sft / "alpaca_eval/gpt4_model_outputs.json")), "")
    assert len(alpaca) == 805 and FORMATS["alpaca_eval"](alpaca[0])[1]["content"].startswith("Many famous actors")
    for c in (conv, arc):
        _, mask = render(c, tok)
        assert sum(mask) > 0


def test_sources_are_validated_with_key_names():
    def error(entry):
        with pytest.raises(ParamsError) as e:
            parse_section("sft", {"sources": [entry]})
        return str(e.value)
    assert "sft.sources[0].pth is not a known key (did you mean path?)" in error({"name": "a", "kind": "local", "format": "gsm8k", "pth": "x"})
    assert "sft.sources[0].path is required" in error({"name": "a", "kind": "local", "format": "gsm8k"})
    assert "sft.sources[0].kind must be one of local, url, synthetic" in error({"name": "a", "kind": "s3", "format": "gsm8k"})
    assert "sft.sources[0].format must be one of arithmetic" in error({"name": "a", "kind": "synthetic", "format": "gsm8k", "conversations": 3})
    assert "sft.sources[0].conversations must be >= 1" in error({"name": "a", "kind": "synthetic", "format": "spelling"})
    assert "sft.sources[0].epochs must be a number > 0" in error({"name": "a", "kind": "local", "format": "gsm8k", "path": "x", "epochs": 0})
    assert "sft.sources[0].url must start with" in error({"name": "a", "kind": "url", "format": "gsm8k", "url": "ftp://x/a.jsonl"})
    with pytest.raises(ParamsError, match=r"sft.sources\[1\].name 'a' is used twice"):
        parse_section("sft", {"sources": [{"name": "a", "kind": "synthetic", "format": "spelling", "conversations": 1}] * 2})
    with pytest.raises(ParamsError, match="sft.total_batch"):
        parse_section("sft", {"seq_len": 100, "device_batch": 2, "total_batch": 300})


def test_synthetic_is_deterministic_and_varied():
    a, b = synthetic.generate("arithmetic", 50, seed=3), synthetic.generate("arithmetic", 50, seed=3)
    assert a == b and a != synthetic.generate("arithmetic", 50, seed=4)
    assert len({json.dumps(c) for c in a}) > 45
    from daychat.chat.calculator import evaluate
    for conv in a:  # every call computes to the injected output
        parts = conv[1]["content"]
        for call, out in zip(parts, parts[1:]):
            if call["type"] == "tool_call":
                assert evaluate(call["text"]) == out["text"]
    spelling = synthetic.generate("spelling", 200, seed=0)
    counts = [c for c in spelling if c[0]["content"].startswith("How many") and "strawberry" in c[0]["content"]]
    for c in counts:
        letter = c[0]["content"].split()[2]
        assert c[1]["content"].endswith(f"#### {'strawberry'.count(letter)}")
    assert any("daychat" in m["content"] for c in synthetic.generate("identity", 20, seed=0) for m in c)


def test_url_source_is_fetched_once_and_cached(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "train.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}) + "\n")
    (site / "broken.json").write_text("[{")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        s = spec(name="g", kind="url", format="gsm8k", url=f"{base}/train.jsonl")
        rows = read_rows(s, tmp_path / "cache", retries=0)
        with pytest.raises(UserError, match="HTTP 404"):
            fetch(f"{base}/missing.jsonl", tmp_path / "cache", retries=0)
        with pytest.raises(UserError, match="failed 1 attempts"):
            fetch(f"{base}/broken.json", tmp_path / "cache", retries=0)
    finally:
        server.shutdown()
    assert gsm8k_conversation(rows[0])[1]["content"][:2] == [{"type": "tool_call", "text": "1+1"}, {"type": "tool_output", "text": "2"}]
    assert read_rows(s, tmp_path / "cache", retries=0) == rows  # from the cache: no server any more
    assert not list((tmp_path / "cache").rglob(".part-*"))


# ----------------------------------------------------------------------------------------------------
# Mixture, packing, resume


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_mixture_counts_skips_and_splits(tmp_path, tok):
    rows = [_chat(f"question {i}?", f"answer {i}.") for i in range(20)]
    rows += [_chat("", "an answer to nothing"),  # empty
             {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]},  # role_order
             {"messages": [{"role": "user", "content": "only a question"}]},  # no_assistant
             {"text": "not a chat"},  # bad_row
             _chat("long " * 300, "short"),  # overlong: its answer is past the row
             _chat("q", "long answer " * 300)]  # truncated, still trained on
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = parse_sources([{"name": "chats", "kind": "local", "format": "smoltalk", "path": str(path), "epochs": 1.5},
                           {"name": "spell", "kind": "synthetic", "format": "spelling", "conversations": 10}])
    m = build_mixture(specs, tok, max_len=129, seed=0, val_fraction=0.2)
    assert m.skipped == {"empty": 1, "role_order": 1, "bad_part": 0, "no_assistant": 1, "bad_row": 1, "overlong": 1}
    assert m.truncated == 1 and m.per_source["chats"]["truncated"] == 1
    chats, spell = m.per_source["chats"], m.per_source["spell"]
    assert chats["read"] == 26 and chats["val"] + chats["train"] + chats["skipped"] == 26
    assert chats["val"] <= 5 and spell["val"] == 2 and spell["train"] == 8  # the first 20% of each, less skips
    assert len(m.train) == chats["train"] + 8 and len(m.val) == chats["val"] + 2
    assert len(m.items) == round(1.5 * chats["train"]) + 8  # 1.5 epochs of chats, 1 of spelling
    assert m.train.lengths.max() <= 129
    again = build_mixture(specs, tok, max_len=129, seed=0, val_fraction=0.2)
    assert again.sha256() == m.sha256() != build_mixture(specs, tok, max_len=129, seed=1, val_fraction=0.2).sha256()


def _set(tok, n=40, seed=0):
    convs = synthetic.generate("spelling", n, seed) + synthetic.generate("identity", n // 4, seed)
    return ConversationSet.from_rendered([render(c, tok, 97) for c in convs])


def test_packing_whole_conversations_with_masked_targets(tok):
    data = _set(tok)
    assert data.lengths.max() <= 97
    batches = SftBatches(data, pad_id=tok.bos_id, finite=True, shuffle=False, buffer=8)
    seen = 0
    user_start = tok.encode_special("<|user_start|>")
    while not batches.exhausted:
        ids, mask = batches.pack(4, 96)
        for row in ids:
            if (row == tok.bos_id).all():  # finite: rows after the last conversation are padding only
                assert batches.exhausted
                continue
            assert row[0] == tok.bos_id and row[1] == user_start  # every row starts with a conversation
            seen += int(((row[:-1] == tok.bos_id) & (row[1:] == user_start)).sum())
    assert seen == len(data) and batches.placed == len(data)  # each conversation once, never cut
    assert batches.tokens == data.tokens
    b = SftBatches(data, pad_id=tok.bos_id, seed=0)
    x, y = b.next_batch(4, 96)
    ids, mask = SftBatches(data, pad_id=tok.bos_id, seed=0).pack(4, 96)
    assert torch.equal(x, torch.from_numpy(ids[:, :-1]))
    expect = np.where(mask[:, 1:] == 1, ids[:, 1:], -1)
    assert torch.equal(y, torch.from_numpy(expect))
    assert ((y >= 0).sum(1) > 0).all()  # no row, so no micro-batch, is all ignored
    assert b.trained == int((y >= 0).sum())
    padded = ids[:, 1:][mask[:, 1:] == 0]
    assert (y[torch.from_numpy(mask[:, 1:] == 0)] == -1).all() and len(padded) > 0
    with pytest.raises(ValueError, match="does not fit a row"):
        SftBatches(data, pad_id=tok.bos_id).pack(1, 16)


def test_batch_source_resumes_exactly(tok):
    data = _set(tok, 30)
    items = np.concatenate([np.arange(len(data)), np.arange(5)])
    a = SftBatches(data, items, pad_id=tok.bos_id, seed=7, buffer=6)
    for _ in range(20):  # past the end of the first pass
        a.next_batch(3, 96)
    state = json.loads(json.dumps(a.state_dict()))  # survives serialization
    b = SftBatches(data, items, pad_id=tok.bos_id, seed=7, buffer=6)
    b.load_state_dict(state)
    assert a.epoch >= 1
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(3, 96), b.next_batch(3, 96)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(UserError, match="start a fresh run"):
        SftBatches(data, items, pad_id=tok.bos_id, seed=8).load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# Learning, and the stage


CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am daychat."}],
    [{"role": "user", "content": "Spell cat."}, {"role": "assistant", "content": "c-a-t"}],
    [{"role": "user", "content": "How many r in berry?"}, {"role": "assistant", "content": "b-e-r-r-y: 2"}],
    [{"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "12*7 = "}, {"type": "tool_call", "text": "12*7"},
        {"type": "tool_output", "text": "84"}, {"type": "text", "text": "84."}]}],
]


def test_tiny_model_learns_its_conversations(tok):
    torch.manual_seed(0)
    data = ConversationSet.from_rendered([render(c, tok) for c in CONVERSATIONS])
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=64, depth=2, aspect_ratio=32, head_dim=32))
    model.init_weights()
    optimizers = build_optimizers(model, matrix_lr=0.04, embedding_lr=0.6, unembedding_lr=0.02, scalar_lr=0.5,
                                  weight_decay=0.0)
    batches = SftBatches(data, pad_id=tok.bos_id, seed=0, buffer=4)
    plan = BatchPlan(total_batch=4 * 64, device_batch=4, max_seq_len=64)
    schedule = Schedule(Horizon("tokens", tokens=120 * plan.total_batch), warmup_steps=5, warmdown_frac=0.3,
                        curriculum=((0.0, 64),))
    before = evaluate_loss(model, val_batches(data, 4, 64, tok.bos_id))
    Trainer(model, optimizers, batches, schedule, plan, LoopSettings(compile=False, section="sft")).run()
    after = evaluate_loss(model, val_batches(data, 4, 64, tok.bos_id))
    assert before > 4.0 and after < 0.05, (before, after)
    model.eval()
    end = tok.encode_special("<|assistant_end|>")
    for conv in CONVERSATIONS:
        ids, mask = render(conv, tok)
        prompt = render_prompt(conv, tok)
        with torch.no_grad():  # every trained token is the greedy choice given what precedes it
            pred = model(torch.tensor([ids[:-1]])).argmax(-1)[0].tolist()
        assert all(pred[i - 1] == ids[i] for i in range(len(prompt), len(ids)) if mask[i]), conv
        if all(isinstance(m["content"], str) for m in conv):  # and free greedy generation says the answer
            out = generate(model, prompt, 30, temperature=0, stop=end)[0]
            assert out == ids[len(prompt):], (tok.decode(out), conv[1]["content"])


def test_sft_stage_end_to_end(tmp_path, tok, shared_data):
    torch.manual_seed(0)
    (tmp_path / "tokenizer").mkdir()
    tok.save(tmp_path / "tokenizer")
    config = GPTConfig(vocab_size=tok.vocab_size, sequence_len=128, depth=1, aspect_ratio=32, head_dim=32)
    model = GPT(config)
    model.init_weights()
    ws = tmp_path / "ws"
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5,
                                  weight_decay=0.0)
    write_model_folder(ws / "models/base", model, config, {"run": {"fingerprint": "test"}}, tmp_path / "tokenizer",
                       optimizers=[opt.state_dict() for opt in optimizers])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_chat("q", "a")) + "\n" + json.dumps({"messages": []}) + "\n")
    sft = {"sources": [
        {"name": "arith", "kind": "synthetic", "format": "arithmetic", "conversations": 40},
        {"name": "gsm8k", "kind": "local", "format": "gsm8k", "path": str(shared_data / "sft/gsm8k/train.jsonl"),
         "conversations": 10},
        {"name": "chats", "kind": "local", "format": "smoltalk", "path": str(bad)}],
        "val_fraction": 0.1, "seq_len": 128, "total_batch": 512, "device_batch": 4, "epochs": 1.0,
        "warmup_steps": 1, "device": "cpu", "eval_every": 0, "save_every": 3, "save_every_min": 0.0}
    (ws / "params.yaml").write_text(yaml.safe_dump({"sft": sft}))
    args = ["--base", "models/base", "--out", "models/sft", "--cache", ".cache/sft_data", "--checkpoints", ".cache/sft",
            "--live", "reports/sft", "--metrics", "reports/metrics/sft.json"]
    done = run_stage("sft", args, ws)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((ws / "reports/metrics/sft.json").read_text())
    assert metrics["skipped_empty"] == 1 and metrics["conversations_chats"] + metrics["skipped_empty"] <= 2
    assert metrics["truncated"] + metrics["skipped_overlong"] > 0  # GSM8K at 128 tokens with a 400-token vocab
    assert metrics["steps"] >= 1 and metrics["trained_tokens"] > 0 and metrics["val_loss"] < metrics["val_loss_base"]
    assert metrics["tokens"] == metrics["steps"] * 512
    meta = json.loads((ws / "models/sft/meta.json").read_text())
    assert meta["data"]["sources"]["arith"]["train"] == metrics["conversations_arith"]
    assert meta["run"]["optimizer_continued"] and "continued from the pretraining's" in done.stdout
    assert (ws / "models/sft/tokenizer/tokenizer.json").is_file()
    assert list((ws / "reports/sft/plots/metrics").rglob("loss.tsv"))
    again = run_stage("sft", args, ws)  # finished run: resumes at its end, trains nothing more
    assert again.returncode == 0 and "resuming after step" in again.stdout
    assert json.loads((ws / "reports/metrics/sft.json").read_text())["steps"] == metrics["steps"]


def test_sft_continues_from_the_pretraining_optimizer_state(tmp_path, tok):
    """nanochat's chat_sft --load-optimizer: the moments carry over, the hyperparameters are SFT's own."""
    import importlib.util

    from daychat.params import parse_section
    from daychat.train.checkpoint import load_model_folder

    spec_ = importlib.util.spec_from_file_location("sft_stage", ROOT / "stages" / "sft.py")
    stage = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(stage)
    torch.manual_seed(0)
    (tmp_path / "tokenizer").mkdir()
    tok.save(tmp_path / "tokenizer")
    config = GPTConfig(vocab_size=tok.vocab_size, sequence_len=32, depth=2, aspect_ratio=32, head_dim=32)
    model = GPT(config)
    model.init_weights()
    pre = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5, weight_decay=0.1)
    for _ in range(2):
        idx = torch.randint(0, tok.vocab_size, (2, 33))
        model(idx[:, :-1], idx[:, 1:]).backward()
        for opt in pre:
            opt.step()
        model.zero_grad(set_to_none=True)
    folder = tmp_path / "base"
    write_model_folder(folder, model, config, {"params": {"adam_groups": "tuned"}}, tmp_path / "tokenizer",
                       optimizers=[opt.state_dict() for opt in pre])
    p = parse_section("sft", {"init_lr_frac": 0.5, "weight_decay": 0.0})
    loaded, meta = load_model_folder(folder)
    optimizers, continued = stage.sft_optimizers(loaded, p, folder, meta["params"], torch.device("cpu"))
    assert continued
    for old, new in zip(pre, optimizers):
        for p_old, p_new in zip((q for g in old.param_groups for q in g["params"]),
                                (q for g in new.param_groups for q in g["params"])):
            for key, value in old.state[p_old].items():
                got = new.state[p_new][key]
                assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, key
    adamw, muon = optimizers
    width = (config.model_dim / 768) ** -0.5
    lm_head = next(g for g in adamw.param_groups if g["name"] == "lm_head")
    assert lm_head["lr"] == lm_head["initial_lr"] == pytest.approx(0.008 * 0.5 * width)  # sft's, not the end of pretraining's
    assert muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5) and muon.param_groups[0]["weight_decay"] == 0.0
    assert lm_head["betas"] == (0.8, 0.96) and lm_head["weight_decay"] == 0.01
    fresh, continued = stage.sft_optimizers(loaded, parse_section("sft", {"load_optimizer": False}), folder,
                                            meta["params"], torch.device("cpu"))
    assert not continued and not fresh[1].state
    other = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=32, depth=2, aspect_ratio=32, head_dim=32,
                          smear=False, backout=False))  # no smear/backout group: the saved state does not fit
    other.init_weights()
    with pytest.raises(UserError, match="does not fit this model's optimizer groups"):
        stage.sft_optimizers(other, parse_section("sft", {}), folder, meta["params"], torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------
# Data parallel and the memory preflight (as pretraining's: daychat.train.distributed, daychat.plan)


SFT_DDP = dict(steps=4, total_batch=4 * 2 * 96, device_batch=2, seq_len=96)  # 4 micro-batches a step


def sft_ddp_run(folder, dist=None) -> tuple[list[float], dict]:
    """Per-step losses and the packer's final state of a tiny SFT run, in one process or as this rank."""
    from daychat.train.distributed import ShardedBatches

    g = SFT_DDP
    arrays = np.load(f"{folder}/data.npz")
    data = ConversationSet(arrays["ids"], arrays["mask"], arrays["offsets"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=int(arrays["vocab"]), sequence_len=g["seq_len"], depth=1, aspect_ratio=32,
                          head_dim=32))
    model.init_weights()
    optimizers = build_optimizers(model, matrix_lr=0.04, embedding_lr=0.6, unembedding_lr=0.02, scalar_lr=0.5,
                                  weight_decay=0.0)
    batches = SftBatches(data, pad_id=int(arrays["pad_id"]), seed=3, buffer=8)
    source = batches if dist is None else ShardedBatches(batches, dist.rank, dist.world_size)
    plan = BatchPlan(total_batch=g["total_batch"], device_batch=g["device_batch"], max_seq_len=g["seq_len"])
    schedule = Schedule(Horizon("tokens", tokens=g["steps"] * g["total_batch"]), warmup_steps=1,
                        curriculum=((0.0, g["seq_len"]),))
    state = Trainer(model, optimizers, source, schedule, plan, LoopSettings(compile=False, section="sft"),
                    dist=dist).run()
    return [row["train/loss"] for row in state.history if "train/loss" in row], batches.state_dict()


def _sft_ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    from daychat.train import distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist = distributed.init("cpu")
    try:
        result = sft_ddp_run(folder, dist)
    finally:
        distributed.shutdown()
    torch.save(result, f"{folder}/rank{rank}.pt")


def test_two_gloo_processes_give_the_single_process_sft_losses(tmp_path, tok):
    data = _set(tok, 40)
    np.savez(tmp_path / "data.npz", ids=data.ids, mask=data.mask, offsets=data.offsets, vocab=tok.vocab_size,
             pad_id=tok.bos_id)
    single, single_state = sft_ddp_run(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_sft_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0][0] == ranks[1][0]  # the loss is averaged over the ranks: every rank logs the same
    assert len(ranks[0][0]) == len(single) == SFT_DDP["steps"]
    worst = max(abs(a - b) for a, b in zip(ranks[0][0], single))
    assert worst <= 1e-5, (ranks[0][0], single)
    # every rank packed every row: the packer's counters (trained targets included) and checkpointed state
    # are the single process's, so a resume with another sft.gpus continues the same run
    assert ranks[0][1] == ranks[1][1] == single_state


def _stage_error(ws, **sft) -> str:
    """The one stderr line of the sft stage refusing the ci recipe's sft section with `sft` changes."""
    params = yaml.safe_load((ROOT / "workflow" / "recipes" / "ci.yaml").read_text())
    params["sft"].update(sft)
    ws.mkdir(exist_ok=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "sft.py"), "--base", "models/base", "--out", "o",
                             "--checkpoints", "c", "--live", "l", "--metrics", "m.json"], cwd=ws,
                            capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_stage_refuses_more_gpus_than_visible(tmp_path):
    line = _stage_error(tmp_path, gpus=2, device="cuda", device_batch=4)  # 2 micro-batches: one per GPU
    assert line.startswith("error: [sft] params.yaml: sft.gpus is 2 but 0 CUDA device(s) are visible; lower sft.gpus")
    with pytest.raises(ParamsError, match=r"sft.gpus \(3\) must divide the micro-batches of a step: .* = 4;"):
        parse_section("sft", dict(gpus=3, total_batch=4096, device_batch=2, seq_len=512))
    assert parse_section("sft", dict(gpus=4, total_batch=4096, device_batch=2, seq_len=512)).gpus == 4


def test_the_preflight_refuses_an_sft_batch_the_card_cannot_hold(tmp_path, tok):
    from daychat.plan.memory import GiB, estimate_memory
    from daychat.plan.preflight import check_fits

    (tmp_path / "tokenizer").mkdir()
    tok.save(tmp_path / "tokenizer")
    config = GPTConfig(vocab_size=tok.vocab_size, sequence_len=128, depth=1, aspect_ratio=32, head_dim=32)
    ws = tmp_path / "ws"
    write_model_folder(ws / "models/base", GPT(config), config, {}, tmp_path / "tokenizer")
    one, four = (estimate_memory(config, rows, 128, precision="auto", device="cpu").total_bytes for rows in (1, 4))
    memory_gib = (one + four) / 2 / 0.95 / GiB  # one row fits under the 5% margin, four do not
    line = _stage_error(ws, memory_gib=memory_gib, device_batch=4)  # ci: 1024 tokens = 2 x 4 rows of 128
    assert line.startswith("error: [sft] sft: estimated peak memory") and "sft.memory_gib" in line
    assert "set sft.device_batch to 2 (the largest that fits and splits total_batch)" in line or \
        "set sft.device_batch to 1 (" in line, line
    # nothing fits: SFT has no depth or activation-checkpointing knob to offer (the model is the base's)
    with pytest.raises(UserError, match=r"not even 1 row of 128 tokens fits beside the d1 model") as e:
        check_fits(config, 4, 128, budget_bytes=one // 2, device="cpu", precision="auto", section="sft",
                   tunes_model=False)
    assert "activation_checkpointing" not in str(e.value) and "depth" not in str(e.value)
