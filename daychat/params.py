"""Typed, validated parameters: one dataclass per `params.yaml` section.

`params.yaml` is the single source of truth for every knob; DVC tracks the sections each stage declares
in `dvc.yaml`, and Snakemake sees the same values as rule params. A stage loads only its own section:

    p = load_section("tokenizer")          # -> TokenizerParams, or UserError with one line

Every mistake stops with one line that names the key:
    params.yaml: tokenizer.vocab_sise is not a known key (did you mean vocab_size?)
    params.yaml: tokenizer.vocab_size must be an integer, got 'big'
    params.yaml: pretokenize.dtype must be one of auto, uint16, uint32, got 'int8'

Fields carry their limits in `metadata` (`min`, `max`, `choices`); rules that involve several fields
live in the section's `check()`. Numbers are parsed defensively because the two YAML readers in play
disagree: PyYAML (YAML 1.1) reads `3e-4` as a string, DVC's ruamel reads it as a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from daychat.errors import UserError

PARAMS_FILE = "params.yaml"


class ParamsError(UserError):
    def __init__(self, key: str, message: str, file: str = PARAMS_FILE):
        super().__init__(f"{file}: {key} {message}")
        self.key, self.message = key, message


def _limit(*, min: float | None = None, max: float | None = None, choices: tuple | None = None,
           doc: str = "") -> dict:
    return {"min": min, "max": max, "choices": choices, "doc": doc}


def knob(default: Any, **limits: Any) -> Any:
    """A dataclass field with its validation limits (and a list default copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=_limit(**limits))
    return field(default=default, metadata=_limit(**limits))


# ----------------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class DownloadParams:
    """Where the pretraining text comes from. Output: parquet shards `id, text, source`; the LAST shard
    is the validation split (for `hf`, the dataset's own last shard, as nanochat does)."""

    # hf: a public dataset by preset name (see daychat.data.sources.HF_PRESETS); url: a mirror of the
    # same layout over http(s):// or file://; local: a directory or glob of parquet/jsonl/jsonl.gz/txt;
    # embedded: text that ships with Python and the installed packages (offline demo, needs nothing).
    source: str = knob("hf", choices=("hf", "url", "local", "embedded"))
    dataset: str = knob("fineweb-edu", choices=("fineweb-edu", "climbmix"))
    url: str = ""  # base URL of a mirror (source: url)
    pattern: str = "shard_{index:05d}.parquet"  # shard file name under the base URL
    shards: int = knob(8, min=2)  # shards fetched in all (hf/url): shards-1 train + 1 validation
    val_shard: int = knob(-1, min=-1)  # index of the validation shard; -1: dataset's last (hf) / shards-1 (url)
    path: str = ""  # source: local
    text_field: str = "text"  # column / JSON key that holds the document text
    include: list[str] = knob(["stdlib", "packages"])  # source: embedded
    shard_chars: int = knob(250_000_000, min=1000)  # re-sharded sources: characters per output shard
    max_chars: int = knob(0, min=0)  # re-sharded sources: stop after this many characters (0 = all)
    retries: int = knob(5, min=0, max=100)
    timeout_s: float = knob(60.0, min=1.0)
    workers: int = knob(4, min=1, max=64)  # parallel downloads

    def check(self) -> None:
        if self.source == "url" and not self.url:
            raise ParamsError("download.url", "is required when download.source is url")
        if self.source == "url" and not self.url.startswith(("http://", "https://", "file://")):
            raise ParamsError("download.url", f"must start with http://, https:// or file://, got {self.url!r}")
        if self.source == "local" and not self.path:
            raise ParamsError("download.path", "is required when download.source is local")
        if self.source in ("hf", "url") and "{index" not in self.pattern:
            raise ParamsError("download.pattern", f"must contain {{index}} (e.g. shard_{{index:05d}}.parquet), got {self.pattern!r}")
        if self.source == "url" and 0 <= self.val_shard < self.shards - 1:
            raise ParamsError("download.val_shard", f"must be past the train shards (>= shards-1 = {self.shards - 1}) or -1, got {self.val_shard}")
        bad = sorted(set(self.include) - {"stdlib", "packages"})
        if bad or not self.include:
            raise ParamsError("download.include", f"must list one or more of stdlib, packages, got {self.include}")


