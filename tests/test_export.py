"""The export for Hugging Face transformers: the same ids, the same chat format, the same logits, the same
greedy replies as daychat's own tokenizer, format and engine, on a tiny model built here."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from daychat.chat.engine import Engine
from daychat.chat.format import render, render_prompt
from daychat.errors import UserError
from daychat.export import export
from daychat.export.hf_tokenizer import fast_tokenizer
from daychat.model.gpt import GPT, GPTConfig
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import write_model_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# Varied text: unicode letters, marks, emoji, CJK, digit runs, whitespace runs, contractions, code.
TEXTS = [
    "hello world", "  leading spaces", "trailing   ", "tabs\tand\nnewlines\r\n\r\n", "x\n\n\n  y", "   \n   ", "",
    "1234567890 3.14159 1,000,000 007", "café naïve Zürich 日本語 Ελληνικά русский", "😀😀 emoji 👍🏽 flags 🇫🇷",
    "Don't I'LL they've WE'RE it's", "\u00a0nbsp\u2003em\u200bzero-width", "a" * 80, "!!!???...,,,;;",
    "mixed123abc456 def", "ﬁ ligature Ǆ e\u0301 combining", "def f(x):\n    return x ** 2  # square\n",
]
WORDS = ("the cat sat on a mat and ate 12 fish while 7 dogs ran to 84 big red houses in the sun café "
         "naïve 日本語 😀 don't I'll they've\n x = 3 * 4").split(" ")


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory):
    """transformers copies an export's modeling files into a modules cache: keep it in the test's tmp."""
    os.environ.setdefault("HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(30)) + rng.choice(["\n", "  ", "\t", "\n\n", " 123456"])
            for _ in range(400)]
    return Tokenizer.train(docs + TEXTS, vocab_size=420)


def tiny_gpt(tok: Tokenizer) -> GPT:
    """Random GPT with GQA, a sliding-window layer and value embeddings; logits far apart (lm_head std 1) so
    greedy choices are not decided by rounding; special tokens at logit 0, so replies run their full length."""
    cfg = GPTConfig(vocab_size=tok.vocab_size, sequence_len=64, depth=3, aspect_ratio=32, head_dim=16,
                    n_kv_head=2, window_pattern="SL", short_window=8, zero_init_proj=False)
    model = GPT(cfg)
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_()
        model.lm_head.weight[list(tok.special_tokens.values())] = 0
        model.resid_lambdas.uniform_(0.5, 1.5)  # not their init values: the export must carry them
        for block in model.blocks:
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tok, hf_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tok.save(root / "tokenizer")
    model = tiny_gpt(tok)
    write_model_folder(root / "sft", model, model.config, {"stage": "test", "code": {"commit": "abc123"}},
                       root / "tokenizer")
    (root / "metrics").mkdir()
    (root / "metrics" / "pretrain.json").write_text(json.dumps({"val_bpb": 1.2345, "tokens": 1000}))
    (root / "metrics" / "chat_eval.json").write_text(json.dumps({"chatcore_subset": 0.0123, "label": "ChatCORE subset (demo)"}))
    result = export(root / "sft", root / "exports" / "tiny", metrics_dir=root / "metrics", say=lambda _: None)
    return root / "exports" / "tiny", model, result


@pytest.fixture(scope="module")
def hf(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = exported[0]
    return (AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval(),
            AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True))


def test_fast_tokenizer_gives_daychat_ids_on_varied_text(tok):
    hf = fast_tokenizer(tok)
    rng = random.Random(1)
    chars = "ab c\n\t12 é日😀'sSLLx.,!\r  "
    texts = TEXTS + [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(300)] + \
        ["".join(rng.choice(chars) for _ in range(rng.randint(0, 50))) for _ in range(2000)]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_export_folder_has_everything_and_ships_gpt_py_verbatim(exported):
    folder, model, result = exported
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "gpt.py", "modeling_daychat.py",
            "configuration_daychat.py", "tokenizer.json", "tokenizer_config.json", "README.md",
            "daychat_meta.json"} <= names
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no temporary folder left
    assert (folder / "gpt.py").read_bytes() == (ROOT / "daychat/model/gpt.py").read_bytes()
    assert (folder / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others: it is for sharing
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_daychat.DaychatForCausalLM"
    assert config["daychat_gpt"]["window_pattern"] == "SL" and config["max_position_embeddings"] == 64
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: mit") and "# tiny" in card
    assert "1.2345" in card and "ChatCORE subset (demo) | 0.0123" in card and "abc123" in card
    assert result["check_max_abs_logit_diff"] <= 1e-4 and result["params"] == model.num_params()["total"]


def test_transformers_logits_equal_daychat(exported, hf):
    _, model, _ = exported
    hf_model, _ = hf
    idx = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
        # the loss too: labels are shifted inside, as transformers' causal LMs do
        loss = hf_model(idx, labels=idx).loss
        reference = model(idx[:, :-1], targets=idx[:, 1:])
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)


def test_greedy_generate_equals_the_engine_with_and_without_cache(exported, hf, tok):
    _, model, _ = exported
    hf_model, hf_tok = hf
    conversation = [{"role": "user", "content": "the cat sat on a mat"}]
    prompt = render_prompt(conversation, tok)
    expected = Engine(model, tok).generate(prompt, max_new_tokens=40)
    assert len(expected) == 40  # ran its full length: a real comparison, with window layers past the window
    inputs = hf_tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    fed = []
    hook = hf_model.model.register_forward_pre_hook(lambda module, args: fed.append(args[0].size(1)))
    try:
        for use_cache in (True, False):
            fed.clear()
            out = hf_model.generate(**inputs, max_new_tokens=40, do_sample=False, use_cache=use_cache)
            assert out[0, len(prompt):].tolist() == expected
            # with the cache, every step after the prompt feeds one token
            assert (fed == [len(prompt)] + [1] * 39) == use_cache
    finally:
        hook.remove()


def test_chat_template_renders_daychat_format(hf, tok):
    _, hf_tok = hf
    from daychat.export.check import template_ids

    tool_reply = [{"type": "text", "text": "12 * 7 = "}, {"type": "tool_call", "text": "12*7"},
                  {"type": "tool_output", "text": "84"}, {"type": "text", "text": "84. café 😀"}]
    conversations = [
        [{"role": "user", "content": "What is 12 * 7?"}],
        [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "Name three colors."}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "parts "},
                                                                         {"type": "text", "text": "joined"}]},
         {"role": "assistant", "content": tool_reply}, {"role": "user", "content": "  and   twice?\n\n"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a reference answer"}],  # dropped
    ]
    for conversation in conversations:
        assert template_ids(hf_tok, conversation, add_generation_prompt=True) == render_prompt(conversation, tok)
    for conversation in conversations[2:]:  # ending with the assistant: the training layout
        full = conversation if conversation[-1]["role"] == "assistant" else conversation + [
            {"role": "assistant", "content": "ok"}]
        assert template_ids(hf_tok, full) == render(full, tok)[0]
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="roles must alternate"):
        template_ids(hf_tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_check_catches_an_unfaithful_export(exported, tok, tmp_path):
    from safetensors.torch import load_file, save_file

    from daychat.export.check import check_export

    folder, model, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.resid_lambdas"] = torch.ones_like(state["model.resid_lambdas"])  # what a NanoChat mapping loses
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="logits differ"):
        check_export(bad, model, tok)


def test_cli_errors_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "daychat.export", "--model", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: [export]") and len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(monkeypatch, tmp_path):
    import huggingface_hub

    from daychat.export import push_to_hub

    calls = []

    class FakeApi:  # no network in tests: record what would be sent
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs))
            if kwargs["repo_id"] == "you/forbidden":
                raise PermissionError("403 Forbidden")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(tmp_path, "you/tiny", private=True) == "https://huggingface.co/you/tiny"
    assert calls[1] == ("create", "you/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[2][1]["folder_path"] == str(tmp_path) and calls[2][1]["repo_id"] == "you/tiny"
    assert calls[2][1]["ignore_patterns"] == [".*"]  # no Snakemake timestamp or other hidden scratch
    with pytest.raises(UserError, match="you/forbidden failed .*403 Forbidden.*huggingface-cli login"):
        push_to_hub(tmp_path, "you/forbidden")
