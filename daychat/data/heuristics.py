"""Heuristic document filters of the Gopher / C4 / FineWeb family, and boilerplate stripping.

Pure functions of a document's text (no I/O, no model), used by the quality stage (daychat.data.quality):

    h = Heuristics(p)
    text, stripped_chars, drop = h.strip(text)   # Gutenberg framing and boilerplate go; mostly boilerplate: a Drop
    drop = h.check(text)                         # None, or the first filter that fails and by how much

Each filter is switched on by its name in `quality.heuristics` and has its thresholds in params. The
defaults are the published ones:
- Gopher (Rae et al. 2021, "Scaling Language Models", appendix A.1.1, table A1): 50..100,000 words, mean
  word length 3..10, '#' and '...' at most 0.1 per word, >= 80% of words with a letter, <= 90% of lines
  starting with a bullet, <= 30% ending with an ellipsis, >= 2 of the stop words {the, be, to, of, and,
  that, have, with}; duplicate lines <= 30% (<= 20% of the characters), duplicate paragraphs likewise;
  the most frequent 2/3/4-gram covers <= 20/18/16% of the characters, duplicated 5..10-grams
  <= 15/14/13/12/11/10%. FineWeb (Penedo et al. 2024) keeps these Gopher filters as they are.
- C4 (Raffel et al. 2020): a page with "lorem ipsum" is dropped; lines about JavaScript, cookies and
  policies are removed from the page (the "boilerplate" filter below strips them, see BOILERPLATE).
- "score": one logistic score over the statistics the filters above threshold one by one (and FineWeb's
  line statistics: the share of lines ending in punctuation, of lines of 30 characters or fewer), see
  STATISTICS and `document_stats`. Each threshold alone is set so low that it only catches the worst
  pages; the score weighs all of them at once. Its weights and cut-off come from `python -m
  bench.heuristics` (what that measurement shows, and does not, is in the README's "Data quality").

"Words" are whitespace-separated tokens; where a filter measures words (mean length, stop words, share
with a letter) it trims their punctuation and ignores tokens that are punctuation only. Splitting on
whitespace, not with a language-aware tokenizer, keeps these filters at ~5-10 MB/s per core.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import numpy as np
import pandas as pd

from daychat.sections import QualityParams

# Names usable in `quality.heuristics`, in the order they run (cheap first); each is also its drop reason,
# except "length", which drops as too_short or too_long.
HEURISTICS = ("boilerplate", "length", "mean_word_length", "symbol_ratio", "alpha_words", "stop_words",
              "bullet_lines", "ellipsis_lines", "dup_lines", "dup_paragraphs", "top_ngrams", "dup_ngrams", "score")
REASONS = ("boilerplate", "too_short", "too_long", *HEURISTICS[2:])

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))  # Gopher's list
PUNCTUATION = string.punctuation + "“”‘’«»…–—•·¡¿"  # trimmed from a word before its length is taken
BULLETS = ("•", "‣", "◦", "▪", "●", "○", "■", "□", "-", "*", "–", "—", "·")
ELLIPSES = ("...", "…")
_LETTER = re.compile(r"[^\W\d_]")  # any Unicode letter
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")  # a blank line (or more)
_PARAGRAPH_SPLIT = re.compile(f"({_PARAGRAPH_BREAK.pattern})")  # split, keeping the breaks
_NGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: n-gram ids as a polynomial in the word ids

# ----------------------------------------------------------------------------------------------------
# Stripping: Project Gutenberg framing, boilerplate paragraphs and lines

# Where a Gutenberg book starts: the line that ends the header. Three generations of the header in
# ../shared/data/corpus/gutenberg: "*** START OF THIS PROJECT GUTENBERG EBOOK <TITLE> ***" (2000s on),
# "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*" (1990s, licence first), and the
# Shakespeare files' '["Small Print" V.12.08.93]'.
_GUTENBERG_START = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG|\*+END\*+[ \t]*THE SMALL PRINT"
    r"|\[\"Small Print\" V\.[\d.]+\])[^\n]*$", re.IGNORECASE | re.MULTILINE)
# Where it ends: "*** END OF THIS PROJECT GUTENBERG EBOOK ..." or the older "End of the Project Gutenberg
# EBook of ..." line; the licence follows either.
_GUTENBERG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the |this )?Project Gutenberg)[^\n]*$",
    re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> tuple[str, int]:
    """The book between the Project Gutenberg header and the licence, and how many characters went.
    Text without the markers is returned unchanged; a header marker is only looked for in the first
    half of the text, so a book that quotes one late is not cut there."""
    start = _GUTENBERG_START.search(text, 0, len(text) // 2)
    begin = start.end() if start else 0
    end = _GUTENBERG_END.search(text, begin)
    if start is None and end is None:
        return text, 0
    book = text[begin:end.start() if end else len(text)].strip()
    return book, len(text) - len(book)


# Phrases that mark a paragraph (or line) as boilerplate rather than content.
BOILERPLATE = re.compile("|".join((
    # C4: cookie and policy notices (the policy substrings of its reference code) and "enable JavaScript"
    # warnings; C4 drops every line that says "javascript", which would also cut real text about it.
    r"\b(?:we use|uses|use of|accept(?: all)?) cookies\b", r"\bcookie (?:policy|settings|preferences)\b",
    r"\bprivacy policy\b", r"\bterms (?:of use|of service|and conditions)\b",
    r"\b(?:enable|turn on|requires?) javascript\b", r"\bjavascript (?:is|must be|seems to be) (?:disabled|enabled|off)\b",
    # navigation text, as a whole line
    r"^\W*(?:skip to (?:main )?content|skip navigation|back to top|jump to navigation|toggle navigation|"
    r"main menu|share this(?: article| post)?|previous (?:post|article)|next (?:post|article)|read more)\W*$",
    # licence headers (source files, READMEs, docstrings)
    r"\ball rights reserved\b", r"\bcopyright (?:\(c\)|©)", r"\bspdx-license-identifier\b",
    r"\blicensed under the (?:apache|mit|bsd|gnu|mozilla|eclipse)\b", r"\bpermission is hereby granted, free of charge\b",
    r"\bredistribution and use in source and binary forms\b", r"\bthis program is free software\b",
    r"\bas is\W? and any express",
    # community boilerplate in project READMEs
    r"\bcode of conduct\b",
)), re.IGNORECASE | re.MULTILINE)
# A literal (lower case) in each pattern above. Python's re scans an alternation of 20 patterns
# position by position (~3 MB/s); `in` on the lower-cased text runs at GB/s, so the regex only runs on
# the rare text that holds one of these.
_BOILERPLATE_KEYS = ("cookie", "privacy policy", "terms of use", "terms of service", "terms and conditions",
                     "javascript", "skip to", "skip navigation", "back to top", "navigation", "main menu",
                     "share this", "previous post", "previous article", "next post", "next article", "read more",
                     "all rights reserved", "copyright", "spdx-license-identifier", "licensed under the",
                     "permission is hereby granted", "redistribution and use", "this program is free software",
                     "and any express", "code of conduct")
# The unit stripped around a boilerplate phrase is its sentence as laid out in lines: the line, joined
# with the lines its sentence is hard-wrapped onto (see _wrapped_units). A single-newline web page, where
# every line is its own sentence, heading or menu item, loses only its footer or navigation line ("Share
# this:", "Copyright © ..."); a licence wrapped at 72-80 columns goes as a whole sentence. A unit longer
# than this is kept: a phrase inside a long run of text is prose that mentions a policy, not a notice.
BOILERPLATE_UNIT_CHARS = 1500
# A line that ends with one of these (closing quotes or brackets aside) ends its sentence.
_SENTENCE_END = re.compile(r"[.!?:][\"'”’»)\]*]*\s*$")
_FIRST_LETTER = re.compile(r"[^\W\d_]")


def has_boilerplate(text: str) -> bool:
    lower = text.lower()
    return any(key in lower for key in _BOILERPLATE_KEYS) and BOILERPLATE.search(text) is not None


def has_lorem_ipsum(text: str) -> bool:
    """C4: a page with placeholder text goes."""
    return "lorem ipsum" in text.lower()


def _continues(previous: str, line: str) -> bool:
    """Whether `line` carries on the sentence of `previous` (a hard wrap, not a new line of content): the
    previous line does not end a sentence, and this one starts in lower case ("...obtaining a copy\nof
    this software") or both are in capitals (the BSD and MIT disclaimers)."""
    if not previous.strip() or _SENTENCE_END.search(previous):
        return False
    first = _FIRST_LETTER.search(line)
    if first is None:
        return False
    if first.group().islower():
        return True
    return not any(c.islower() for c in previous) and not any(c.islower() for c in line)


def _wrapped_units(paragraph: str) -> list[str]:
    """The paragraph's lines grouped into units, a line joining the previous unit when it continues its
    sentence (see _continues); joined back with newlines they give the paragraph again."""
    units: list[list[str]] = []
    for line in paragraph.split("\n"):
        if units and _continues(units[-1][-1], line):
            units[-1].append(line)
        else:
            units.append([line])
    return ["\n".join(unit) for unit in units]


def strip_boilerplate(text: str) -> tuple[str, int]:
    """Text without its boilerplate lines (see BOILERPLATE, and BOILERPLATE_UNIT_CHARS for what a line
    is), and how many characters went. A paragraph left empty goes with its break."""
    lower = text.lower()
    hits = [i for key in _BOILERPLATE_KEYS for i in _find_all(lower, key)]
    if not hits:  # the common case, found at GB/s
        return text, 0
    pieces = _PARAGRAPH_SPLIT.split(text)  # [paragraph, break, paragraph, break, ..., paragraph]
    starts = np.cumsum([0] + [len(piece) for piece in pieces[:-1]])[::2]
    if len(lower) == len(text):  # the regex only looks at paragraphs with a key in them
        suspects = set(np.searchsorted(starts, hits, side="right") - 1)
    else:  # lower() changed lengths (e.g. 'İ' -> 'i̇'): the offsets do not map back, look everywhere
        suspects = set(range(len(starts)))
    kept = []
    for i, (paragraph, brk) in enumerate(zip(pieces[::2], pieces[1::2] + [""])):
        if i not in suspects or not has_boilerplate(paragraph):
            kept += [paragraph, brk]
            continue
        units = [unit for unit in _wrapped_units(paragraph)
                 if len(unit) > BOILERPLATE_UNIT_CHARS or not has_boilerplate(unit)]
        if any(unit.strip() for unit in units):
            kept += ["\n".join(units).strip("\n"), brk]
    cleaned = "".join(kept).strip()
    return cleaned, len(text) - len(cleaned)


def _find_all(text: str, key: str) -> list[int]:
    found, i = [], text.find(key)
    while i != -1:
        found.append(i)
        i = text.find(key, i + 1)
    return found


# ----------------------------------------------------------------------------------------------------
# Document statistics: what the filters threshold, as numbers, for the combined score

# Every statistic the score can weigh, in the order `document_stats` returns them. Lengths enter as logs
# (the difference between 50 and 500 words matters, between 5,000 and 50,000 much less).
STATISTICS = ("log_words", "mean_word_length", "stop_word_ratio", "alpha_words", "symbol_ratio",
              "log_mean_line_chars", "line_punct", "short_lines", "bullet_lines", "ellipsis_lines",
              "dup_line_chars", "top_2gram_chars", "dup_5gram_chars")
# FineWeb's own filters (Penedo et al. 2024; datatrove's FineWebQualityFilter) keep a page when >= 12% of
# its lines end in punctuation and <= 67% of them have 30 characters or fewer: its two line statistics.
SHORT_LINE_CHARS = 30
_LINE_END_PUNCT = (".", "!", "?", '"', "'", "”", "’", ")", ":", "…")


def document_stats(text: str, words: Words | None = None) -> dict[str, float]:
    """The STATISTICS of one document (of the text as it would be kept: after stripping)."""
    words = words or Words(text)
    n = max(words.count, 1)
    real = words.core_lengths > 0
    real_count = int(words.freq[real].sum())
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    n_lines = max(len(lines), 1)
    repeated = _repeated_chars(lines)
    return {
        "log_words": float(np.log1p(words.count)),
        "mean_word_length": float((words.freq * words.core_lengths).sum() / real_count) if real_count else 0.0,
        "stop_word_ratio": float(words.freq[words.is_stop_word].sum() / n),
        "alpha_words": float(words.freq[words.has_letter].sum() / real_count) if real_count else 0.0,
        "symbol_ratio": max(text.count("#"), sum(text.count(e) for e in ELLIPSES)) / n,
        "log_mean_line_chars": float(np.log1p(sum(map(len, lines)) / n_lines)),
        "line_punct": sum(line.endswith(_LINE_END_PUNCT) for line in lines) / n_lines,
        "short_lines": sum(len(line) <= SHORT_LINE_CHARS for line in lines) / n_lines,
        "bullet_lines": sum(line.startswith(BULLETS) for line in lines) / n_lines,
        "ellipsis_lines": sum(line.endswith(ELLIPSES) for line in lines) / n_lines,
        "dup_line_chars": repeated,
        "top_2gram_chars": top_ngram_char_fraction(words, 2),
        "dup_5gram_chars": dup_ngram_char_fraction(words, 5),
    }


def _repeated_chars(items: list[str]) -> float:
    """Share of the characters of `items` in items that repeat an earlier one."""
    seen: set[str] = set()
    repeat = total = 0
    for item in items:
        total += len(item)
        if item in seen:
            repeat += len(item)
        else:
            seen.add(item)
    return repeat / total if total else 0.0


def quality_score(stats: dict[str, float], weights: dict[str, float], bias: float) -> float:
    """p(clean) of a logistic model: sigmoid(bias + sum of weight x statistic), in [0, 1]."""
    z = bias + sum(w * stats[name] for name, w in weights.items())
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0))))


