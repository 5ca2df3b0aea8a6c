"""Conversations the project writes itself, deterministic from a seed: the offline demo's SFT data, and small
skills the real recipe adds on top of public data (nanochat mixes in the same three kinds: its
SimpleSpelling/SpellingBee tasks and identity conversations, and GSM8K-style calculator use).

- arithmetic: one- and two-step word problems and bare sums; the assistant writes the expression, calls
  the calculator (a tool_call part), reads its output (tool_output, injected at chat time, never trained)
  and states the answer, ending with GSM8K's `#### <answer>` line so answers are checked the same way.
- spelling: "spell X" and "how many <letter> in X" (the classic strawberry question): a small model sees
  tokens, not letters, so the answer spells the word out first and counts over the letters it wrote.
- identity: who the model is (daychat), who made it and what it can do, in many phrasings, sometimes
  after a greeting turn or under a system message.

`generate(task, n, seed)` returns n conversations in the format of daychat.chat.format.
"""

from __future__ import annotations

import random
from typing import Callable

from daychat.chat.format import Conversation

TASKS = ("arithmetic", "spelling", "identity")

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wen", "Yuki"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards",
         "coins", "eggs", "flowers", "candles", "buttons", "bottles", "tickets"]
# Common English words of 3-12 letters (a hand-written list: no word list ships with Python).
WORDS = """strawberry banana apple orange grape cherry lemon melon peach pear plum mango kiwi coconut tomato
potato carrot onion garlic pepper cucumber pumpkin broccoli spinach lettuce butter cheese bread coffee
sugar water river mountain forest desert island ocean valley bridge castle garden window kitchen pillow
blanket mirror ladder bottle bucket hammer scissors pencil notebook library teacher student doctor
engineer pilot farmer artist dancer singer writer painter soldier sailor rabbit giraffe elephant
kangaroo dolphin penguin octopus squirrel tiger zebra monkey parrot turtle spider butterfly mississippi
bookkeeper committee balloon coffee puzzle happiness necessary address tomorrow yesterday calendar
umbrella sandwich chocolate vanilla cinnamon raspberry blueberry pineapple watermelon computer keyboard
internet program language science history geometry algebra physics chemistry biology planet galaxy
rocket satellite telescope camera picture letter alphabet sentence paragraph question answer""".split()

IDENTITY = {
    "who": (["Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself.",
             "What is your name?", "What's your name?", "Do you have a name?", "Which model are you?",
             "Are you ChatGPT?", "Are you a human?", "who r u"],
            ["I'm daychat, a small language model. I was trained from scratch in about a day on a single "
             "GPU by the daychat pipeline, so I know less than big assistants, but I try to be helpful.",
             "My name is daychat. I am a GPT-style language model trained from scratch on one GPU in "
             "roughly 24 hours, then fine-tuned to chat.",
             "I am daychat, an AI assistant: a small transformer language model trained in a day on one "
             "graphics card. I'm not a human, and I'm not ChatGPT."]),
    "maker": (["Who made you?", "Who created you?", "Who trained you?", "Where do you come from?",
               "How were you built?", "How were you trained?"],
              ["I was trained with daychat, an open pipeline that downloads web text, filters and "
               "deduplicates it, trains a tokenizer and a GPT model on one GPU in about a day, and then "
               "fine-tunes it on conversations.",
               "The daychat pipeline built me: pretraining on filtered web text on a single GPU, then "
               "supervised fine-tuning on chat data. Anyone with one GPU can reproduce me in a day."]),
    "skills": (["What can you do?", "How can you help me?", "What are you good at?", "Can you do math?",
                "What are your limits?"],
               ["I can chat, answer simple questions, spell and count letters, and do arithmetic with a "
                "calculator tool. I am a small model, so please double-check important facts.",
                "I can hold a conversation, answer questions and solve arithmetic word problems by "
                "calling a calculator. I make mistakes, especially on hard or recent topics."]),
}
GREETINGS = (["Hi!", "Hello", "Hey there", "Good morning!", "hello?"],
             ["Hello! I'm daychat. How can I help you today?", "Hi! What can I do for you?",
              "Hey! I'm daychat, ask me anything."])
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are daychat, a friendly assistant."]