@dataclass(frozen=True)
class TokenizerParams:
    """BPE tokenizer trained with rustbpe, saved in tiktoken's format."""

    vocab_size: int = knob(32768, min=1, max=4_294_967_295)  # including the special tokens
    max_chars: int = knob(2_000_000_000, min=1)  # characters of training text fed to BPE
    doc_cap: int = knob(10_000, min=0)  # at most this many characters of one document (0 = whole)
    pattern: str = "gpt4"  # pre-split regex: a name (gpt4: digits grouped by at most 2) or a raw regex
    eval_chars: int = knob(10_000_000, min=1)  # validation characters used to measure bytes/token

    def check(self) -> None:
        from daychat.tokenizer import SPECIAL_TOKENS  # the only place that lists them

        floor = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size < floor:
            # rustbpe panics (an uncatchable Rust abort) below 256 merge slots, so refuse it here.
            raise ParamsError("tokenizer.vocab_size",
                              f"must be >= {floor} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens), got {self.vocab_size}")


@dataclass(frozen=True)
class PretokenizeParams:
    """Token shards: one flat uint16/uint32 file per text shard, BOS before every document."""

    dtype: str = knob("auto", choices=("auto", "uint16", "uint32"))  # auto: uint16 when the vocab fits
    workers: int = knob(0, min=0, max=256)  # processes over shards; 0 = all cores
    batch_docs: int = knob(512, min=1)  # documents encoded per batch (bounds memory)


SECTIONS: dict[str, type] = {
    "download": DownloadParams,
    "tokenizer": TokenizerParams,
    "pretokenize": PretokenizeParams,
}


# ----------------------------------------------------------------------------------------------------
# Loading and validation


def read_params(path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """The raw mapping in params.yaml, with unknown sections refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found in {Path.cwd()}; run from a workspace (the project root or runs/<recipe>/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS:
            raise ParamsError(str(name), f"is not a known section{_did_you_mean(str(name), SECTIONS)}", path.name)
    return raw


def load_section(name: str, path: str | os.PathLike = PARAMS_FILE) -> Any:
    """Load and validate one section of params.yaml into its typed object."""
    raw = read_params(path)
    if name not in raw:
        raise ParamsError(name, "section is missing", Path(path).name)
    return parse_section(name, raw[name], Path(path).name)


def parse_section(name: str, values: Any, file: str = PARAMS_FILE) -> Any:
    cls = SECTIONS[name]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ParamsError(name, f"must be a mapping of keys, got {type(values).__name__}", file)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            raise ParamsError(dotted, f"is not a known key{_did_you_mean(str(key), fields)}", file)
        value = _coerce(dotted, value, hints[key], file)
        _check_limits(dotted, value, fields[key].metadata, file)
        kwargs[key] = value
    obj = cls(**kwargs)
    try:
        if hasattr(obj, "check"):  # rules across several fields of one section
            obj.check()
    except ParamsError as e:
        raise ParamsError(e.key, e.message, file) from None
    return obj


def defaults(name: str) -> dict[str, Any]:
    """A section's default values, as they would be written in params.yaml."""
    return dataclasses.asdict(SECTIONS[name]())


def _did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(sorted(options))})"


def _coerce(key: str, value: Any, hint: Any, file: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0], file)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ParamsError(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}", file)
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ParamsError(key, f"must be a list, got {value!r}", file)
        return [_coerce(f"{key}[{i}]", v, item, file) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(key, f"must be true or false, got {value!r}", file)
        return value
    if hint is int:
        number = _number(value)
        if number is None or number != int(number):
            raise ParamsError(key, f"must be an integer, got {value!r}", file)
        return int(number)
    if hint is float:
        number = _number(value)
        if number is None:
            raise ParamsError(key, f"must be a number, got {value!r}", file)
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(key, f"must be a string, got {value!r}", file)
        return value
    raise TypeError(f"unsupported params type {hint} for {key}")


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):  # "3e-4", "2_000_000" as YAML 1.1 leaves them
        try:
            f = float(value.replace("_", ""))
        except ValueError:
            return None
        return int(f) if f.is_integer() and "e" not in value.lower() and "." not in value else f
    return None


def _check_limits(key: str, value: Any, meta: typing.Mapping, file: str) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ParamsError(key, f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}", file)
    if meta.get("min") is not None and value < meta["min"]:
        raise ParamsError(key, f"must be >= {meta['min']}, got {value!r}", file)
    if meta.get("max") is not None and value > meta["max"]:
        raise ParamsError(key, f"must be <= {meta['max']}, got {value!r}", file)
