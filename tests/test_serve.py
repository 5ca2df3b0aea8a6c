"""The server: the official OpenAI client against a live server on 127.0.0.1, OpenAI-style errors for bad
input, one generation at a time (concurrent = sequential), disconnects, timeouts, the queue bound, stop
strings, the calculator through the API, and the web chat in a real headless Chromium."""

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn as nn

from daychat.chat.display import Printer, parts_of_shown
from daychat.chat.engine import Engine
from daychat.chat.format import render_prompt
from daychat.model.gpt import GPT, GPTConfig
from daychat.serve.api import Limits, parse_request
from daychat.serve.app import ServerConfig, create_app
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import write_model_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
CONTEXT = 128


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    words = "the cat sat on a mat and ate 12 fish while 7 dogs ran to 84 big red houses in the sun".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(60)]
    return Tokenizer.train(docs, vocab_size=300)


def tiny_gpt(tok: Tokenizer, sequence_len: int = CONTEXT) -> GPT:
    """Random GPT whose special tokens have logit 0 (below almost every other): replies run their full length."""
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=sequence_len, depth=2, aspect_ratio=32,
                          head_dim=16, zero_init_proj=False))
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_()
        model.lm_head.weight[list(tok.special_tokens.values())] = 0
    return model.eval()


class Slow(nn.Module):
    """A model that takes `delay` seconds per forward: long enough replies to stop, time out or queue behind."""

    def __init__(self, model: nn.Module, delay: float):
        super().__init__()
        self.model, self.delay, self.config = model, delay, model.config
        self.forwards = 0

    def forward(self, idx, kv_cache=None):
        self.forwards += 1
        time.sleep(self.delay)
        return self.model(idx, kv_cache=kv_cache)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live(app):
    """Run an app with uvicorn on 127.0.0.1 in a thread of this process."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def shown(ids: list[int], tok: Tokenizer) -> str:
    """Generated ids as the server shows them (the chat CLI's printer)."""
    out = type("Out", (), {"text": "", "write": lambda self, t: setattr(self, "text", self.text + t),
                           "flush": lambda self: None})()
    printer = Printer(tok, out)
    for token in ids:
        printer.feed(token)
    printer.flush()
    return out.text


# ----------------------------------------------------------------------------------------------------------
# A live server, as users start it: python -m daychat.serve


@pytest.fixture(scope="module")
def model_folder(tok, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    tok.save(root / "tokenizer")
    model = tiny_gpt(tok)
    write_model_folder(root / "sft", model, model.config, {"stage": "test"}, root / "tokenizer")
    return root / "sft"


@pytest.fixture(scope="module")
def server(model_folder):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "daychat.serve", "--model", str(model_folder), "--port", str(port),
                             "--threads", "1", "--log-level", "warning", "--name", "tiny"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not start in 90 s"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def engine(model_folder, tok):
    from daychat.train.checkpoint import load_model_folder

    return Engine(load_model_folder(model_folder)[0], tok)


def test_openai_client_non_streaming(client, engine, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat on a mat"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    prompt = render_prompt(messages, tok)
    assert reply.choices[0].message.content == shown(engine.generate(prompt, max_new_tokens=12), tok)
    assert reply.choices[0].finish_reason == "length" and reply.model == "tiny"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (len(prompt), 12, len(prompt) + 12)
    # seeded sampling repeats itself
    sampled = [client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, top_p=0.9,
                                              max_tokens=12, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_openai_client_streaming(client):
    messages = [{"role": "user", "content": "the dogs ran"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    assert all(c.choices[0].delta.model_extra.get("part") == "text" for c in chunks if c.choices and c.choices[0].delta.content)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["context"] == CONTEXT and health["max_queue"] == 8
    assert httpx.get(f"{server}/").text.startswith("<!doctype html>")


def test_stop_strings(client, engine, tok):
    messages = [{"role": "user", "content": "big red houses"}]
    full = shown(engine.generate(render_prompt(messages, tok), max_new_tokens=20), tok)
    stop = full[5:8]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        result = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20,
                                                stop=[stop, "never appears"], stream=stream)
        if stream:
            chunks = [c for c in result if c.choices]
            text, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = result.choices[0].message.content, result.choices[0].finish_reason
        assert (text, finish) == (cut, "stop")


BAD_INPUTS = [  # (body, status, message); body as raw text when a str
    ("{not json", 400, "not valid JSON"),
    ([1, 2], 400, "must be a JSON object"),
    ({}, 400, "messages is required"),
    ({"messages": []}, 400, "at least one message"),
    ({"messages": [{"role": "user", "content": "hi"}] * 257}, 400, "at most 256"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be one of system, user, assistant, got 'robot'"),
    ({"messages": [{"role": "tool", "content": "84"}]}, 400, "runs inside the server"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}, 400, "roles alternate"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "is empty"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400,
     "last message must be from the user"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "text only"),
    ({"messages": [{"role": "user", "content": "the cat sat on a mat " * 60}]}, 400, "model's context is 128 tokens"),
    ({"temperature": 2.5}, 400, "temperature must be in [0, 2]"),
    ({"temperature": "hot"}, 400, "temperature must be a number"),
    ({"top_p": 0}, 400, "top_p must be in (0, 1]"),
    ({"top_k": -1}, 400, "top_k must be between 0"),
    ({"max_tokens": 0}, 400, "max_tokens must be between 1 and 128"),
    ({"max_tokens": 10_000}, 400, "max_tokens must be between 1 and 128"),
    ({"seed": -1}, 400, "seed must be between 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop takes at most 4"),
    ({"stop": [""]}, 400, "stop must be a non-empty string"),
    ({"n": 2}, 400, "n must be 1"),
    ({"stream": "yes"}, 400, "stream must be true or false"),
    ({"tools": [{"type": "function"}]}, 400, "calculator is built in"),
    ({"presence_penalty": 1.0}, 400, "presence_penalty is not supported"),
]


@pytest.mark.parametrize("body, status, message", BAD_INPUTS, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_gets_a_4xx_openai_error(server, body, status, message):
    if isinstance(body, dict) and "messages" not in body and body:
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server}/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error", error
    if "context" in message:
        assert error["code"] == "context_length_exceeded"


def test_other_bad_requests(server, client):
    from openai import BadRequestError, NotFoundError

    assert httpx.get(f"{server}/v1/nowhere").json()["error"]["message"] == "no route GET /v1/nowhere"
    assert httpx.get(f"{server}/v1/chat/completions").status_code == 405
    big = httpx.post(f"{server}/v1/chat/completions", content=b"x" * 1_000_001)
    assert big.status_code == 413 and "at most 1,000,000" in big.json()["error"]["message"]
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(BadRequestError, match="temperature must be in"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=3)


def test_concurrent_streams_equal_sequential_ones(client):
    prompts = [[{"role": "user", "content": "the cat sat on a mat"}], [{"role": "user", "content": "seven dogs ran"}]]

    def stream(messages):
        chunks = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=60, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    sequential = [stream(m) for m in prompts]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(prompts[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[0], results[1]] == sequential and sequential[0] != sequential[1]


# ----------------------------------------------------------------------------------------------------------
# In-process servers with a slow model: disconnects, time limits, the queue bound, the calculator


def test_disconnect_stops_generation_and_the_queue_is_bounded(tok):
    slow = Slow(tiny_gpt(tok), delay=0.02)
    app = create_app(Engine(slow, tok), ServerConfig(model_id="slow", max_queue=1))
    body = {"messages": [{"role": "user", "content": "the cat"}], "temperature": 0, "max_tokens": 100, "stream": True}
    with live(app) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(l for l in lines if l.startswith("data: ") and '"content": ""' not in l)
            # busy now: one more request may wait, the next is refused at once
            waiting = threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions", json={
                **body, "stream": False, "max_tokens": 2}, timeout=30))
            waiting.start()
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/health").json()["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        # the stream was closed after its first token: its generation stopped long before 100 tokens
        waiting.join(timeout=30)
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{url}/health").json())["busy"] or health["served"] < 2:
            assert time.monotonic() < deadline, health
            time.sleep(0.02)
        assert health["cancelled"] == 1
        assert slow.forwards < 50  # the cancelled reply's forwards, plus 2 for the 2-token one that waited


def test_request_timeout_cuts_the_reply(tok):
    engine = Engine(Slow(tiny_gpt(tok), delay=0.05), tok)
    app = create_app(engine, ServerConfig(model_id="slow", timeout_s=0.5))
    with live(app) as url:
        body = {"messages": [{"role": "user", "content": "the cat"}], "temperature": 0, "max_tokens": 100}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
        assert reply["choices"][0]["finish_reason"] == "length" and 0 < reply["usage"]["completion_tokens"] < 100
        assert httpx.get(f"{url}/health").json()["timed_out"] == 1


class Calculating(nn.Module):
    """Writes "<|tool_call_start|>12*7<|tool_call_end|>", then, once the output was injected, " so" and stops."""

    def __init__(self, tok: Tokenizer):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"sequence_len": CONTEXT})()
        s = tok.encode_special
        self.script = [s("<|tool_call_start|>"), *tok.encode("12*7"), s("<|tool_call_end|>")]
        self.after = [*tok.encode(" so"), s("<|assistant_end|>")]
        self.output_end, self.vocab = s("<|tool_output_end|>"), tok.vocab_size
        self.seen: list[int] = []

    def forward(self, idx, kv_cache):
        self.seen += idx[0].tolist()
        kv_cache.pos += idx.size(1)
        if self.output_end in self.seen:
            written = len(self.seen) - self.seen.index(self.output_end) - 1
            token = self.after[written]
        else:
            start = self.seen.index(self.prompt_end) + 1
            token = self.script[len(self.seen) - start]
        logits = torch.zeros(1, idx.size(1), self.vocab)
        logits[0, -1, token] = 1.0
        return logits


def test_calculator_through_the_api_and_read_back(tok):
    model = Calculating(tok)
    model.prompt_end = tok.encode_special("<|assistant_start|>")
    app = create_app(Engine(model, tok), ServerConfig(model_id="calc"))
    body = {"messages": [{"role": "user", "content": "What is 12 * 7?"}], "temperature": 0}
    with live(app) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
        assert reply["choices"][0]["message"]["content"] == "[calculator: 12*7 = 84] so"
        assert reply["choices"][0]["finish_reason"] == "stop"
        model.seen = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            deltas = [json.loads(l[6:])["choices"][0]["delta"] for l in r.iter_lines()
                      if l.startswith("data: {") and '"choices": []' not in l]
    parts = [(d["part"], d["content"]) for d in deltas if d.get("content")]
    assert "".join(t for _, t in parts) == "[calculator: 12*7 = 84] so"
    assert {p for p, _ in parts} == {"tool_call", "tool_output", "text"} and parts[0][0] == "tool_call"
    # the reply sent back as text by a client becomes the tool exchange it was
    assert parts_of_shown("[calculator: 12*7 = 84] so") == [
        {"type": "tool_call", "text": "12*7"}, {"type": "tool_output", "text": "84"}, {"type": "text", "text": " so"}]
    back = parse_request({"messages": [*body["messages"], {"role": "assistant", "content": "[calculator: 12*7 = 84] so"},
                                       {"role": "user", "content": "thanks"}]}, tokenizer=tok, context=CONTEXT,
                         limits=Limits())
    s = tok.encode_special
    exchange = [s("<|tool_call_start|>"), *tok.encode("12*7"), s("<|tool_call_end|>"), s("<|tool_output_start|>"),
                *tok.encode("84"), s("<|tool_output_end|>"), *tok.encode(" so"), s("<|assistant_end|>")]
    assert any(back.prompt[i:i + len(exchange)] == exchange for i in range(len(back.prompt)))


# ----------------------------------------------------------------------------------------------------------
# The web chat in a real browser


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path):
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), \
        "the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_web_chat_in_a_real_browser(tok, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine = Engine(Slow(tiny_gpt(tok), delay=0.03), tok)
    app = create_app(engine, ServerConfig(model_id="browser"))
    wait = WebDriverWait(browser, 20, poll_frequency=0.02)
    with live(app) as url:
        browser.get(url)
        wait.until(lambda d: "context 128 tokens" in d.find_element(By.ID, "model").text)
        set_value = "arguments[0].value = arguments[1];"
        browser.execute_script(set_value, browser.find_element(By.ID, "max-tokens"), "100")
        browser.execute_script(set_value, browser.find_element(By.ID, "temperature"), "0")
        browser.find_element(By.ID, "prompt").send_keys("the cat sat")
        browser.find_element(By.ID, "send").click()

        def reply_text(d):
            replies = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            return replies[-1].text if replies else ""

        # streamed: the reply is seen growing while it is written (100 tokens x 30 ms)
        first = wait.until(lambda d: reply_text(d))
        wait.until(lambda d: len(reply_text(d)) > len(first))
        assert browser.find_element(By.ID, "send").get_attribute("disabled")
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: "(stopped)" in reply_text(d))
        assert not browser.find_element(By.ID, "send").get_attribute("disabled")
        deadline = time.monotonic() + 5
        while (health := httpx.get(f"{url}/health").json())["busy"] or health["cancelled"] < 1:
            assert time.monotonic() < deadline, health  # the server stopped generating
            time.sleep(0.05)

        # a second turn, short: it completes and the conversation has two exchanges
        browser.execute_script(set_value, browser.find_element(By.ID, "max-tokens"), "3")
        browser.find_element(By.ID, "prompt").send_keys("and then?\n")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 4
                   and not d.find_element(By.ID, "send").get_attribute("disabled"))
        assert "(stopped)" not in reply_text(browser) and reply_text(browser)
        assert browser.find_element(By.ID, "error").text == ""

        browser.find_element(By.ID, "new-chat").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []


def test_cli_errors_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "daychat.serve", "--model", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: [serve]") and len(run.stderr.splitlines()) == 1