# ----------------------------------------------------------------------------------------------------
# The filters


@dataclass(frozen=True)
class Drop:
    """Why a document was dropped: the filter (reason), the measured value that crossed its threshold."""

    reason: str
    value: float
    detail: str  # readable, for the audit table: "mean word length 11.3 > 10"


class Words:
    """A document's words as ids (pandas.factorize: one hash-table pass in C) and the properties the
    filters need, computed once per distinct word (a 100k-word book has ~8k): no per-word Python loop."""

    def __init__(self, text: str):
        tokens = text.split()
        self.count = len(tokens)
        codes, vocab = pd.factorize(np.array(tokens, dtype=object), sort=False)
        self.codes = codes.astype(np.int64)  # (W,) word id per position
        n = len(vocab)
        self.freq = np.bincount(self.codes, minlength=n)  # (V,) occurrences of each distinct word
        cores = [w.strip(PUNCTUATION) for w in vocab]  # the word without its punctuation
        self.core_lengths = np.fromiter(map(len, cores), np.int64, n)  # (V,) 0: punctuation only
        self.has_letter = np.fromiter((c.isalpha() or _LETTER.search(w) is not None for c, w in zip(cores, vocab)),
                                      bool, n)  # (V,)
        self.is_stop_word = np.fromiter((len(c) <= 4 and c.lower() in STOP_WORDS for c in cores), bool, n)  # (V,)
        self.lengths = np.fromiter(map(len, vocab), np.int64, n)[self.codes]  # (W,) characters per position


