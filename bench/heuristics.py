"""What the heuristic statistics can tell apart on constructed junk: `python -m bench.heuristics`.

People's labels on real web pages are bench.labelled's (DCLM's 499 labelled pages, fetched from GitHub);
params.yaml's score is fitted there. This benchmark measures a stand-in that needs only ../shared:
- "clean": edited prose from ../shared/data: news (NLTK abc), movie reviews, State of the Union and
  inaugural addresses (the mixed corpus), excerpts of 200-2,000 words from Gutenberg books (shards 0-6,
  framing stripped), and AlpacaEval answers of 50 words or more;
- "junk": pages built from clean documents of the other half (by a hash of their id) in six ways that web
  pages fail: navigation menus around a short excerpt, the text cut into 1-5-word lines (tables, lists),
  keyword stuffing, product listings from a template, number tables, and one-line comments.
It shows how well each statistic, and one logistic score over all of them, separates edited prose from
these constructions; how params.yaml's score does on them (`params_score`); and what params.yaml's score
would drop from real text: every source of the mixed corpus (its web forum text and Common Crawl pages
included), whole Gutenberg books, the 37 HTML pages of the two Common Crawl WARC files (text extracted
with bench/warc.py), and the demo's own input. A page can be junk in ways none of the constructions is
(word salad has every statistic of prose: it is the classifier's job), and the statistics can flag real
text that people would keep (poetry, dialogue). Whether the score earns its place is for the downstream
ablation (README, "Data quality").

Per statistic: ROC AUC of clean against junk (0.5 = no signal; below 0.5, lower values are the clean
side), and for the Gopher/C4 threshold that filters on it, the share of clean documents it drops and of
junk it catches. The score: an L2-regularised logistic regression on standardised statistics, fitted on
the documents whose id hashes to the first half, measured (AUC, drops) on the second; its cut-off
`min_score` is the highest that drops at most CLEAN_DROP_BUDGET of the held-out clean documents. Its
weights print as params.yaml keys, for comparison with bench.labelled's. Results:
reports/bench/heuristics.json (key "heuristics")."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from bench import quality_filters_on, record
from bench.warc import warc_pages
from daychat.data import quality
from daychat.data.heuristics import STATISTICS, Heuristics, Words, document_stats, quality_score, strip_gutenberg
from daychat.data.quality import _unit_hash
from daychat.params import parse_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "reports" / "bench" / "heuristics.json"
CLEAN_SOURCES = ("nltk/abc", "nltk/movie_reviews", "nltk/state_union", "nltk/inaugural")
CLEAN_DROP_BUDGET = 0.02  # the score may drop at most 2% of held-out clean documents
L2 = 1.0  # ridge penalty on the standardised weights (the sum over examples is the data term)
# The direction each statistic may push the score, from what the Gopher/C4/FineWeb filters threshold on
# it (+1: more is cleaner, -1: more is worse); the stand-in data only sets how much each counts. Without
# this the fit learns the stand-in's quirks: AlpacaEval answers are markdown, so unconstrained it rewards
# bullets, '#' and ellipses. Left out: log_words (the constructions' lengths are arbitrary, so a length
# weight would be theirs; length is the Gopher bounds' job) and mean_word_length (Gopher bounds it on
# both sides: it has no one direction).
SIGNS = {"stop_word_ratio": +1, "alpha_words": +1, "log_mean_line_chars": +1, "line_punct": +1,
         "symbol_ratio": -1, "short_lines": -1, "bullet_lines": -1, "ellipsis_lines": -1, "dup_line_chars": -1,
         "top_2gram_chars": -1, "dup_5gram_chars": -1}
SEED = 0

NAV = ("Home", "About us", "Contact", "Blog", "Products", "Services", "Log in", "Sign up", "Careers", "FAQ",
       "Privacy", "Terms", "Newsletter", "Shop", "Cart", "Search", "Menu", "News", "Events", "Support",
       "Our team", "Pricing", "Resources", "Partners", "Press", "Help", "Sitemap", "Follow us", "Twitter",
       "Facebook", "Instagram", "LinkedIn", "YouTube", "Subscribe", "Archives", "Categories", "Tags",
       "Recent posts", "Popular", "Gallery", "Downloads", "Donate", "Jobs", "Login", "Register", "My account")
COMMENTS = ("lol", "great post!!", "thanks for sharing", "first", "this", "+1", "so true", "omg", "nice pics",
            "who else is here in 2019?", "following", "agreed", "link pls", "wow", "me too", "haha yes", "bump")


def main() -> None:
    if not SHARED.is_dir():
        sys.exit(f"error: {SHARED} not found; the heuristics benchmark needs ../shared beside the project")
    recipe = parse_section("quality", quality_filters_on(yaml.safe_load((ROOT / "params.yaml").read_text())["quality"]))
    data = constructed_documents()
    results = constructed_fit(recipe, data)
    score = results["score"]
    # params.yaml's score (bench.labelled's fit on people's labels) on the same constructed pages and real text
    results["params_score"] = params_score(recipe, data)
    results["real_text"] = real_text_drops(recipe, recipe.score_weights, recipe.score_bias, recipe.min_score)
    record(OUT, {"heuristics": results})
    print(json.dumps(results, indent=2))
    print("\n# the score fitted on constructed junk, as params.yaml's quality keys (params.yaml has bench.labelled's):")
    print(yaml.safe_dump({"score_weights": {k: v for k, v in score["weights"].items() if v},  # 0: kept at 0 by its sign
                          "score_bias": score["bias"], "min_score": score["min_score"]}, sort_keys=False, default_flow_style=None))


def constructed_documents() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(stats (N, S) in STATISTICS order, labels (1 = clean), the fitting half, kinds) of edited prose and
    the junk pages built from it."""
    rng = random.Random(SEED)
    clean = clean_documents(rng)
    junk = junk_documents([text for key, text in clean if _unit_hash(key, SEED) >= 0.5], rng)
    docs = [(key, text, 1) for key, text in clean] + [(key, text, 0) for key, text in junk]
    stats = statistics_rows([text for _, text, _ in docs])
    labels = np.array([label for *_, label in docs])
    fit_half = np.array([_unit_hash(key, SEED + 1) < 0.5 for key, _, _ in docs])
    kinds = np.array([key.split("/")[0] for key, _, _ in docs])
    return stats, labels, fit_half, kinds


