"""Tokenizer: rustbpe training -> tiktoken encoding, special tokens, saving and loading.

Training uses rustbpe (Rust, parallel pair counting); encoding uses tiktoken, which is faster and is what
everything downstream loads. A trained tokenizer is a folder:

    tokenizer.tiktoken   tiktoken's own BPE file: `base64(token bytes) rank` per line, ranks 0..n-1
    tokenizer.json       name, split pattern, special tokens with their ids, vocab_size, bos_id,
                         the sha256 of tokenizer.tiktoken and the training stats

Ids: the n BPE ranks come first (0..n-1; the 256 single bytes among them), then SPECIAL_TOKENS in list
order (n..n+8). `vocab_size` counts both.

Loading with plain tiktoken works too, but pass the hash: `load_tiktoken_bpe(path, expected_hash=...)`
caches files by *path* under $TMPDIR/data-gym-cache and, without a hash, serves a retrained file's old
contents from that cache. `Tokenizer.load` reads the file itself and has no such cache.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tiktoken

from daychat.data.textshards import iter_text_batches
from daychat.errors import UserError
from daychat.io import atomic_path, sha256_file, write_json
from daychat.sections import ParamsError, TokenizerParams

# Document and chat special tokens. Their ids follow the BPE ranks, in this order.
SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document; the pretokenizer puts one before each
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|tool_call_start|>",  # the assistant asks the calculator tool
    "<|tool_call_end|>",
    "<|tool_output_start|>",  # the tool's answer, injected during generation; never trained on
    "<|tool_output_end|>",
]
BOS = SPECIAL_TOKENS[0]

# GPT-4's split pattern (cl100k_base) with numbers split into groups of at most 2 digits instead of 3:
# a small vocab spends fewer slots on 3-digit numbers (nanochat's choice, from its tokenizer ablation).
SPLIT_PATTERNS = {
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}

FORMAT = "daychat.tokenizer/1"
TIKTOKEN_FILE = "tokenizer.tiktoken"
INFO_FILE = "tokenizer.json"
BYTE_TOKENS = 256  # rustbpe starts from the 256 single bytes and panics if asked for fewer


def check_params(p: TokenizerParams) -> None:
    """The tokenizer section's rule that needs this module (run by daychat.params when it reads the section):
    room for the byte tokens and the special tokens. rustbpe panics (an uncatchable Rust abort) below 256
    merge slots, so it is refused before any stage starts."""
    floor = BYTE_TOKENS + len(SPECIAL_TOKENS)
    if p.vocab_size < floor:
        raise ParamsError("tokenizer.vocab_size", f"must be >= {floor} ({BYTE_TOKENS} byte tokens + "
                                                  f"{len(SPECIAL_TOKENS)} special tokens), got {p.vocab_size}")


def split_pattern(pattern: str) -> str:
    """The regex for a pattern name (see SPLIT_PATTERNS), or `pattern` itself as a raw regex.

    A raw regex is compiled by tiktoken, whose engine (fancy-regex) is the one rustbpe uses too, so a
    pattern that passes here trains and encodes; one that does not is a UserError naming the key.
    """
    regex = SPLIT_PATTERNS.get(pattern, pattern)
    try:
        tiktoken.Encoding("check", pat_str=regex, mergeable_ranks=_byte_ranks(), special_tokens={})
    except ValueError as e:
        raise UserError(f"params.yaml: tokenizer.pattern is not a valid regex ({e}); use gpt4 or fix the regex") from None
    return regex


def _byte_ranks() -> dict[bytes, int]:
    return {bytes([b]): b for b in range(BYTE_TOKENS)}


class TextStream:
    """Documents of some text shards, each cut to `doc_cap` characters, `max_chars` in all.

    Iterating streams the shards a row-group batch at a time, cuts the last document to the budget and
    stops reading there, so only the text that is used is ever read. `chars` and `docs` count what was
    yielded (empty documents are skipped: they teach BPE nothing and would only inflate `docs`).
    """

    def __init__(self, paths: Iterable[str | os.PathLike], max_chars: int, doc_cap: int = 0):
        self.paths = list(paths)
        self.max_chars = max_chars
        self.doc_cap = doc_cap  # 0 = whole documents
        self.chars = 0
        self.docs = 0

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            for batch in iter_text_batches(path):
                for text in batch:
                    if self.doc_cap:
                        text = text[:self.doc_cap]
                    text = text[:self.max_chars - self.chars]
                    if not text:
                        continue
                    self.chars += len(text)
                    self.docs += 1
                    yield text
                    if self.chars >= self.max_chars:
                        return


class Tokenizer:
    """A trained BPE tokenizer: tiktoken's Encoding plus the special tokens and what describes it."""

    def __init__(self, ranks: dict[bytes, int], pattern: str, specials: Iterable[str] = SPECIAL_TOKENS,
                 info: dict | None = None):
        self.ranks = ranks  # token bytes -> rank, ranks 0..len(ranks)-1
        self.pattern = pattern
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(specials)}
        self.info = dict(info or {})  # training stats and anything else saved in tokenizer.json
        # Seconds the BPE training took (None for a loaded tokenizer). Kept out of `info`: tokenizer.json is
        # an artifact, and a timing in it would change its hash (and every model folder's) on each rerun.
        self.train_seconds: float | None = None
        self._enc = tiktoken.Encoding("daychat", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)

    # ------------------------------------------------------------------------------------------------
    # Training, saving, loading

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = "gpt4") -> "Tokenizer":
        """Train BPE on `texts`; `vocab_size` counts the special tokens.

        rustbpe stops early when no pair is left to merge (a small corpus, a large vocab): the result
        is then smaller than asked, and `info["vocab_size_requested"]` keeps what was asked.
        """
        merges_and_bytes = vocab_size - len(SPECIAL_TOKENS)
        if merges_and_bytes < BYTE_TOKENS:
            # Checked here, not left to rustbpe: below 256 it panics and takes the process with it.
            raise UserError(f"vocab_size must be >= {BYTE_TOKENS + len(SPECIAL_TOKENS)} "
                            f"({BYTE_TOKENS} byte tokens + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        regex = split_pattern(pattern)
        texts = iter(texts)
        first = next(texts, None)
        if first is None:
            raise UserError("no training text: the train split is empty (check the dataset the tokenizer reads)")
        import rustbpe  # training only: loading, encoding and the params check run without it (a GPU box)

        bpe = rustbpe.Tokenizer()
        t0 = time.perf_counter()
        bpe.train_from_iterator(itertools.chain([first], texts), merges_and_bytes, pattern=regex)
        seconds = time.perf_counter() - t0
        ranks = dict(bpe.get_mergeable_ranks())
        tok = cls(ranks, regex, info={"vocab_size_requested": vocab_size})
        tok.train_seconds = seconds  # a metric of the stage, never saved with the tokenizer
        return tok

    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.tiktoken and tokenizer.json into `folder` (each file atomically)."""
        folder = Path(folder)
        with atomic_path(folder / TIKTOKEN_FILE) as tmp:
            with open(tmp, "wb") as f:
                for token, rank in sorted(self.ranks.items(), key=lambda item: item[1]):
                    f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
        write_json(folder / INFO_FILE, {
            "format": FORMAT,
            "name": self._enc.name,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "tiktoken_file": TIKTOKEN_FILE,
            "tiktoken_sha256": sha256_file(folder / TIKTOKEN_FILE),
            **self.info,
        })

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Load a folder written by `save`; a missing or damaged file is a UserError naming it."""
        folder = Path(folder)
        info_path, bpe_path = folder / INFO_FILE, folder / TIKTOKEN_FILE
        for path in (info_path, bpe_path):
            if not path.is_file():
                raise UserError(f"{path} not found: {folder} is not a trained tokenizer (run the tokenizer stage)")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            if info.get("format") != FORMAT:
                raise ValueError(f"format {info.get('format')!r}, expected {FORMAT!r}")
            ranks = _read_tiktoken_bpe(bpe_path)
            specials = sorted(info["special_tokens"], key=info["special_tokens"].get)
            if [info["special_tokens"][name] for name in specials] != list(range(len(ranks), len(ranks) + len(specials))):
                raise ValueError("special token ids do not follow the BPE ranks")
            extra = {key: value for key, value in info.items() if key not in _DESCRIBED}
            return cls(ranks, info["pattern"], specials, extra)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{folder} holds a damaged tokenizer ({e}); rerun the tokenizer stage") from None

    # ------------------------------------------------------------------------------------------------
    # Encoding and decoding

    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(self.special_tokens)

    @property
    def bos_id(self) -> int:
        return self.special_tokens[BOS]

    def encode_special(self, token: str) -> int:
        """The id of a special token, e.g. encode_special("<|user_start|>")."""
        try:
            return self.special_tokens[token]
        except KeyError:
            raise ValueError(f"{token!r} is not a special token (known: {', '.join(self.special_tokens)})") from None

    def encode(self, text: str, prepend_bos: bool = False) -> list[int]:
        """Token ids of ordinary text.

        Special-token strings inside `text` (a document quoting "<|bos|>") are encoded as the plain text
        they are, never as special ids: only `encode_special` and `prepend_bos` produce those.
        Text that is not valid Unicode does not raise: a lone surrogate (it has no UTF-8 form) becomes
        U+FFFD, and a surrogate pair written as two code points is joined into its character. This is
        tiktoken's own fix-up, applied only to such text; any valid string round-trips exactly.
        """
        ids = self._enc.encode_ordinary(text)
        return [self.bos_id, *ids] if prepend_bos else ids

    def encode_batch(self, texts: list[str], num_threads: int = 0, prepend_bos: bool = False) -> list[list[int]]:
        """`encode` of many texts on `num_threads` threads (0 = all cores; tiktoken releases the GIL)."""
        batch = self._enc.encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count() or 1)
        return [[self.bos_id, *ids] for ids in batch] if prepend_bos else batch

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array (n_tokens,), without building a Python list: the fast path for
        bulk encoding (pretokenize), same ids and same surrogate handling as `encode`."""
        try:
            return self._enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            return self._enc.encode_to_numpy(_replace_surrogates(text), disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; special ids decode to their names, a cut multi-byte character to U+FFFD."""
        return self._enc.decode(ids.tolist() if isinstance(ids, np.ndarray) else list(ids))

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of every token id, (vocab_size,) int32; 0 for special tokens.

        Bits per byte = sum of a sequence's token losses / sum of token_bytes[targets] / ln 2: a loss
        that does not depend on the vocabulary, so tokenizers can be compared.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for token, rank in self.ranks.items():
            lengths[rank] = len(token)
        return lengths

    def bytes_per_token(self, texts: Iterable[str], batch_docs: int = 256, num_threads: int = 0) -> float:
        """Compression: UTF-8 bytes of `texts` per token (higher is better)."""
        n_bytes = n_tokens = 0
        texts = iter(texts)
        with ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
            while batch := list(itertools.islice(texts, batch_docs)):
                n_bytes += sum(len(t.encode("utf-8", "surrogatepass")) for t in batch)
                n_tokens += sum(len(ids) for ids in pool.map(self.encode_array, batch))
        return n_bytes / n_tokens if n_tokens else float("nan")


# Keys of tokenizer.json that `save` derives from the tokenizer itself; the rest is `info`.
_DESCRIBED = {"format", "name", "vocab_size", "bos_id", "pattern", "special_tokens", "tiktoken_file",
              "tiktoken_sha256"}


def _read_tiktoken_bpe(path: Path) -> dict[bytes, int]:
    """tiktoken's BPE file format, read without tiktoken's path-keyed cache (see the module docstring)."""
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path.name} line {number} is not `base64 rank`") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path.name} ranks are not 0..{len(ranks) - 1}")
    return ranks


def _replace_surrogates(text: str) -> str:
    # The same fix-up tiktoken's encode_ordinary applies: via UTF-16, pairs join, lone halves -> U+FFFD.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
