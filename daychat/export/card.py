"""The model card (README.md) of an export, from the model folder's meta.json and the run's metrics.

Every number on the card is read from a file the run wrote; a metric that is absent (a stage that did not
run) is left out, never filled in. Evaluation results keep their labels: a demo subset is never called
CORE or ChatCORE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The stages whose flat metrics the card quotes, by file name in reports/metrics/.
METRICS_FILES = {"tokenizer": "tokenizer.json", "pretrain": "pretrain.json", "core_eval": "core.json",
                 "sft": "sft.json", "chat_eval": "chat_eval.json"}


def read_metrics(folder: Path) -> dict[str, dict]:
    """{stage: its flat metrics} for the METRICS_FILES present and readable in `folder`."""
    found = {}
    for stage, name in METRICS_FILES.items():
        path = Path(folder) / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            found[stage] = data
    return found


def _num(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    rows = [(k, v) for k, v in rows if v is not None]
    if not rows:
        return []
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def render(*, name: str, config, counts: dict[str, int], meta: dict, metrics: dict[str, dict], tokenizer) -> str:
    pre, core, sft, chat, tok = (metrics.get(k, {}) for k in ("pretrain", "core_eval", "sft", "chat_eval", "tokenizer"))
    code = meta.get("code") or {}
    hardware = meta.get("hardware") or {}
    windows = "global everywhere" if set(config.window_pattern) == {"L"} else \
        f"pattern {config.window_pattern!r}, short window {config.short_window} (last layer global)"
    lines = [
        "---",
        "license: mit",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [daychat, custom_code, chat]",
        "---",
        "",
        f"# {name}",
        "",
        f"A {counts['total'] / 1e6:.1f}M-parameter chat model trained from scratch by "
        "daychat (pretraining, then supervised fine-tuning on conversations), exported "
        "for `transformers`. The network is daychat's own GPT (`gpt.py` in this folder, a verbatim copy of "
        "daychat's `daychat/model/gpt.py`), so loading needs `trust_remote_code=True`.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)',
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        'messages = [{"role": "user", "content": "What is 12 * 7?"}]',
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
        "print(tokenizer.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "Replace the name by this folder's path to load it from disk. Generation stops at `<|assistant_end|>`. "
        "One prompt at a time (or prompts of equal length): the model takes no padding.",
        "",
        "With daychat installed, `python -m daychat.serve --model <daychat model folder>` serves a web chat and "
        "an OpenAI-compatible API, and runs the calculator tool (below).",
        "",
        "## Model",
        "",
        *_table([
            ("parameters", f"{counts['total']:,} ({counts.get('matmul', 0):,} in matmuls)"),
            ("layers", config.depth), ("model width", config.model_dim),
            ("attention heads", f"{config.n_head} query, {config.kv_heads} key/value, head dim {config.head_dim}"),
            ("attention", windows), ("context", f"{config.sequence_len} tokens"),
            ("vocabulary", f"{config.vocab_size:,} ({len(tokenizer.special_tokens)} special tokens)"),
            ("design", "rotary positions, QK-norm, parameter-free RMSNorm, ReLU² MLP, untied embeddings, "
                       f"logit soft-cap {config.softcap:g}, value embeddings, per-layer residual scalars"
                       + (", smear (previous-token embedding gate)" if getattr(config, "smear", False) else "")
                       + (", backout (mid-depth residual subtracted before the head)" if getattr(config, "backout", False) else "")),
        ]),
        "## Training",
        "",
        *_table([
            ("pretraining tokens", _num(pre.get("tokens"))),
            ("pretraining compute", f"{pre['flops']:.3g} FLOPs" if isinstance(pre.get("flops"), (int, float)) else None),
            ("validation bits per byte", _num(pre.get("val_bpb"))),
            ("SFT conversations", _num(sft.get("conversations"))),
            ("SFT validation loss", _num(sft.get("val_loss"))),
            ("tokenizer bytes per token", _num(tok.get("bytes_per_token"), ".3f") if tok.get("bytes_per_token") else None),
            ("hardware", hardware.get("device")),
        ]),
        *_evaluation(core, chat),
        "## Chat format",
        "",
        "`tokenizer.apply_chat_template` renders daychat's format exactly:",
        "",
        "```",
        "<|bos|><|user_start|>{system}\\n\\n{user}<|user_end|><|assistant_start|>{reply}<|assistant_end|>"
        "<|user_start|>...<|user_end|><|assistant_start|>",
        "```",
        "",
        "A system message is merged into the first user turn; roles alternate user, assistant. The model was "
        "taught a calculator tool: it writes `<|tool_call_start|>12*7<|tool_call_end|>` and expects "
        "`<|tool_output_start|>84<|tool_output_end|>` to follow before it goes on. `generate` does not run the "
        "tool (it stops nowhere special); daychat's chat engine does. Assistant messages may be given as a list "
        "of parts `{\"type\": \"text\" | \"tool_call\" | \"tool_output\", \"text\": ...}`.",
        "",
        "## Limitations",
        "",
        "- A small model trained in a day or less: expect fluent mistakes, invented facts, and no safety tuning.",
        "- Special-token strings typed in a message (e.g. `<|user_end|>`) are read as special tokens by the "
        "transformers tokenizer; daychat's own tokenizer encodes them as plain text.",
        "",
        "## Provenance",
        "",
        *_table([
            ("daychat commit", f"{code.get('commit')}{' (with local changes)' if code.get('dirty') else ''}"
             if code.get("commit") else None),
            ("trained on", f"{hardware.get('device')}; {hardware.get('cpu')}" if hardware else None),
            ("training data (SFT)", ", ".join(sorted((meta.get("data") or {}).get("sources") or {})) or None),
        ]),
        "The model folder's full `meta.json` (params, data, schedule, library versions) is `daychat_meta.json`.",
        "",
    ]
    return "\n".join(lines)


def _evaluation(core: dict, chat: dict) -> list[str]:
    rows: list[tuple[str, Any]] = []
    for data, key in ((core, "core"), (chat, "chatcore")):
        for name in (key, f"{key}_subset"):
            if isinstance(data.get(name), (int, float)):
                label = data.get("label") or name
                rows.append((label, _num(data[name])))
    for key, value in sorted(chat.items()):
        if key.startswith("acc_") and isinstance(value, (int, float)):
            rows.append((f"{key[4:]} accuracy (n={_num(chat.get('n_' + key[4:]))})", _num(value)))
    if not rows:
        return []
    return ["## Evaluation", "", *_table(rows),
            "CORE is the DCLM in-context benchmark (22 tasks); ChatCORE the mean centered accuracy on ARC-Easy, "
            "ARC-Challenge, MMLU and GSM8K. A *subset* label means fewer items or tasks than the full benchmark.", ""]