class Heuristics:
    """The filters of `p.heuristics`, thresholds from `p`. `check(text)` returns the first failure."""

    def __init__(self, p: QualityParams):
        self.p = p
        self.on = frozenset(p.heuristics)

    def strip(self, text: str) -> tuple[str, int, Drop | None]:
        """Strip what is not content (Gutenberg framing, boilerplate): the text left, the characters
        stripped, and a Drop when the document was mostly boilerplate or holds placeholder text."""
        stripped = 0
        if self.p.strip_gutenberg:
            text, stripped = strip_gutenberg(text)
        if "boilerplate" not in self.on:
            return text, stripped, None
        if has_lorem_ipsum(text):
            return text, stripped, Drop("boilerplate", 1.0, "placeholder text (lorem ipsum)")
        cleaned, boilerplate = strip_boilerplate(text)
        share = boilerplate / len(text) if text else 0.0
        if share > self.p.boilerplate_max_fraction:
            return cleaned, stripped + boilerplate, Drop(
                "boilerplate", share, f"{share:.1%} of the characters are boilerplate > {self.p.boilerplate_max_fraction:.0%}")
        return cleaned, stripped + boilerplate, None

    def check_length(self, words: Words) -> Drop | None:
        """Gopher's length bounds, on their own: the quality stage runs them before language ID."""
        p = self.p
        if "length" in self.on:
            if words.count < p.min_words:
                return Drop("too_short", words.count, f"{words.count} words < {p.min_words}")
            if p.max_words and words.count > p.max_words:
                return Drop("too_long", words.count, f"{words.count} words > {p.max_words}")
        return None

    def check(self, text: str, words: Words | None = None) -> Drop | None:
        """Every filter switched on but boilerplate (see `strip`), cheap ones first; the first that fails."""
        words = words or Words(text)
        if drop := self.check_length(words):
            return drop
        on = self.on
        if not words.count:
            return None
        for name, test in (("mean_word_length", self._mean_word_length), ("symbol_ratio", self._symbol_ratio),
                           ("alpha_words", self._alpha_words), ("stop_words", self._stop_words)):
            if name in on and (drop := test(text, words)):
                return drop
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        for name, test in (("bullet_lines", self._bullet_lines), ("ellipsis_lines", self._ellipsis_lines),
                           ("dup_lines", self._dup_lines)):
            if name in on and (drop := test(lines)):
                return drop
        if "dup_paragraphs" in on and (drop := self._dup_paragraphs(text)):
            return drop
        if "top_ngrams" in on and (drop := self._top_ngrams(words)):
            return drop
        if "dup_ngrams" in on and (drop := self._dup_ngrams(words)):
            return drop
        if "score" in on and (drop := self._score(text, words)):
            return drop
        return None

    # word-level

    def _mean_word_length(self, text: str, words: Words) -> Drop | None:
        real = words.core_lengths > 0  # punctuation-only tokens are not words
        count = words.freq[real].sum()
        mean = float((words.freq * words.core_lengths).sum() / count) if count else 0.0
        lo, hi = self.p.min_mean_word_length, self.p.max_mean_word_length
        if not lo <= mean <= hi:
            return Drop("mean_word_length", mean, f"mean word length {mean:.2f} outside [{lo:g}, {hi:g}]")
        return None

    def _symbol_ratio(self, text: str, words: Words) -> Drop | None:
        ratio = max(text.count("#"), sum(text.count(e) for e in ELLIPSES)) / words.count
        if ratio > self.p.max_symbol_word_ratio:
            return Drop("symbol_ratio", ratio, f"{ratio:.3f} '#' or '...' per word > {self.p.max_symbol_word_ratio:g}")
        return None

    def _alpha_words(self, text: str, words: Words) -> Drop | None:
        # Punctuation-only tokens are not words: text tokenised with spaces around punctuation ("a film ,
        # well , ...", NLTK's movie reviews) would otherwise fail on its commas. Numbers do count.
        real = words.freq[words.core_lengths > 0].sum()
        share = float(words.freq[words.has_letter].sum() / real) if real else 0.0
        if share < self.p.min_alpha_words:
            return Drop("alpha_words", share, f"{share:.1%} of words have a letter < {self.p.min_alpha_words:.0%}")
        return None

    def _stop_words(self, text: str, words: Words) -> Drop | None:
        count = int(words.freq[words.is_stop_word].sum())
        if count < self.p.min_stop_words:
            return Drop("stop_words", count, f"{count} stop words < {self.p.min_stop_words}")
        return None

    # line-level

    def _bullet_lines(self, lines: list[str]) -> Drop | None:
        share = sum(line.startswith(BULLETS) for line in lines) / len(lines) if lines else 0.0
        if share > self.p.max_bullet_lines:
            return Drop("bullet_lines", share, f"{share:.1%} of lines start with a bullet > {self.p.max_bullet_lines:.0%}")
        return None

    def _ellipsis_lines(self, lines: list[str]) -> Drop | None:
        share = sum(line.endswith(ELLIPSES) for line in lines) / len(lines) if lines else 0.0
        if share > self.p.max_ellipsis_lines:
            return Drop("ellipsis_lines", share, f"{share:.1%} of lines end with an ellipsis > {self.p.max_ellipsis_lines:.0%}")
        return None

    def _dup_lines(self, lines: list[str]) -> Drop | None:
        return _repeated("dup_lines", "lines", lines, self.p.max_dup_lines, self.p.max_dup_line_chars)

    def _dup_paragraphs(self, text: str) -> Drop | None:
        paragraphs = [para.strip() for para in _PARAGRAPH_BREAK.split(text)]
        paragraphs = [para for para in paragraphs if para]
        return _repeated("dup_paragraphs", "paragraphs", paragraphs, self.p.max_dup_paragraphs,
                         self.p.max_dup_paragraph_chars)

    # n-grams

    def _top_ngrams(self, words: Words) -> Drop | None:
        for n, limit in enumerate(self.p.max_top_ngram_chars, start=2):
            share = top_ngram_char_fraction(words, n)
            if share > limit:
                return Drop("top_ngrams", share, f"the top {n}-gram covers {share:.1%} of the characters > {limit:.0%}")
        return None

    def _dup_ngrams(self, words: Words) -> Drop | None:
        # The words covered by repeated (n+1)-grams are a subset of those covered by repeated n-grams, so
        # the fraction only falls as n grows: once it is under every later limit, stop.
        limits = self.p.max_dup_ngram_chars
        for i, (n, limit) in enumerate(zip(range(5, 5 + len(limits)), limits)):
            share = dup_ngram_char_fraction(words, n)
            if share > limit:
                return Drop("dup_ngrams", share, f"repeated {n}-grams cover {share:.1%} of the characters > {limit:.0%}")
            if share <= min(limits[i + 1:], default=1.0):
                break
        return None


    # combined

    def _score(self, text: str, words: Words) -> Drop | None:
        score = quality_score(document_stats(text, words), self.p.score_weights, self.p.score_bias)
        if score < self.p.min_score:
            return Drop("score", score, f"heuristic score {score:.3f} < {self.p.min_score:g}")
        return None


