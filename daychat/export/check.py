"""Check an export through transformers before it is published: the same logits, ids and chat format.

Run by daychat.export.export on the finished folder (still under its temporary name), and usable on any
export folder: `check_export(folder, model, tokenizer)` -> metrics, or a UserError naming what differs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daychat.chat.format import render_prompt
from daychat.errors import UserError
from daychat.tokenizer import Tokenizer

LOGITS_ATOL = 1e-4
# Text that exercises the pre-tokenizer: unicode letters and marks, emoji, digit runs, whitespace runs,
# contractions, punctuation, newlines.
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\n\r\nand blank lines\n\n\n",
    "digits 1234567890, 3.14159 and 1,000,000",
    "café naïve Zürich 東京 Ελληνικά русский 😀👍🏽",
    "Don't, I'LL, they've, WE'RE, it's",
    "def f(x):\n    return x ** 2  # comment",
    "What is 12 * 7 + 5?",
]
SAMPLE_CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 * 7?"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "What is 12 * 7?"},
     {"role": "assistant", "content": [{"type": "text", "text": "12 * 7 = "},
                                       {"type": "tool_call", "text": "12*7"},
                                       {"type": "tool_output", "text": "84"},
                                       {"type": "text", "text": "84."}]},
     {"role": "user", "content": "And plus 5?"}],
]


def template_ids(hf_tokenizer, conversation: list[dict], **kwargs) -> list[int]:
    """apply_chat_template(tokenize=True) as a list of ids, whatever container this transformers returns."""
    out = hf_tokenizer.apply_chat_template(conversation, tokenize=True, **kwargs)
    if hasattr(out, "keys"):  # a BatchEncoding (transformers 5 returns a dict by default)
        out = out["input_ids"]
    return list(out)


def check_export(folder: Path, model: torch.nn.Module, tokenizer: Tokenizer) -> dict:
    """Load `folder` with AutoModelForCausalLM / AutoTokenizer and compare with daychat's model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    hf_tokenizer.model_max_length = 10**9  # the samples are encoded whole; only the model's input is cut to its context

    for text in SAMPLE_TEXTS:
        ours, theirs = tokenizer.encode(text), hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            raise UserError(f"export check: the exported tokenizer encodes {text!r} as {theirs[:12]}..., daychat as "
                            f"{ours[:12]}...; this is a bug in daychat/export/hf_tokenizer.py")
    for conversation in SAMPLE_CONVERSATIONS:
        ours, theirs = render_prompt(conversation, tokenizer), template_ids(hf_tokenizer, conversation, add_generation_prompt=True)
        if ours != theirs:
            raise UserError("export check: the chat template renders a conversation differently from "
                            "daychat.chat.format.render_prompt; this is a bug in daychat/export/hf_tokenizer.py")

    ids = render_prompt(SAMPLE_CONVERSATIONS[-1], tokenizer)
    ids = (ids + tokenizer.encode(" ".join(SAMPLE_TEXTS)))[:model.config.sequence_len]
    idx = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model.eval()(idx), hf_model(idx).logits
    diff = float((ours - theirs).abs().max())
    if not diff <= LOGITS_ATOL:
        raise UserError(f"export check: transformers' logits differ from daychat's by {diff:.3g} (> {LOGITS_ATOL}) "
                        f"on {len(ids)} tokens; the export is not faithful")
    return {"check_max_abs_logit_diff": diff, "check_tokens": len(ids), "check_texts": len(SAMPLE_TEXTS),
            "check_conversations": len(SAMPLE_CONVERSATIONS)}