def params_score(recipe, data) -> dict:
    """The recipe's own score (score_weights, score_bias, min_score) on the constructed pages' second half."""
    stats, labels, fit_half, _ = data
    held = ~fit_half
    scores = score_rows(stats[held], recipe.score_weights, recipe.score_bias)
    dropped = scores < recipe.min_score
    return {"auc_held_out": round4(auc(scores, labels[held])), "min_score": recipe.min_score,
            "clean_dropped_held_out": round4(dropped[labels[held] == 1].mean()),
            "junk_caught_held_out": round4(dropped[labels[held] == 0].mean())}


def constructed_fit(recipe, data) -> dict:
    """The statistics, the recipe's thresholds and the sign-constrained score, on edited prose against
    constructed junk (the module docstring); the score's weights are in results["score"]."""
    stats, labels, fit_half, kinds = data

    per_statistic = {name: {"auc": round4(auc(stats[:, i], labels))} for i, name in enumerate(STATISTICS)}
    thresholds = gopher_thresholds(recipe)
    for name, drops in thresholds.items():
        dropped = np.array([drops(row) for row in stats])
        per_statistic[name].update(clean_dropped=round4(dropped[labels == 1].mean()), junk_caught=round4(dropped[labels == 0].mean()))

    used = [STATISTICS.index(name) for name in SIGNS]
    weights, bias = fit_logistic(stats[fit_half][:, used], labels[fit_half], list(SIGNS.values()))
    weights = dict(zip(SIGNS, weights.values()))
    scores = score_rows(stats, weights, bias)
    held = ~fit_half
    min_score = cut_off(scores[held & (labels == 1)], CLEAN_DROP_BUDGET)
    dropped = scores < min_score
    score = {"auc_held_out": round4(auc(scores[held], labels[held])), "min_score": min_score,
             "clean_dropped_held_out": round4(dropped[held & (labels == 1)].mean()),
             "junk_caught_held_out": round4(dropped[held & (labels == 0)].mean()),
             "junk_caught_by_kind": {kind: round4(dropped[held & (kinds == kind)].mean())
                                     for kind in sorted(set(kinds[labels == 0]))},
             "clean_dropped_by_kind": {kind: round4(dropped[held & (kinds == kind)].mean())
                                       for kind in sorted(set(kinds[labels == 1]))},
             "weights": {k: round(v, 4) for k, v in weights.items()}, "bias": round(bias, 4)}
    gopher_any = np.array([any(drops(row) for drops in thresholds.values()) for row in stats])
    results = {
        "documents": {"clean": int(labels.sum()), "junk": int((1 - labels).sum()),
                      "by_kind": {kind: int((kinds == kind).sum()) for kind in sorted(set(kinds))}},
        "statistics": per_statistic,
        "gopher_thresholds_together": {"clean_dropped": round4(gopher_any[labels == 1].mean()),
                                       "junk_caught": round4(gopher_any[labels == 0].mean())},
        "score": score,
    }
    return results