def _repeated(reason: str, what: str, items: list[str], max_share: float, max_char_share: float) -> Drop | None:
    """Gopher's duplicate lines/paragraphs: the items that repeat an earlier one, by count and by characters."""
    if not items:
        return None
    seen: set[str] = set()
    repeats = repeat_chars = 0
    for item in items:
        if item in seen:
            repeats += 1
            repeat_chars += len(item)
        else:
            seen.add(item)
    share, char_share = repeats / len(items), repeat_chars / sum(map(len, items))
    if share > max_share:
        return Drop(reason, share, f"{share:.1%} of {what} repeat an earlier one > {max_share:.0%}")
    if char_share > max_char_share:
        return Drop(reason, char_share, f"repeated {what} hold {char_share:.1%} of the characters > {max_char_share:.0%}")
    return None


def _ngram_ids(codes: np.ndarray, n: int) -> np.ndarray:
    """(W-n+1,) a 64-bit id per n-gram position (wrapping polynomial of the word ids; collisions ~2^-64)."""
    ids = codes[: len(codes) - n + 1].astype(np.uint64)
    for k in range(1, n):
        ids = ids * _NGRAM_MIX + codes[k: len(codes) - n + 1 + k].astype(np.uint64)
    return ids


def top_ngram_char_fraction(words: Words, n: int) -> float:
    """Characters of the most frequent n-gram times its count, over the characters of all words (Gopher).
    An n-gram seen only once is not repetition: 0."""
    if words.count < n:
        return 0.0
    ids = _ngram_ids(words.codes, n)
    ordered = np.sort(ids)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    runs = np.diff(np.r_[starts, len(ordered)])
    best = int(np.argmax(runs))
    if runs[best] < 2:
        return 0.0
    first = int(np.flatnonzero(ids == ordered[starts[best]])[0])
    return float(words.lengths[first:first + n].sum() * runs[best] / words.lengths.sum())


def dup_ngram_char_fraction(words: Words, n: int) -> float:
    """Share of the words' characters covered by every occurrence of an n-gram after its first (Gopher)."""
    if words.count < n:
        return 0.0
    ids = _ngram_ids(words.codes, n)
    order = np.argsort(ids, kind="stable")  # stable: within a run of equal ids, the first is the earliest
    ordered = ids[order]
    repeat = np.r_[False, ordered[1:] == ordered[:-1]]
    starts = order[repeat]  # positions of repeated occurrences
    if not starts.size:
        return 0.0
    cover = np.zeros(words.count + 1, np.int64)  # +1 at each start, -1 past its end: covered where > 0
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    return float(words.lengths[covered].sum() / words.lengths.sum())
