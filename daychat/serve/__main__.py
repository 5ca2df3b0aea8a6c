"""Serve a model: a web chat at / and an OpenAI-compatible API at /v1 (chat completions, models), /health.

    python -m daychat.serve --model models/sft                     # http://127.0.0.1:8000
    python -m daychat.serve --model models/sft --host 0.0.0.0 --port 8080   # reachable from other machines

Then open http://127.0.0.1:8000 in a browser, or point any OpenAI client at http://127.0.0.1:8000/v1 (any
API key). It listens on 127.0.0.1 (this machine only) unless --host says otherwise; there is no
authentication, so expose it only where everyone who can reach it may use it.

Limits (flags): one reply is generated at a time and at most --max-queue requests wait (429 beyond);
a request may take --timeout seconds in all (queue wait included); a body holds at most 1 MB and 256
messages, at most 4 stop strings; max_tokens is at most the model's context.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daychat.errors import UserError

NAME = "serve"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(args.model)
    if not folder.is_dir():  # before torch is imported: a typo is reported at once
        raise UserError(f"{folder} is not a folder: pass --model a model folder (models/sft)")
    import torch

    from daychat.chat.engine import Engine
    from daychat.serve.app import ServerConfig, create_app
    from daychat.tokenizer import Tokenizer
    from daychat.train.checkpoint import TOKENIZER_DIR, load_model_folder
    from daychat.train.metrics import pick_device

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    device = pick_device(args.device, "--device")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model_folder(folder, device)
    engine = Engine(model, Tokenizer.load(folder / TOKENIZER_DIR))
    model_id = args.name or f"daychat-{folder.name}"
    app = create_app(engine, ServerConfig(model_id=model_id, max_queue=args.max_queue, timeout_s=args.timeout))

    import uvicorn

    print(f"[{NAME}] {folder} on {device} as {model_id!r} (context {engine.max_len} tokens)", flush=True)
    print(f"[{NAME}] web chat: http://{args.host}:{args.port}/   OpenAI API: http://{args.host}:{args.port}/v1",
          flush=True)
    # A port that is taken stops uvicorn with its own one-line error and exit status 1.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=2)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m daychat.serve", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--model", default="models/sft", help="model folder (models/sft)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", help="the model's id in the API (default: daychat-<folder name>)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-queue", type=int, default=8, help="requests that may wait for the model (429 beyond)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take, queue wait included")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    if args.max_queue < 0 or args.timeout <= 0 or not 0 <= args.port <= 65535 or args.threads < 0:
        parser.error("--max-queue and --threads must be >= 0, --timeout > 0, --port in 0..65535")
    return args


def cli(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except UserError as e:
        print(f"error: [{NAME}] {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(cli())
