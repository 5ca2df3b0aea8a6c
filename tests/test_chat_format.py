"""The chat format: rendering with the special tokens, the loss mask, system merging, validation, round trips."""

import pytest

from daychat.chat.format import ConversationError, normalize, parse, render, render_prompt
from daychat.tokenizer import Tokenizer

CALC = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12 * 7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute "},
        {"type": "tool_call", "text": "12 * 7"},
        {"type": "tool_output", "text": "84"},
        {"type": "text", "text": "It is 84."},
    ]},
    {"role": "user", "content": "And plus one?"},
    {"role": "assistant", "content": "85."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = "What is the answer compute it is plus one and twelve times seven 0123456789 * + . ? "
    return Tokenizer.train([text * 20] * 30, vocab_size=400)


def trained_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_render_layout_and_mask(tok):
    ids, mask = render(CALC, tok)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Answer briefly.\n\nWhat is 12 * 7?<|user_end|>"
        "<|assistant_start|>Let me compute <|tool_call_start|>12 * 7<|tool_call_end|>"
        "<|tool_output_start|>84<|tool_output_end|>It is 84.<|assistant_end|>"
        "<|user_start|>And plus one?<|user_end|><|assistant_start|>85.<|assistant_end|>")
    # trained: the assistant's words and tool calls and its end token; never the user, the tool output,
    # <|bos|> or <|assistant_start|> (the engine always supplies those)
    assert trained_text(tok, ids, mask) == (
        "Let me compute <|tool_call_start|>12 * 7<|tool_call_end|>It is 84.<|assistant_end|>85.<|assistant_end|>")
    assert mask[0] == 0 and mask[-1] == 1


def test_render_truncates_to_max_len(tok):
    ids, mask = render(CALC, tok)
    short_ids, short_mask = render(CALC, tok, max_len=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]


def test_render_prompt_primes_the_next_assistant_turn(tok):
    prompt = render_prompt(CALC[:2], tok)
    assert tok.decode(prompt) == ("<|bos|><|user_start|>Answer briefly.\n\nWhat is 12 * 7?<|user_end|>"
                                  "<|assistant_start|>")
    # a trailing reference answer is dropped: the prompt is the same
    assert render_prompt(CALC[:3], tok) == prompt
    # and it is exactly the prefix of the rendered conversation up to the first answer
    ids, _ = render(CALC[:3], tok)
    assert ids[:len(prompt)] == prompt


@pytest.mark.parametrize("conversation, reason", [
    ([], "empty"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty"),
    ([{"role": "assistant", "content": "hi"}], "role_order"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "role_order"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "system", "content": "late"}], "role_order"),
    ([{"role": "system", "content": "only system"}], "role_order"),
    ([{"role": "user", "content": "a"}], "no_assistant"),
    ([{"role": "bot", "content": "a"}], "bad_part"),
    ([{"role": "user", "content": [{"type": "tool_call", "text": "1+1"}]},
      {"role": "assistant", "content": "2"}], "bad_part"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "bad_part"),
])
def test_bad_conversations_raise_with_a_reason(tok, conversation, reason):
    with pytest.raises(ConversationError) as info:
        render(conversation, tok)
    assert info.value.reason == reason


def test_system_merged_into_first_user_turn():
    merged = normalize(CALC)
    assert [m["role"] for m in merged] == ["user", "assistant", "user", "assistant"]
    assert merged[0]["content"] == "Answer briefly.\n\nWhat is 12 * 7?"


def test_parse_inverts_render(tok):
    ids, _ = render(CALC, tok)
    expected = normalize(CALC)
    expected[-1]["content"] = [{"type": "text", "text": "85."}]
    assert parse(ids, tok) == expected


def test_parse_reads_an_unfinished_reply(tok):
    prompt = render_prompt(CALC[:2], tok)
    generated = [tok.encode_special("<|tool_call_start|>"), *tok.encode("12 * 7")]
    conversation = parse(prompt + generated, tok)
    assert conversation[-1] == {"role": "assistant", "content": [{"type": "tool_call", "text": "12 * 7"}]}