# ----------------------------------------------------------------------------------------------------
# The stand-in labels


def clean_documents(rng: random.Random) -> list[tuple[str, str]]:
    """(key, text) of edited prose; the key's prefix (before '/') names its kind."""
    docs = []
    for shard in sorted((SHARED / "corpus/mixed").glob("*.parquet")):
        table = pq.read_table(shard, columns=["id", "text", "source"]).to_pylist()
        docs += [(f"{row['source'].split('/')[-1]}/{row['id']}", row["text"]) for row in table
                 if row["source"] in CLEAN_SOURCES]
    for shard in sorted((SHARED / "corpus/gutenberg").glob("*.parquet"))[:-1]:
        for row in pq.read_table(shard, columns=["id", "text"]).to_pylist():
            lines = strip_gutenberg(row["text"])[0].split("\n")
            for i in range(3):  # three excerpts per book, whole lines, 200-2,000 words
                start = rng.randrange(len(lines))
                excerpt, words = [], 0
                target = rng.randint(200, 2000)
                for line in lines[start:]:
                    excerpt.append(line)
                    words += len(line.split())
                    if words >= target:
                        break
                if words >= 200:
                    docs.append((f"gutenberg/{row['id']}#{i}", "\n".join(excerpt).strip()))
    for path in sorted((SHARED / "sft/alpaca_eval").glob("*.json")):
        for i, record_ in enumerate(json.loads(path.read_text())):
            if len(record_["output"].split()) >= 50:
                docs.append((f"alpaca_eval/{path.stem}:{i}", record_["output"]))
    return docs


def junk_documents(sources: list[str], rng: random.Random) -> list[tuple[str, str]]:
    """Pages that fail as web pages fail, built from clean texts: one of each kind per 6 sources."""
    makers = {"navigation": navigation, "fragments": fragments, "keywords": keywords, "listing": listing,
              "numbers": numbers, "comments": comments}
    docs = []
    for i, text in enumerate(sources):
        kind = list(makers)[i % len(makers)]
        docs.append((f"{kind}/{i}", makers[kind](text.split(), rng)))
    return docs


def _excerpt(words: list[str], rng: random.Random, low: int, high: int) -> list[str]:
    k = min(len(words), rng.randint(low, high))
    start = rng.randrange(max(1, len(words) - k))
    return words[start:start + k]


def navigation(words, rng):
    menu = lambda n: [rng.choice(NAV) for _ in range(n)]
    body = " ".join(_excerpt(words, rng, 30, 80))
    return "\n".join(menu(rng.randint(15, 40)) + [body] + menu(rng.randint(10, 30)))


