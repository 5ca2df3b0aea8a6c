"""daychat's tokenizer as a Hugging Face fast tokenizer, and its chat format as a Jinja chat template.

daychat encodes with tiktoken: the text is split by a regex, then each piece is merged byte-pair by
byte-pair, always the adjacent pair whose concatenation has the lowest rank, and a piece that is a token
as a whole is that token. The same tokenizer in the `tokenizers` library:

- pre-tokenizer: Split by the same regex (Oniguruma reads its possessive quantifiers and \\p classes the
  way fancy-regex does), then ByteLevel (each byte as one printable character, GPT-2's table);
- model: BPE over those characters with vocab = the ranks, and merges = every split of a token into two
  tokens (left, right), ordered by the rank of the token they make: the lowest-ranked merge available is
  then exactly tiktoken's lowest-ranked pair (a token is always newer than its parts, so ties cannot
  reorder anything); `ignore_merges` makes a whole-token piece that token, as tiktoken does;
- special tokens: added after the ranks, with daychat's ids.

The one difference: HF tokenizers recognise special-token strings inside text (a user typing
"<|user_end|>" gets the special id), where daychat's `encode` keeps them as plain text. The chat template
needs that recognition (it renders the special tokens as text); tests/test_export.py checks the ids of
varied text and of rendered conversations against daychat's.
"""

from __future__ import annotations

from daychat.tokenizer import BOS, Tokenizer

# Rendered by transformers' sandboxed Jinja (apply_chat_template), the same layout as
# daychat.chat.format: a system message is merged into the first user turn (stripped, then a blank line),
# roles alternate user/assistant, assistant content is a string or a list of {"type": "text" | "tool_call" |
# "tool_output", "text"} parts; add_generation_prompt ends with <|assistant_start|> and, like
# format.render_prompt, drops a trailing assistant message first.
CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set msgs = messages -%}"
    "{%- if msgs and msgs[0]['role'] == 'system' -%}"
    "{%- if msgs | length < 2 or msgs[1]['role'] != 'user' -%}"
    "{{ raise_exception('a system message must be followed by a user message') }}"
    "{%- endif -%}"
    "{%- set merged = (text_of(msgs[0]['content']) | trim) ~ '\\n\\n' ~ text_of(msgs[1]['content']) -%}"
    "{%- set msgs = [{'role': 'user', 'content': merged}] + msgs[2:] -%}"
    "{%- endif -%}"
    "{%- if add_generation_prompt and msgs and msgs[-1]['role'] == 'assistant' -%}"
    "{%- set msgs = msgs[:-1] -%}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for message in msgs -%}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{ raise_exception('roles must alternate user, assistant, ... (a system message only first)') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user_start|>{{ text_of(message['content']) }}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'tool_call' -%}<|tool_call_start|>{{ part['text'] }}<|tool_call_end|>"
    "{%- elif part['type'] == 'tool_output' -%}<|tool_output_start|>{{ part['text'] }}<|tool_output_end|>"
    "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)

EOS = "<|assistant_end|>"  # the end of a reply: what generation stops at


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer and decoder use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> the BPE vocab and merges of the same tokenizer (see the module docstring)."""
    table = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []  # (rank of the merged token, rank of left, rank of right, left, right)
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(text(left), text(right)) for *_, left, right in merges]


def fast_tokenizer(tokenizer: Tokenizer):
    """daychat Tokenizer -> `tokenizers.Tokenizer` that gives the same ids (specials at daychat's ids)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab, merges = vocab_and_merges(tokenizer.ranks)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    names = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    for name in names:  # added tokens take the next free ids: the same as daychat's, checked
        if hf.token_to_id(name) != tokenizer.special_tokens[name]:
            raise ValueError(f"special token {name} got id {hf.token_to_id(name)}, daychat has "
                             f"{tokenizer.special_tokens[name]}")
    return hf


def save_pretrained(tokenizer: Tokenizer, out, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and the special tokens map
    into `out` with transformers' own writer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=fast_tokenizer(tokenizer), bos_token=BOS, eos_token=EOS,
                                 pad_token=EOS, chat_template=CHAT_TEMPLATE, model_max_length=model_max_length,
                                 clean_up_tokenization_spaces=False)
    hf.save_pretrained(str(out))
