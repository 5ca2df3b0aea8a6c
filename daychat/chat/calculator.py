"""The calculator tool: arithmetic the model asks for between <|tool_call_start|> and <|tool_call_end|>.

The expression comes from a model, so it is untrusted text: it is parsed with `ast` and only a whitelist of
nodes is walked (numbers, + - * / // % **, unary + and -, parentheses); names, calls, attributes,
subscripts, strings and everything else are refused. Nothing is ever passed to eval or exec. Sizes are
bounded so that no expression can stall the engine: the text length, the number of digits of any integer
(a power or product is refused *before* it is computed when its result would be too long) and float
overflow.

GSM8K's own calculator annotations look like `<<48/2=24>>`: plain arithmetic, sometimes with thousands
separators ("1,200") or a currency sign, which are accepted. nanochat's tool does the same job with a
character whitelist and Python's eval; the `ast` walk here allows powers without that risk.

`evaluate(text)` always returns a string: the result ("84", "2.5", "0.333333") or "error: <why>".
"""

from __future__ import annotations

import ast
import math
import operator
import re

MAX_CHARS = 200  # a longer expression is not arithmetic a chat model needs (and bounds parser recursion)
MAX_DIGITS = 100  # integers longer than this are refused: far beyond any word problem
FLOAT_DIGITS = 6  # decimals kept in a float result (0.1 + 0.2 -> "0.3", 1 / 3 -> "0.333333")

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# "1,234,567" -> "1234567": a comma followed by exactly three digits inside a number is a thousands separator
# (anything else with a comma, e.g. "1,2", stays and is refused as a tuple).
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# Symbols people (and models trained on people) write for arithmetic.
_SYMBOLS = str.maketrans({"×": "*", "÷": "/", "−": "-", "$": None, "€": None, "£": None})


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot compute; the message is shown to the model."""


def evaluate(text: str) -> str:
    """The value of the arithmetic expression `text` as a string, or "error: <why>" (never raises)."""
    try:
        return format_number(compute(text))
    except CalculatorError as e:
        return f"error: {e}"


def compute(text: str) -> int | float:
    """The value of `text`; CalculatorError for anything that is not bounded arithmetic."""
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    source = _THOUSANDS.sub("", text.translate(_SYMBOLS)).strip().removesuffix("=")  # "48/2=" as in <<48/2=24>>
    if not source:
        raise CalculatorError("empty expression")
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError(f"not an arithmetic expression: {text.strip()!r}") from None
    return _walk(tree.body)


def _walk(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # True is an int in Python
            raise CalculatorError(f"only numbers are allowed, not {value!r}")
        return _check(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        _refuse_huge(node.op, left, right)
        try:
            return _check(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
        except TypeError:  # e.g. a negative number to a fractional power gives a complex number
            raise CalculatorError("result is not a real number") from None
    # terse: the message is injected into the model's context
    raise CalculatorError(f"{type(node).__name__} is not allowed")


def _digits(x: int | float) -> float:
    """Decimal digits of |x| (before the point), at least 1."""
    return max(1.0, math.log10(abs(x)) + 1) if x else 1.0


def _refuse_huge(op: ast.operator, left: int | float, right: int | float) -> None:
    """Refuse an operation whose result would exceed MAX_DIGITS before computing it: 9 ** 9 ** 9 would
    otherwise run for minutes."""
    if isinstance(op, ast.Pow):
        if isinstance(right, int) and abs(right) > 10_000:  # also bounds 1 ** huge and 0.5 ** huge
            raise CalculatorError("exponent too large")
        if abs(left) > 1 and right > 0 and right * math.log10(abs(left)) > MAX_DIGITS:
            raise CalculatorError(f"result would have more than {MAX_DIGITS} digits")
    elif isinstance(op, ast.Mult) and _digits(left) + _digits(right) > MAX_DIGITS + 1:
        raise CalculatorError(f"result would have more than {MAX_DIGITS} digits")


def _check(value: int | float | complex) -> int | float:
    if isinstance(value, complex):
        raise CalculatorError("result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    if isinstance(value, int) and _digits(value) > MAX_DIGITS:
        raise CalculatorError(f"result would have more than {MAX_DIGITS} digits")
    return value


def format_number(value: int | float) -> str:
    """Integers as they are; floats rounded to FLOAT_DIGITS decimals, an integral float without ".0",
    a very large or very small float in scientific notation."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1e15 or abs(value) < 10 ** -FLOAT_DIGITS:
        return f"{value:.{FLOAT_DIGITS}g}"
    text = f"{round(value, FLOAT_DIGITS):.{FLOAT_DIGITS}f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text