def fragments(words, rng):
    excerpt, lines = _excerpt(words, rng, 150, 600), []
    while excerpt:
        k = rng.randint(1, 5)
        lines.append(" ".join(w.strip(".,;:!?") for w in excerpt[:k]))
        excerpt = excerpt[k:]
    return "\n".join(lines)


def keywords(words, rng):
    vocab = [w.strip(".,;:!?\"'()").lower() for w in words if len(w) > 4] or ["best"]
    phrases = [" ".join(rng.sample(vocab, min(len(vocab), rng.randint(1, 3)))) for _ in range(12)]
    return ", ".join(rng.choice(phrases) for _ in range(rng.randint(60, 200)))


def listing(words, rng):
    vocab = [w.strip(".,;:!?\"'()") for w in words if w.isalpha()] or ["item"]
    lines = [f"{rng.choice(vocab).title()} {rng.choice(vocab)} {rng.choice(vocab)} - ${rng.randint(5, 500)}.{rng.randint(0, 99):02d} "
             f"- {rng.choice(['In stock', 'Free shipping', 'Sale', 'Only 2 left', 'Add to cart'])}"
             for _ in range(rng.randint(20, 80))]
    return "\n".join(lines)


def numbers(words, rng):
    header = " | ".join(_excerpt(words, rng, 3, 6))
    rows = [" | ".join([str(rng.randint(1990, 2024)), f"{rng.randint(1, 99999):,}", f"{rng.random() * 100:.1f}%",
                        f"{rng.random():.3f}"]) for _ in range(rng.randint(20, 80))]
    return "\n".join([header] + rows)


