"""Chat with a trained model in the terminal.

    python -m daychat.chat --model models/sft                  # interactive, multi-turn
    python -m daychat.chat --model models/sft -p "What is 12 * 7?"   # one answer, then exit

The reply streams as it is generated; a calculator call shows as [calculator: 12*7 = 84]. In a session,
/clear starts a new conversation and /quit (or Ctrl-D, Ctrl-C) leaves; Ctrl-C during a reply stops that
reply. When the conversation outgrows the model's context the oldest turns are dropped. A base model
folder (models/base) loads too: it has the chat tokens in its vocabulary but was never taught to use them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from daychat.chat.display import Printer
from daychat.chat.engine import Engine, assistant_parts
from daychat.chat.format import Conversation, render_prompt, text_of
from daychat.errors import UserError
from daychat.tokenizer import Tokenizer
from daychat.train.checkpoint import TOKENIZER_DIR, load_model_folder
from daychat.train.metrics import pick_device

NAME = "chat"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    device = pick_device(args.device, "--device")
    folder = Path(args.model)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass --model a model folder (models/sft or models/base)")
    model, _ = load_model_folder(folder, device)
    tokenizer = Tokenizer.load(folder / TOKENIZER_DIR)
    engine = Engine(model, tokenizer)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   seed=args.seed)
    system = [{"role": "system", "content": clean_text(args.system)}] if args.system else []

    if args.prompt is not None:
        ids = fit_context(engine, system, [{"role": "user", "content": clean_text(args.prompt)}])
        if ids is None:
            size = len(render_prompt(system + [{"role": "user", "content": clean_text(args.prompt)}], tokenizer))
            raise UserError(f"{'the prompt and --system take' if system else 'the prompt takes'} {size:,} tokens, but the model's "
                            f"context is {engine.max_len:,} and a reply needs room: shorten the prompt to fit "
                            f"{engine.max_len - max(1, engine.max_len // 4):,} tokens")
        answer(engine, system + [{"role": "user", "content": clean_text(args.prompt)}], options, args.stats, ids)
        return 0

    print(f"[{NAME}] {folder} on {device}; /clear starts over, /quit or Ctrl-D leaves", file=sys.stderr)
    conversation: Conversation = []
    turn = 0
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave quietly
            print()
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/clear":
            conversation = []
            continue
        if not line.strip():
            continue
        conversation.append({"role": "user", "content": clean_text(line)})
        ids = fit_context(engine, system, conversation)
        if ids is None:
            conversation.pop()
            print(f"[{NAME}] that message alone does not fit the model's context ({engine.max_len} tokens)",
                  file=sys.stderr)
            continue
        # a new seed per turn: sampling (temperature > 0) does not repeat itself; greedy ignores it
        parts = answer(engine, system + conversation, {**options, "seed": args.seed + turn}, args.stats, ids)
        turn += 1
        if text_of(parts).strip():
            conversation.append({"role": "assistant", "content": parts})
        else:  # nothing said (stopped at once): forget the question too, roles must alternate
            conversation.pop()


def answer(engine: Engine, messages: Conversation, options: dict, stats: bool,
           ids: list[int] | None = None) -> list[dict]:
    """Stream the reply to `messages` to stdout -> its content parts. Ctrl-C stops the reply, keeping
    what was written."""
    tokenizer = engine.tokenizer
    ids = render_prompt(messages, tokenizer) if ids is None else ids
    printer, generated = Printer(tokenizer), []
    t0 = time.perf_counter()
    try:
        for token in engine.stream(ids, **options):
            generated.append(token)
            printer.feed(token)
    except KeyboardInterrupt:
        printer.flush()
        print(" [stopped]", end="")
    printer.flush()
    print(flush=True)
    if stats:
        seconds = time.perf_counter() - t0
        print(f"[{NAME}] {len(generated)} tokens in {seconds:.2f}s ({len(generated) / seconds:.1f} tok/s, "
              f"prompt {len(ids)} tokens)", file=sys.stderr)
    return assistant_parts(generated, tokenizer)


def clean_text(text: str) -> str:
    """Text as the model can take it: bytes that are not UTF-8 (which Python hands over from argv or a
    terminal as lone surrogates, unencodable) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def fit_context(engine: Engine, system: Conversation, conversation: Conversation) -> list[int] | None:
    """Prompt ids of the conversation, dropping its oldest exchanges (in place) until the prompt leaves
    room for a reply (a quarter of the context); None when even the last message does not fit."""
    room = max(1, engine.max_len // 4)
    while True:
        ids = render_prompt(system + conversation, engine.tokenizer)
        if len(ids) + room <= engine.max_len:
            return ids
        if len(conversation) < 3:
            return None
        del conversation[:2]  # the oldest user message and its answer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m daychat.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/sft", help="model folder (models/sft, or models/base)")
    parser.add_argument("-p", "--prompt", help="answer this one message and exit")
    parser.add_argument("--system", default="", help="a system message put before the first user message")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--stats", action="store_true", help="print tokens and tok/s of each reply to stderr")
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.max_new_tokens < 1:
        parser.error("--temperature and --top-k must be >= 0, --max-new-tokens >= 1")
    return args


def cli(argv: list[str] | None = None) -> int:
    """main() with one-line errors: `error: [chat] ...` and status 2 for what a user can fix."""
    if hasattr(sys.stdout, "reconfigure"):  # a model can write anything: never die on a terminal's encoding
        sys.stdout.reconfigure(errors="replace")
    try:
        return main(argv)
    except UserError as e:
        print(f"error: [{NAME}] {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # e.g. while the model loads
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`
        return 0


if __name__ == "__main__":
    sys.exit(cli())
