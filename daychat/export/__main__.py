"""Export a model folder for Hugging Face transformers, and optionally upload it to the Hub.

    python -m daychat.export --model models/sft --out exports/daychat
    python -m daychat.export --model models/sft --out exports/daychat --metrics-dir reports/metrics \\
        --push-to-hub your-name/daychat-d17 [--private]

The folder loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(folder)` (see daychat/export/__init__.py for what is in it). Before it is
renamed into place it is checked through transformers (logits, tokenizer ids, chat template); --no-check
skips that. --push-to-hub uploads the finished folder with huggingface_hub (log in first with
`huggingface-cli login` or set HF_TOKEN).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daychat.errors import UserError

NAME = "export"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from daychat.export import export, push_to_hub

    out = Path(args.out)
    result = export(Path(args.model), out, metrics_dir=Path(args.metrics_dir) if args.metrics_dir else None,
                    name=args.name, check=not args.no_check, say=lambda line: print(f"[{NAME}] {line}", flush=True))
    checked = (f"; transformers matches daychat (max logit difference {result['check_max_abs_logit_diff']:.2g})"
               if "check_max_abs_logit_diff" in result else "")
    print(f"[{NAME}] {out} ({result['weights_mb']:.1f} MB of weights, {result['params']:,} parameters){checked}")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"[{NAME}] uploaded to {url}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m daychat.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/sft", help="daychat model folder (models/sft)")
    parser.add_argument("--out", required=True, help="export folder to write, e.g. exports/daychat")
    parser.add_argument("--metrics-dir", help="the run's metrics (reports/metrics), quoted on the model card")
    parser.add_argument("--name", help="the model's name on its card (default: the --out folder's name)")
    parser.add_argument("--no-check", action="store_true", help="skip loading the export through transformers")
    parser.add_argument("--push-to-hub", metavar="REPO", help="then upload it to this Hugging Face Hub repo (user/name)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except UserError as e:
        print(f"error: [{NAME}] {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: [{NAME}] interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
