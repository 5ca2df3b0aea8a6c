"""export stage: the SFT model as a folder Hugging Face transformers loads, with its model card.

    python stages/export.py --model models/sft --metrics-dir reports/metrics --out exports/daychat \
        --cache .cache/export --metrics reports/metrics/export.json

Reads params.yaml's `export` section (name, verify). Writes exports/<name>/ as a whole (safetensors
weights, config.json + the modeling files, the tokenizer with daychat's chat format as a Jinja chat
template, generation_config.json, README.md model card quoting reports/metrics, daychat_meta.json), after
loading it through transformers and comparing logits, token ids and the chat template with daychat's
(export.verify). Metrics: name, params, weights_mb, weights_sha256, the check's max logit difference.
Ends with how to load the folder and how to serve the model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from daychat.cli import run, status
from daychat.io import write_metrics
from daychat.params import load_section

NAME = "export"


def main() -> None:
    args = parse_args()
    p = load_section(NAME)
    # transformers copies an export's modeling files into a modules cache to import them (the check):
    # keep it in the workspace's scratch, and never reach for the network from a pipeline stage.
    os.environ.setdefault("HF_MODULES_CACHE", str(Path(args.cache).resolve() / "hf_modules"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from daychat.export import export

    out = Path(args.out)
    result = export(Path(args.model), out, metrics_dir=Path(args.metrics_dir), name=p.name, check=p.verify,
                    say=lambda line: status(NAME, line))
    write_metrics(args.metrics, result)
    checked = (f"; transformers matches daychat (max logit difference {result['check_max_abs_logit_diff']:.2g})"
               if "check_max_abs_logit_diff" in result else "")
    status(NAME, f"{out.resolve()} ({result['weights_mb']:.1f} MB of weights){checked}")
    status(NAME, f"load it: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)")
    status(NAME, f"chat with it: python -m daychat.serve --model {args.model}  (then open http://127.0.0.1:8000)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder to export (models/sft)")
    parser.add_argument("--metrics-dir", required=True, help="the run's metrics, quoted on the model card (reports/metrics)")
    parser.add_argument("--out", required=True, help="export folder to write (exports/<name>)")
    parser.add_argument("--cache", required=True, help="scratch folder (transformers' modules cache for the check)")
    parser.add_argument("--metrics", required=True, help="flat metrics JSON to write")
    return parser.parse_args()


if __name__ == "__main__":
    run(main, NAME)