def generate(task: str, n: int, seed: int) -> list[Conversation]:
    """`n` conversations of `task` (one of TASKS), the same for the same (task, n, seed)."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r} (known: {', '.join(TASKS)})")
    rng = random.Random(f"daychat-synthetic:{task}:{seed}")  # str seeds hash with sha512: stable across runs
    return [_GENERATORS[task](rng) for _ in range(n)]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _calc(expr: str, value: float, before: str, after: str) -> list[dict]:
    """Assistant parts: text, the calculator call, its output, and the text that uses the result."""
    return [{"type": "text", "text": before}, {"type": "tool_call", "text": expr},
            {"type": "tool_output", "text": _number(value)}, {"type": "text", "text": after}]


def _arithmetic(rng: random.Random) -> Conversation:
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "div", "two_step", "bare"])
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if kind == "add":
        q = f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?"
        parts = _calc(f"{a}+{b}", a + b, f"{name} has {a} + {b} = ", f"{a + b} {item}.\n#### {a + b}")
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        q = f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} are left?"
        parts = _calc(f"{a}-{b}", a - b, f"{a} - {b} = ", f"{a - b} {item} are left.\n#### {a - b}")
    elif kind == "mul":
        a = rng.randint(2, 12)
        q = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?"
        parts = _calc(f"{a}*{b}", a * b, f"{a} boxes x {b} {item} = ", f"{a * b} {item}.\n#### {a * b}")
    elif kind == "div":
        a = rng.randint(2, 12)
        total = a * b
        q = f"{name} shares {total} {item} equally among {a} friends. How many {item} does each friend get?"
        parts = _calc(f"{total}/{a}", b, f"Each friend gets {total} / {a} = ", f"{b} {item}.\n#### {b}")
    elif kind == "two_step":
        price, count, paid = rng.randint(2, 20), rng.randint(2, 9), 0
        cost = price * count
        paid = (cost // 10 + 1) * 10 + rng.choice([0, 10, 20])
        q = (f"{name} buys {count} {item} at ${price} each and pays with ${paid}. "
             f"How much change does {name} get?")
        parts = (_calc(f"{count}*{price}", cost, f"The {item} cost {count} x ${price} = $", f"{cost}. ")
                 + _calc(f"{paid}-{cost}", paid - cost, f"The change is ${paid} - ${cost} = $",
                         f"{paid - cost}.\n#### {paid - cost}"))
    else:
        a, b = rng.randint(10, 9999), rng.randint(10, 999)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        q = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"{a} {op} {b} = ?"])
        parts = _calc(f"{a}{op}{b}", value, f"{a} {op} {b} = ", f"{value}.\n#### {value}")
    return [{"role": "user", "content": q}, {"role": "assistant", "content": parts}]


def _spelling(rng: random.Random) -> Conversation:
    word = rng.choice(WORDS)
    spelled = "-".join(word)
    if rng.random() < 0.3:
        q = rng.choice([f"Spell the word {word}.", f"How do you spell {word}?", f"Spell '{word}' letter by letter."])
        return [{"role": "user", "content": q},
                {"role": "assistant", "content": f"{word} is spelled {spelled} ({len(word)} letters)."}]
    # Mostly letters the word has; sometimes one it lacks (the answer 0 must be learned too).
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    count = word.count(letter)
    positions = [str(i + 1) for i, ch in enumerate(word) if ch == letter]
    q = rng.choice([f"How many {letter} are in {word}?", f"How many times does the letter {letter} appear in {word}?",
                    f"Count the letter '{letter}' in the word '{word}'.", f"how many {letter}s in {word}"])
    where = f" at positions {', '.join(positions)}" if positions else ""
    answer = (f"{word} is spelled {spelled}. The letter {letter} appears {count} "
              f"time{'s' if count != 1 else ''}{where}.\n#### {count}")
    return [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]


def _identity(rng: random.Random) -> Conversation:
    questions, answers = IDENTITY[rng.choice(sorted(IDENTITY))]
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    if rng.random() < 0.25:
        messages += [{"role": "user", "content": rng.choice(GREETINGS[0])},
                     {"role": "assistant", "content": rng.choice(GREETINGS[1])}]
    messages += [{"role": "user", "content": rng.choice(questions)},
                 {"role": "assistant", "content": rng.choice(answers)}]
    return messages


_GENERATORS: dict[str, Callable[[random.Random], Conversation]] = {
    "arithmetic": _arithmetic, "spelling": _spelling, "identity": _identity}
