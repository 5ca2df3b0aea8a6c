"""The GPT (gpt.py) and its parameter / FLOP / MFU accounting (accounting.py). Imports nothing else of daychat."""

from daychat.model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
