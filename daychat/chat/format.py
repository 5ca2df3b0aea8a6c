"""The chat format: conversations as token ids with a loss mask, for SFT, the chat engine and chat_eval.

A conversation is a list of messages, each {"role": ..., "content": ...}:

    [{"role": "system", "content": "Be brief."},              # optional, first only; merged into user 1
     {"role": "user", "content": "What is 12 * 7?"},
     {"role": "assistant", "content": [                        # a str, or a list of parts:
         {"type": "text", "text": "12 * 7 = "},
         {"type": "tool_call", "text": "12 * 7"},              # the calculator is asked ...
         {"type": "tool_output", "text": "84"},                # ... and answers (injected, not generated)
         {"type": "text", "text": "84."}]}]

Roles alternate user, assistant, user, ... and a conversation to train on ends with the assistant.
Rendered (nanochat's layout):

    <|bos|> <|user_start|> system + "\n\n" + user 1 <|user_end|>
            <|assistant_start|> text <|tool_call_start|> expr <|tool_call_end|>
                                <|tool_output_start|> result <|tool_output_end|> text <|assistant_end|>
            <|user_start|> ... <|user_end|> <|assistant_start|> ... <|assistant_end|>

The mask is 1 on the tokens the model is trained to produce: the assistant's text and tool calls with
their delimiters and the closing <|assistant_end|> (so it learns to stop). It is 0 on <|bos|>, user
turns, <|assistant_start|> (always given by the engine as the prompt's last token) and tool outputs with
their delimiters (the engine injects them; the model must not learn to invent results).

There is no separate system role in the vocabulary: a system message is prepended to the first user
turn, which is what the model sees either way and keeps the vocabulary small (nanochat does the same).
"""

from __future__ import annotations

from typing import Any

from daychat.errors import UserError

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "tool_call", "tool_output")

Message = dict[str, Any]
Conversation = list[Message]


class ConversationError(UserError):
    """A conversation that cannot be rendered; `reason` is a short key for counting skips."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def parts(content: str | list[dict]) -> list[dict]:
    """A message's content as a list of {"type", "text"} parts (a plain string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def text_of(content: str | list[dict]) -> str:
    """The visible text of a message: text parts and tool calls/outputs concatenated."""
    return "".join(part["text"] for part in parts(content))


def normalize(conversation: Conversation, *, for_training: bool = True) -> Conversation:
    """Validated copy with the system message merged into the first user turn.

    Raises ConversationError (reason: "empty", "role_order", "bad_part", "no_assistant") for a conversation
    that cannot be rendered. With for_training=False the conversation may end with a user turn (a prompt).
    """
    if not isinstance(conversation, list) or not conversation:
        raise ConversationError("empty", "the conversation has no messages")
    messages = []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise ConversationError("bad_part", f"message {i} must be {{'role': one of {ROLES}, 'content': ...}}")
        content = message["content"]
        if not isinstance(content, (str, list)):
            raise ConversationError("bad_part", f"message {i} content must be a string or a list of parts")
        for part in parts(content):
            if (not isinstance(part, dict) or part.get("type") not in PART_TYPES
                    or not isinstance(part.get("text"), str)):
                raise ConversationError("bad_part", f"message {i} has a part that is not {{'type': one of "
                                                    f"{PART_TYPES}, 'text': str}}")
            if part["type"] != "text" and message["role"] != "assistant":
                raise ConversationError("bad_part", f"message {i}: only the assistant calls tools")
        if not text_of(content).strip():
            raise ConversationError("empty", f"message {i} ({message['role']}) is empty")
        messages.append({"role": message["role"], "content": content})

    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ConversationError("role_order", "a system message must be followed by a user message")
        system, first = messages[0], messages[1]
        merged = text_of(system["content"]).strip() + "\n\n" + text_of(first["content"])
        messages = [{"role": "user", "content": merged}, *messages[2:]]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ConversationError("role_order", f"turn {i} is {message['role']}, expected {expected} "
                                                  "(roles alternate user, assistant, ...; system only first)")
    if for_training and messages[-1]["role"] != "assistant":
        raise ConversationError("no_assistant", "the conversation does not end with an assistant message")
    return messages


def render(conversation: Conversation, tokenizer, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation to train on; mask[i] = 1 where ids[i] is trained on (see module doc).

    Longer than `max_len` tokens: cut to the first `max_len` (the caller decides whether a cut conversation
    is still worth training on; see `fits`).
    """
    messages = normalize(conversation, for_training=True)
    ids, mask = _render(messages, tokenizer)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def render_prompt(conversation: Conversation, tokenizer) -> list[int]:
    """Ids that prime the model to write the next assistant turn: the conversation up to its last user
    message, then <|assistant_start|>. A trailing assistant message (e.g. an eval item's reference
    answer) is dropped."""
    messages = normalize(conversation, for_training=False)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = _render(messages, tokenizer)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


def _render(messages: Conversation, tokenizer) -> tuple[list[int], list[int]]:
    special = tokenizer.encode_special
    ids, mask = [tokenizer.bos_id], [0]

    def add(tokens: list[int], trained: int) -> None:
        ids.extend(tokens)
        mask.extend([trained] * len(tokens))

    for message in messages:
        if message["role"] == "user":
            add([special("<|user_start|>"), *tokenizer.encode(text_of(message["content"])), special("<|user_end|>")], 0)
            continue
        add([special("<|assistant_start|>")], 0)
        for part in parts(message["content"]):
            if part["type"] == "text":
                add(tokenizer.encode(part["text"]), 1)
            elif part["type"] == "tool_call":
                add([special("<|tool_call_start|>"), *tokenizer.encode(part["text"]), special("<|tool_call_end|>")], 1)
            else:  # tool_output: injected by the engine at generation time
                add([special("<|tool_output_start|>"), *tokenizer.encode(part["text"]), special("<|tool_output_end|>")], 0)
        add([special("<|assistant_end|>")], 1)
    return ids, mask



def parse(ids: list[int], tokenizer) -> Conversation:
    """The conversation a rendered id sequence holds: the inverse of `render` (for a normalized
    conversation, `parse(render(c)[0]) == normalize(c)` with assistant content as a list of parts).

    Used to read back what a model generated, tool calls included. An unfinished last turn (no end token
    yet) is returned as far as it goes.
    """
    names = {tokenizer.encode_special(name): name for name in (
        "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
        "<|tool_call_start|>", "<|tool_call_end|>", "<|tool_output_start|>", "<|tool_output_end|>")}
    part_of = {"<|tool_call_start|>": "tool_call", "<|tool_output_start|>": "tool_output"}
    messages: Conversation = []
    role, kind, pending = None, "text", []  # current message role, current part type, its token ids

    def flush() -> None:
        if pending and role == "assistant":
            messages[-1]["content"].append({"type": kind, "text": tokenizer.decode(pending)})
        elif pending and role == "user":
            messages[-1]["content"] += tokenizer.decode(pending)
        pending.clear()

    for token in ids:
        name = names.get(token)
        if name is None:
            pending.append(token)
        elif name == "<|user_start|>":
            role = "user"
            messages.append({"role": "user", "content": ""})
        elif name == "<|assistant_start|>":
            role, kind = "assistant", "text"
            messages.append({"role": "assistant", "content": []})
        elif name in part_of:
            flush()
            kind = part_of[name]
        elif name in ("<|tool_call_end|>", "<|tool_output_end|>"):
            flush()
            kind = "text"
        elif name in ("<|user_end|>", "<|assistant_end|>"):
            flush()
            role = None
        # <|bos|> starts the sequence and carries no text
    flush()
    return messages