def comments(words, rng):
    lines = []
    for _ in range(rng.randint(20, 60)):
        lines.append(rng.choice(COMMENTS) if rng.random() < 0.7 else " ".join(_excerpt(words, rng, 3, 10)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Measures


def auc(values: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of `values` ranking label 1 above label 0 (Mann-Whitney U over the rank sums)."""
    ranks = quality._ranks(values.astype(np.float64))
    pos, neg = int(labels.sum()), int((1 - labels).sum())
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def gopher_thresholds(p) -> dict:
    """For each statistic a recipe threshold filters on, the test of a stats row (in STATISTICS order)."""
    at = {name: i for i, name in enumerate(STATISTICS)}
    return {
        "log_words": lambda r: np.expm1(r[at["log_words"]]) < p.min_words,
        "mean_word_length": lambda r: not p.min_mean_word_length <= r[at["mean_word_length"]] <= p.max_mean_word_length,
        "stop_word_ratio": lambda r: r[at["stop_word_ratio"]] * np.expm1(r[at["log_words"]]) < p.min_stop_words - 0.5,
        "alpha_words": lambda r: r[at["alpha_words"]] < p.min_alpha_words,
        "symbol_ratio": lambda r: r[at["symbol_ratio"]] > p.max_symbol_word_ratio,
        "bullet_lines": lambda r: r[at["bullet_lines"]] > p.max_bullet_lines,
        "ellipsis_lines": lambda r: r[at["ellipsis_lines"]] > p.max_ellipsis_lines,
        "dup_line_chars": lambda r: r[at["dup_line_chars"]] > p.max_dup_line_chars,
        "top_2gram_chars": lambda r: r[at["top_2gram_chars"]] > p.max_top_ngram_chars[0],
        "dup_5gram_chars": lambda r: r[at["dup_5gram_chars"]] > p.max_dup_ngram_chars[0],
    }


def statistics_rows(texts: list[str]) -> np.ndarray:
    """(N, S) the heuristic statistics of each text, in STATISTICS order."""
    return np.array([[document_stats(text)[name] for name in STATISTICS] for text in texts])


def score_rows(stats: np.ndarray, weights: dict[str, float], bias: float) -> np.ndarray:
    """(N,) the combined score of each row of statistics (in STATISTICS order)."""
    return np.array([quality_score(dict(zip(STATISTICS, row)), weights, bias) for row in stats])


def cut_off(keep_scores: np.ndarray, budget: float) -> float:
    """The highest cut-off (3 decimals) below which at most `budget` of `keep_scores` fall."""
    ordered = np.sort(keep_scores)
    return float(np.floor(ordered[int(np.floor(budget * len(ordered)))] * 1000) / 1000)


def fit_logistic(x: np.ndarray, y: np.ndarray, signs: list[int], steps: int = 20_000) -> tuple[dict[int, float], float]:
    """Ridge logistic regression on standardised columns, each weight kept to its sign (projected gradient
    descent with step 1/L, L the gradient's Lipschitz bound: it converges for this convex problem). The
    weights (by column) and bias returned apply to the raw statistics: w / std, b - sum of w x mean / std."""
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = np.c_[np.ones(len(x)), (x - mean) / std]  # (N, 1 + S)
    penalty = np.r_[0.0, np.full(z.shape[1] - 1, L2)]  # the bias is not shrunk
    sign = np.r_[0.0, signs]
    step = 1.0 / (0.25 * np.linalg.eigvalsh(z.T @ z).max() + L2)
    w = np.zeros(z.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-z @ w))
        w -= step * (z.T @ (p - y) + penalty * w)
        w = np.where(sign * w < 0, 0.0, w)  # back onto the allowed side
    raw = w[1:] / std
    return dict(enumerate(map(float, raw))), float(w[0] - (raw * mean).sum())


def real_text_drops(recipe, weights: dict[str, float], bias: float, min_score: float) -> dict:
    """Per real corpus: documents, the share the recipe's heuristics drop, the share the score alone
    drops (after stripping), and a few of the score's drops to read."""
    p = parse_section("quality", {**{k: v for k, v in vars(recipe).items()}, "score_weights": weights,
                                  "score_bias": bias, "min_score": min_score})
    h = Heuristics(p)
    corpora: dict[str, list[tuple[str, str]]] = {}
    for shard in sorted((SHARED / "corpus/mixed").glob("*.parquet")):
        for row in pq.read_table(shard, columns=["id", "text", "source"]).to_pylist():
            corpora.setdefault(f"mixed:{row['source']}", []).append((row["id"], row["text"] or ""))
    corpora["gutenberg (whole books)"] = [(row["id"], row["text"] or "") for shard in sorted((SHARED / "corpus/gutenberg").glob("*.parquet"))
                                          for row in pq.read_table(shard, columns=["id", "text"]).to_pylist()]
    corpora["commoncrawl WARC pages"] = [(url, text) for path in sorted((SHARED / "corpus/commoncrawl_warc").glob("*.warc.gz"))
                                         for url, text in warc_pages(path)]
    from daychat.data import sources

    corpora["demo input (embedded)"] = [(doc.id, doc.text) for doc in sources.embedded_documents(["stdlib", "packages"], sources.Stats())]
    out = {}
    for name, docs in corpora.items():
        gopher = score_drops = boiler = 0
        examples = []
        for key, text in docs:
            kept, _, drop = h.strip(text)
            if drop is not None:
                boiler += 1
                continue
            words = Words(kept)
            without_score = h.check_length(words) or _check_without_score(h, kept, words)
            gopher += without_score is not None
            s = quality_score(document_stats(kept, words), weights, bias)
            if s < min_score and words.count >= p.min_words:
                score_drops += 1
                if len(examples) < 3:
                    examples.append({"id": key, "score": round(s, 3), "text": " ".join(kept.split())[:160]})
        n = max(len(docs), 1)
        out[name] = {"docs": len(docs), "boilerplate_dropped": round4(boiler / n), "heuristics_dropped": round4(gopher / n),
                     "score_dropped": round4(score_drops / n), "score_examples": examples}
    return out


def _check_without_score(h: Heuristics, text: str, words: Words):
    on = h.on
    h.on = on - {"score"}
    try:
        return h.check(text, words)
    finally:
        h.on = on


def round4(value) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


if __name__ == "__main__":
    main()
