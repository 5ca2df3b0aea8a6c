"""The chat engine: KV-cache generation against full recompute, the calculator, the tool protocol, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from daychat.chat import calculator
from daychat.chat.engine import Engine, assistant_parts
from daychat.chat.format import render
from daychat.model.gpt import GPT, GPTConfig, KVCache
from daychat.sample import generate as full_recompute_generate
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import write_model_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

CONFIGS = {  # name -> GPTConfig overrides; windows shorter than the generated length
    "mha_global": dict(),
    "gqa_window": dict(n_kv_head=2, window_pattern="SL", short_window=3),
    "mqa_all_window": dict(depth=3, n_kv_head=1, window_pattern="S", short_window=5),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    words = "the cat sat on a mat and ate 12 fish while 7 dogs ran to 84 big red houses in the sun".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(60)]
    return Tokenizer.train(docs, vocab_size=300)


def tiny_gpt(tok: Tokenizer, seed: int = 0, **overrides) -> GPT:
    """A random GPT whose blocks are not the identity (zero_init_proj off) and whose logits are far apart
    (lm_head std 1), so greedy choices are not decided by rounding. Special tokens get logit 0, below
    almost every other token, so generation runs its full length instead of stopping at random."""
    cfg = GPTConfig(**{**dict(vocab_size=tok.vocab_size, sequence_len=48, depth=2, aspect_ratio=32, head_dim=16,
                              zero_init_proj=False), **overrides})
    model = GPT(cfg)
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_()
        model.lm_head.weight[list(tok.special_tokens.values())] = 0
        if model.smear_gate is not None:  # smear is off at init (lambda 0): switch it on, so the cache's
            model.smear_lambda.fill_(1.0)   # previous-token path is really compared
            model.smear_gate.weight.normal_()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# KV cache = full recompute


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_logits_match_full_forward(tok, name):
    model = tiny_gpt(tok, **CONFIGS[name])
    idx = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)  # (2, 40, V)
        cache = KVCache(model.config.sequence_len)
        # a multi-token prefill, a multi-token chunk at an offset (as a tool output is fed), then one by one
        pieces = [model(idx[:, :9], kv_cache=cache), model(idx[:, 9:13], kv_cache=cache)]
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(13, 40)]
    assert cache.pos == 40
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_cache_refuses_positions_beyond_the_context(tok):
    model = tiny_gpt(tok)
    cache = KVCache(model.config.sequence_len)
    with torch.no_grad():
        model(torch.zeros(1, 40, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (0.9, 20)])
def test_cached_generation_equals_full_recompute(tok, name, temperature, top_k):
    model = tiny_gpt(tok, **CONFIGS[name])
    prompt = tok.encode("the cat sat on a mat", prepend_bos=True)
    n = 30  # longer than every short_window above
    cached = Engine(model, tok).generate(prompt, max_new_tokens=n, temperature=temperature, top_k=top_k, seed=3)
    reference = full_recompute_generate(model, prompt, n, temperature=temperature, top_k=top_k, seed=3)[0]
    assert len(cached) == n and cached == reference


def test_generation_stops_at_the_context_and_budget(tok):
    model = tiny_gpt(tok)
    engine = Engine(model, tok)
    prompt = tok.encode("the cat sat on a mat", prepend_bos=True)
    assert len(engine.generate(prompt, max_new_tokens=5)) == 5
    assert len(prompt) + len(engine.generate(prompt, max_new_tokens=1000)) == model.config.sequence_len
    with pytest.raises(ValueError, match="no room"):
        engine.generate(list(range(48)))
    # seeds: the same seed repeats itself, another seed samples something else
    sampled = [engine.generate(prompt, max_new_tokens=20, temperature=1.0, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]


# ----------------------------------------------------------------------------------------------------------
# The calculator


@pytest.mark.parametrize("expr,result", [
    ("12*7", "84"), ("12 * 7 + 1", "85"), ("10/4", "2.5"), ("10/2", "5"), ("7//2", "3"), ("-7 % 3", "2"),
    ("2**10", "1024"), ("(1+2)*-3", "-9"), ("1,234 + 1", "1235"), ("1/3", "0.333333"), ("0.1+0.2", "0.3"),
    ("48/2=", "24"), ("$1,200 * 3", "3600"), ("2**-2", "0.25"), ("12 × 3", "36"),
])
def test_calculator_computes_arithmetic(expr, result):
    assert calculator.evaluate(expr) == result


@pytest.mark.parametrize("expr,why", [
    ("__import__('os').system('touch /tmp/daychat_pwned')", "Call is not allowed"),
    ("open('/etc/passwd').read()", "not allowed"), ("x + 1", "Name is not allowed"),
    ("(1).__class__", "Attribute is not allowed"), ("'a' * 3", "only numbers"), ("True + 1", "only numbers"),
    ("1 if 1 else 2", "not allowed"), ("[1, 2]", "not allowed"), ("1, 2", "not allowed"), ("1 +", "not an arithmetic"),
    ("", "empty"), ("1/0", "division by zero"), ("5 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("9**9**9", "too large"), ("10**200", "digits"), ("99999999999**99", "digits"), ("1e308 * 1e308", "digits"),
    ("(-8) ** 0.5", "not a real number"), ("1" + "+1" * 200, "longer than"),
])
def test_calculator_refuses_everything_else(expr, why):
    result = calculator.evaluate(expr)
    assert result.startswith("error: ") and why in result
    assert not Path("/tmp/daychat_pwned").exists()


# ----------------------------------------------------------------------------------------------------------
# The tool protocol, with a scripted model


class ScriptedModel(nn.Module):
    """Writes `full[n]` as the token after position n - 1, except where the engine must inject (there it
    writes `wrong`, so a missing injection shows). Records every id fed to it, through the cache."""

    def __init__(self, full: list[int], injected: set[int], wrong: int, vocab: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # the engine reads the device from the parameters
        self.config = SimpleNamespace(sequence_len=256)
        self.full, self.injected, self.wrong, self.vocab = full, injected, wrong, vocab
        self.seen: list[int] = []

    def forward(self, idx, kv_cache):
        assert kv_cache.pos == len(self.seen)  # the engine feeds each id exactly once, in order
        self.seen += idx[0].tolist()
        kv_cache.pos += idx.size(1)
        n = len(self.seen)
        logits = torch.zeros(1, idx.size(1), self.vocab)
        logits[0, -1, self.wrong if n in self.injected else self.full[n]] = 1.0
        return logits


@pytest.mark.parametrize("expr", ["12*7", "__import__('os')", "1/0"])
def test_tool_call_output_is_injected_through_the_cache(tok, expr):
    s = tok.encode_special
    prompt = [tok.bos_id, s("<|user_start|>"), *tok.encode("what is it"), s("<|user_end|>"), s("<|assistant_start|>")]
    call = [s("<|tool_call_start|>"), *tok.encode(expr), s("<|tool_call_end|>")]
    output = [s("<|tool_output_start|>"), *tok.encode(calculator.evaluate(expr)), s("<|tool_output_end|>")]
    after = tok.encode(" so it is done")
    full = prompt + tok.encode("it is ") + call + output + after + [s("<|assistant_end|>")]
    start = len(prompt) + len(tok.encode("it is ")) + len(call)
    model = ScriptedModel(full, set(range(start, start + len(output))), tok.encode("x")[0], tok.vocab_size)

    generated = Engine(model, tok).generate(prompt, max_new_tokens=200)
    assert generated == full[len(prompt):-1]  # <|assistant_end|> ends the turn and is not yielded
    assert model.seen == full[:-1]  # the injected output went through the model like any other token
    # the reply joins a conversation as parts that render back to the same ids
    parts = assistant_parts(generated, tok)
    assert [p["type"] for p in parts] == ["text", "tool_call", "tool_output", "text"]
    assert parts[1]["text"] == expr and parts[2]["text"] == calculator.evaluate(expr)
    conversation = [{"role": "user", "content": "what is it"}, {"role": "assistant", "content": parts}]
    assert render(conversation, tok)[0] == full
    # the budget counts injected ids too
    model.seen = []
    assert Engine(model, tok).generate(prompt, max_new_tokens=start - len(prompt) + 2) == full[len(prompt):start + 2]


def test_reply_renders_the_prompt_and_decodes(tok):
    s = tok.encode_special
    conversation = [{"role": "user", "content": "what is it"}]
    prompt = [tok.bos_id, s("<|user_start|>"), *tok.encode("what is it"), s("<|user_end|>"), s("<|assistant_start|>")]
    full = prompt + [s("<|tool_call_start|>"), *tok.encode("2**10"), s("<|tool_call_end|>"),
                     s("<|tool_output_start|>"), *tok.encode("1024"), s("<|tool_output_end|>"), s("<|bos|>")]
    model = ScriptedModel(full, set(range(len(prompt) + 7, len(full) - 1)), tok.encode("x")[0], tok.vocab_size)
    text = Engine(model, tok).reply(conversation + [{"role": "assistant", "content": "reference"}])
    assert text == "<|tool_call_start|>2**10<|tool_call_end|><|tool_output_start|>1024<|tool_output_end|>"


# ----------------------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def model_folder(tok, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    tok.save(root / "tokenizer")
    model = tiny_gpt(tok, n_kv_head=2, window_pattern="SL", short_window=8)
    write_model_folder(root / "sft", model, model.config, {"stage": "test"}, root / "tokenizer")
    return root / "sft"


def chat(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daychat.chat", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_answers_one_prompt(model_folder, tok):
    run = chat(["--model", str(model_folder), "-p", "the cat sat", "--temperature", "0", "--max-new-tokens", "8",
                "--device", "cpu", "--stats"])
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "8 tokens" in run.stderr
    # greedy: the printed reply is the engine's reply
    from daychat.train.checkpoint import load_model_folder

    model, _ = load_model_folder(model_folder)
    expected = Engine(model, tok).reply([{"role": "user", "content": "the cat sat"}], max_new_tokens=8)
    assert run.stdout == expected + "\n"


def test_cli_session_keeps_going_until_eof(model_folder):
    run = chat(["--model", str(model_folder), "--max-new-tokens", "4", "--device", "cpu"],
               stdin="hello there\n\n/clear\nthe cat\n")  # then stdin closes: Ctrl-D
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout.startswith("> ") and run.stdout.endswith("> \n")  # EOF at the prompt: a newline, exit 0


def test_cli_printer_shows_tool_calls_and_whole_characters(tok):
    import io

    from daychat.chat.__main__ import Printer

    s = tok.encode_special
    ids = [*tok.encode("it is "), s("<|tool_call_start|>"), *tok.encode("12*7"), s("<|tool_call_end|>"),
           s("<|tool_output_start|>"), *tok.encode("84"), s("<|tool_output_end|>"), *tok.encode(" café ☕")]
    assert len(tok.encode("☕")) == 3  # one character, three byte tokens: never printed in pieces
    out = io.StringIO()
    printer = Printer(tok, out)
    for token in ids:
        printer.feed(token)
        assert "\ufffd" not in out.getvalue()
    printer.flush()
    assert out.getvalue() == "it is [calculator: 12*7 = 84] café ☕"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from daychat.chat.__main__ import cli  # in-process: no torch import to wait for

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.pt").write_bytes(b"not a model")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"vocab_size": 300}))
    for args in (["--model", str(tmp_path / "missing")], ["--model", str(tmp_path / "bad")],
                 ["--model", str(tmp_path), "--device", "cuda"] if not torch.cuda.is_available() else []):
        if args:
            assert cli([*args, "-p", "hi"]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: [chat]") and len(err.splitlines()) == 1, err


def test_top_p_keeps_the_nucleus(tok):
    model = tiny_gpt(tok)
    engine = Engine(model, tok)
    prompt = tok.encode("the cat sat on a mat", prepend_bos=True)
    greedy = engine.generate(prompt, max_new_tokens=20)
    # a nucleus smaller than the top token's probability is the top token alone: greedy at any temperature
    assert engine.generate(prompt, max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=5) == greedy
    assert engine.generate(prompt, max_new_tokens=20, temperature=1.0, top_p=1.0, seed=5) != greedy
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(prompt, top_p=0.0)


def test_cli_answers_hostile_prompts_in_one_line_at_worst(model_folder):
    noise = bytes(range(1, 256)) * 12  # 3 KB, most of it not UTF-8: argv hands it over as lone surrogates
    for prompt, code in (("word " * 3000, 2), (os.fsdecode(noise[:200]), None), ("", 2)):
        run = chat(["--model", str(model_folder), "-p", prompt, "--max-new-tokens", "4", "--device", "cpu"])
        assert "Traceback" not in run.stderr, run.stderr
        assert run.returncode == code if code is not None else run.returncode in (0, 2)
        if run.returncode:
            assert run.stderr.startswith("error: [chat] ") and len(run.stderr.splitlines()) == 1, run.stderr
    run = chat(["--model", str(model_folder), "-p", "word " * 3000, "--device", "cpu"])
    assert "the prompt takes" in run.stderr and "shorten the prompt" in run.stderr
