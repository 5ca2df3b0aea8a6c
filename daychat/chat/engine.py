"""The chat engine: KV-cache generation with the calculator tool, for the chat CLI and chat_eval.

    engine = Engine(model, tokenizer)
    for token in engine.stream(prompt_ids, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0, seed=0): ...
    engine.generate(prompt_ids, ...) -> list[int]          # the same ids as a list
    engine.reply(conversation, ...) -> str                 # render_prompt, generate, decode

The prompt is run through the model once (prefill) and every later step feeds only the new token(s)
through the GPT's KV cache (daychat.model.gpt.KVCache), so a step costs one token's compute instead of
the whole context's.

The tool (nanochat's protocol): when the model writes <|tool_call_start|> expr <|tool_call_end|>, the
engine evaluates expr with the calculator (daychat.chat.calculator) and forces
<|tool_output_start|> result <|tool_output_end|> into the sequence: the forced tokens go through the
cache in one step and are yielded like generated ones, so a streaming reader and chat_eval see the whole
exchange. The model was never trained to write tool outputs (their loss mask is 0, see
daychat.chat.format); it reads them and goes on.

Generation stops at <|assistant_end|> (not yielded: it ends the turn), at <|bos|> (a new document: a
base model's way to stop; not yielded), after `max_new_tokens` yielded ids (forced ones included) or when
the context (config.sequence_len) is full. temperature 0 is greedy; otherwise softmax sampling at that
temperature, restricted to the top_k logits when top_k > 0 and then to the nucleus of top_p probability
when top_p < 1 (Holtzman et al., arXiv:1904.09751), from a torch.Generator seeded with `seed` (with top_p
= 1, the same ops as daychat.sample, so a seed gives the same tokens with and without the cache).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from daychat.chat.calculator import evaluate
from daychat.chat.format import Conversation, render_prompt
from daychat.model.gpt import KVCache


class Engine:
    """Generation for one model and its tokenizer (batch of one). The model may be a GPT (its `hidden` and
    `head`, so that only the last position's logits are made) or anything with `config.sequence_len`,
    parameters and `forward(idx, kv_cache=cache) -> logits (B, T, V)`.

    Memory (daychat.plan.memory.generation_bytes): the cache, (layers x 2 x Hkv x sequence_len x D) in the
    activations' dtype, allocated at the first forward; the prefill's trunk activations for the prompt;
    one row of logits."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_len = model.config.sequence_len
        special = tokenizer.encode_special
        self.stop_ids = {special("<|assistant_end|>"), tokenizer.bos_id}
        self.call_start, self.call_end = special("<|tool_call_start|>"), special("<|tool_call_end|>")
        self.output_start, self.output_end = special("<|tool_output_start|>"), special("<|tool_output_end|>")

    def stream(self, prompt_ids: Iterable[int], *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
        """Yield the ids that follow `prompt_ids`, as they are generated (tool outputs included).

        Raises ValueError for an empty prompt or one that leaves no room in the context.
        """
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt: it needs at least <|bos|>")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the model's context of "
                             f"{self.max_len} tokens")
        if temperature < 0 or top_k < 0:
            raise ValueError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        cache = KVCache(self.max_len)
        logits = self._next_logits(prompt, cache)  # prefill: the whole prompt in one forward
        produced = 0
        call: list[int] | None = None  # the expression's ids while inside a tool call
        while produced < max_new_tokens and cache.pos < self.max_len:
            token = self._sample(logits, temperature, top_k, top_p, generator)
            if token in self.stop_ids:
                return
            feed = [token]
            if token == self.call_start:
                call = []
            elif token == self.call_end and call is not None:
                result = evaluate(self.tokenizer.decode(call))
                feed += [self.output_start, *self.tokenizer.encode(result), self.output_end]
                call = None
            elif call is not None:
                call.append(token)
            # what fits both budgets; the token at position max_len - 1 is the last one a step can predict
            feed = feed[:min(max_new_tokens - produced, self.max_len - cache.pos)]
            yield from feed
            produced += len(feed)
            if produced >= max_new_tokens or cache.pos + len(feed) >= self.max_len:
                return  # nothing more may be sampled: skip the forward
            logits = self._next_logits(feed, cache)

    def generate(self, prompt_ids: Iterable[int], **kwargs) -> list[int]:
        """`stream` as a list (same keyword arguments)."""
        return list(self.stream(prompt_ids, **kwargs))

    def reply(self, conversation: Conversation, **kwargs) -> str:
        """The next assistant turn of `conversation` as text (format.render_prompt drops a trailing assistant
        message). Tool calls and outputs keep their special tokens' names, e.g.
        "<|tool_call_start|>12*7<|tool_call_end|><|tool_output_start|>84<|tool_output_end|>"."""
        return self.tokenizer.decode(self.generate(render_prompt(conversation, self.tokenizer), **kwargs))

    # ----------------------------------------------------------------------------------------------------

    def _next_logits(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        """Feed `ids` (positions cache.pos ..) through the cache -> fp32 logits of the next token (V,)."""
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        with torch.inference_mode(), self._autocast():
            if hasattr(self.model, "hidden"):
                # the head at the last position only: a 2k-token prompt never holds (T, V) fp32 logits
                return self.model.head(self.model.hidden(idx, kv_cache=cache)[0, -1:])[0].float()
            return self.model(idx, kv_cache=cache)[0, -1].float()

    def _autocast(self):
        # bf16 on CUDA as in training (the weights stay fp32); plain fp32 on CPU, where bf16 is slow.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator) -> int:
        """One id from logits (V,): argmax at temperature 0, else top-k / top-p softmax sampling."""
        if temperature == 0:
            return int(logits.argmax())
        logits = logits / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1:
            # keep the likeliest tokens until their mass reaches top_p: a token goes when the mass of
            # those before it already does (the likeliest one always stays)
            probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
            drop_sorted = torch.cumsum(probs, dim=-1) - probs >= top_p
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def assistant_parts(ids: Iterable[int], tokenizer) -> list[dict]:
    """Generated ids -> the assistant message's content parts (format.py's {"type", "text"} list), so a
    reply can join the conversation and be rendered back to the same tool-call layout. Other special
    tokens (none in a well-formed reply) are dropped."""
    special = tokenizer.special_tokens
    kinds = {special["<|tool_call_start|>"]: "tool_call", special["<|tool_output_start|>"]: "tool_output"}
    closers = {special["<|tool_call_end|>"], special["<|tool_output_end|>"]}
    specials = set(special.values())
    result, kind, run = [], "text", []

    def close() -> None:
        text = tokenizer.decode(run)
        if text or kind != "text":  # an empty tool call still happened; an empty text part did not
            result.append({"type": kind, "text": text})

    for token in ids:
        if token in kinds or token in closers:
            close()
            kind, run = kinds.get(token, "text"), []
        elif token not in specials:
            run.append(token)
    if run:
        close()
    return result
