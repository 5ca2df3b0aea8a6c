"""How a reply shows as text, and back: the chat CLI, the server's API and its web page share it.

A reply's ids show as their text, with a calculator exchange as `[calculator: 12*7 = 84]`:

    <|tool_call_start|> 12*7 <|tool_call_end|> <|tool_output_start|> 84 <|tool_output_end|>
    -> "[calculator: " "12*7" " = " "" "84" "]"

`Printer` writes generated ids that way as they come (and knows which part each piece belongs to: text,
tool_call or tool_output); `parts_of_shown` reads such a text back into format.py's content parts, so a
client that sends a reply back as plain text (any OpenAI client) gives the model its own tool call again.
"""

from __future__ import annotations

import re
import sys

# How tool tokens show.
SHOWN = {"<|tool_call_start|>": "[calculator: ", "<|tool_call_end|>": " = ",
         "<|tool_output_start|>": "", "<|tool_output_end|>": "]"}
# `[calculator: EXPR = RESULT]`: the calculator's results are numbers or one-line "error: ..." messages.
SHOWN_CALL = re.compile(r"\[calculator: (.+?) = ([^\]\n]*)\]")


class Printer:
    """Writes generated ids to a text stream as they come. A multi-byte character can span tokens, so the
    current run is decoded whole each time and only its new, complete characters are written. `part` is
    the content part being written: "text", "tool_call" (from "[calculator: " through " = ") or
    "tool_output" (the result and the closing "]")."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.shown = {tokenizer.encode_special(name): text for name, text in SHOWN.items()}
        self.specials = set(tokenizer.special_tokens.values())
        self.opens = {tokenizer.encode_special("<|tool_call_start|>"): "tool_call",
                      tokenizer.encode_special("<|tool_output_start|>"): "tool_output"}
        self.output_end = tokenizer.encode_special("<|tool_output_end|>")
        self.run: list[int] = []
        self.written = 0  # characters of decode(run) already written
        self.part = "text"

    def feed(self, token: int) -> None:
        if token in self.specials:
            self.flush()
            self.run, self.written = [], 0
            self.part = self.opens.get(token, self.part)
            self._write(self.shown.get(token, ""))
            if token == self.output_end:
                self.part = "text"
            return
        self.run.append(token)
        text = self.tokenizer.decode(self.run)
        if not text.endswith("\ufffd"):  # wait for the rest of a cut character
            self._write(text[self.written:])
            self.written = len(text)

    def flush(self) -> None:
        text = self.tokenizer.decode(self.run)
        self._write(text[self.written:])
        self.written = len(text)

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


def parts_of_shown(text: str) -> str | list[dict]:
    """A reply as shown -> its content: the string itself when it holds no calculator exchange, else
    format.py's parts, e.g. "so [calculator: 12*7 = 84] 84" -> text, tool_call "12*7", tool_output "84", text."""
    parts, pos = [], 0
    for match in SHOWN_CALL.finditer(text):
        if match.start() > pos:
            parts.append({"type": "text", "text": text[pos:match.start()]})
        parts += [{"type": "tool_call", "text": match[1]}, {"type": "tool_output", "text": match[2]}]
        pos = match.end()
    if not parts:
        return text
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts
