"""The quality stage: each heuristic filter, Gutenberg and boilerplate stripping, language ID on real
sentences, the fastText classifier on a separable fixture, determinism, odd input, and the stage entry
point as the engines run it."""

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import run_stage
from daychat.data import quality, sources
from daychat.data.heuristics import (HEURISTICS, STATISTICS, Heuristics, document_stats, quality_score,
                                     strip_boilerplate, strip_gutenberg)
from daychat.data.textshards import SCHEMA, ShardInfo, read_manifest, shard_paths, write_manifest
from daychat.errors import UserError
from daychat.params import ParamsError, parse_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared/data"
MIXED = SHARED / "corpus/mixed"
GUTENBERG = SHARED / "corpus/gutenberg"
GSM8K = SHARED / "sft/gsm8k/train.jsonl"

CLEAN = (
    "The old lighthouse stood at the edge of the harbour for more than a century. Every evening the keeper "
    "climbed the narrow stairs to light the lamp, and every morning he wrote a short note in the logbook "
    "about the weather and the ships that had passed in the night.\n\n"
    "When the town council decided to replace the lamp with an automatic beacon, the keeper was asked to "
    "stay on as a guide for visitors. He agreed, and for many years he told the same stories with the same "
    "care: how the storm of 1903 had broken three windows, how a fishing boat had found its way home by the "
    "light alone, and how the building itself had been moved twice as the coast slowly changed.")
SENTENCES = CLEAN.replace("\n\n", " ").split(". ")

# The same two sentences in six languages (written for this test).
LANGUAGES = {
    "en": "The weather was cold and wet, so we stayed inside and read books by the fire all afternoon. "
          "In the evening my brother cooked soup for everyone and told us about his journey to the mountains.",
    "fr": "Le temps était froid et humide, alors nous sommes restés à la maison pour lire des livres près du feu "
          "tout l'après-midi. Le soir, mon frère a préparé une soupe pour tout le monde et nous a raconté son "
          "voyage dans les montagnes.",
    "de": "Das Wetter war kalt und nass, deshalb blieben wir drinnen und lasen den ganzen Nachmittag Bücher am "
          "Kamin. Am Abend kochte mein Bruder Suppe für alle und erzählte uns von seiner Reise in die Berge.",
    "es": "El tiempo estaba frío y húmedo, así que nos quedamos en casa leyendo libros junto al fuego toda la "
          "tarde. Por la noche mi hermano preparó sopa para todos y nos contó su viaje a las montañas.",
    "zh": "天气又冷又湿，所以我们整个下午都待在家里，在火炉旁看书。晚上，我哥哥给大家做了汤，还给我们讲了他去山里旅行的经历。",
    "ru": "Погода была холодной и сырой, поэтому мы весь день оставались дома и читали книги у камина. "
          "Вечером мой брат сварил всем суп и рассказал нам о своём путешествии в горы.",
}


def params(**values):
    return parse_section("quality", values)


def offline(**values):
    """Params for a run on the test fixtures: a small classifier, audit everything."""
    base = dict(workers=1, audit_fraction=1.0, classifier_positives=[f"local:{GSM8K}#question+answer"],
                classifier_negatives=["input"], classifier_max_docs=300, classifier_buckets=20000,
                classifier_dim=16)
    return params(**{**base, **values})


def write_dataset(folder: Path, splits: dict[str, list]) -> Path:
    """A text dataset with one shard per split: {"train": [text or (id, text, source), ...], "val": [...]}.
    Written with pyarrow, not ShardWriter, so that a text can be None (null), as other writers leave it."""
    folder.mkdir(parents=True)
    infos = []
    for i, (split, docs) in enumerate(splits.items()):
        docs = [doc if isinstance(doc, tuple) else (f"{split}-{j}", doc, "test") for j, doc in enumerate(docs)]
        columns = list(zip(*docs)) or [[], [], []]
        name = f"shard_{i:05d}.parquet"
        pq.write_table(pa.table([pa.array(c, pa.string()) for c in columns], schema=SCHEMA), folder / name)
        infos.append(ShardInfo(name, split, rows=len(docs), chars=sum(len(d[1] or "") for d in docs)))
    write_manifest(folder, infos)
    return folder


def mixed_docs(shard: int, n: int) -> list[tuple[str, str, str]]:
    table = pq.read_table(MIXED / f"shard_{shard:05d}.parquet").slice(0, n)
    return list(zip(*(table[c].to_pylist() for c in ("id", "text", "source"))))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """350 real documents of ../shared/data/corpus/mixed: 300 train, 50 val."""
    return write_dataset(tmp_path_factory.mktemp("mixed") / "data", {"train": mixed_docs(0, 300), "val": mixed_docs(1, 50)})


def run_filter(p, data: Path, where: Path, parts: Path | None = None) -> quality.Result:
    out, model = where / "filtered", where / "model"
    out.mkdir(parents=True)
    model.mkdir(parents=True)
    return quality.filter_dataset(p, data, out, model, where / "cache", parts)


# ----------------------------------------------------------------------------------------------------
# Heuristic filters: each drops its own kind of bad document, all of them keep a clean one


def _lines(sentences, prefix="", suffix=""):
    return "\n".join(f"{prefix}{s.rstrip('.')}{suffix}" for s in sentences)


BAD = {
    "length": ("too_short", "A short note about the weather today."),
    "mean_word_length": ("mean_word_length", " ".join(["internationalization", "the", "characterization", "of",
                                                       "incomprehensibilities", "and", "misunderstandings"] * 12)),
    "symbol_ratio": ("symbol_ratio", " ".join(f"#{word}" for word in CLEAN.split())),
    "alpha_words": ("alpha_words", CLEAN + "\n" + " ".join(str(i * 7919 % 10007) for i in range(400))),
    "stop_words": ("stop_words", " ".join(w for w in CLEAN.split() if w.lower().strip(".,:") not in
                                          {"the", "be", "to", "of", "and", "that", "have", "with"})),
    "bullet_lines": ("bullet_lines", _lines(SENTENCES, prefix="• ")),
    "ellipsis_lines": ("ellipsis_lines", _lines(SENTENCES, suffix="...")),
    "dup_lines": ("dup_lines", _lines(SENTENCES) + "\n" + "\n".join(["Subscribe to our newsletter for updates."] * 12)),
    "dup_paragraphs": ("dup_paragraphs", CLEAN + "\n\n" + "\n\n".join(["Thank you for reading.\nShare it with friends."] * 12)),
    "top_ngrams": ("top_ngrams", " ".join(f"{w} very good" for w in CLEAN.split())),
    "dup_ngrams": ("dup_ngrams", CLEAN + " " + " ".join([SENTENCES[0]] * 4)),
    # the combined score: CLEAN's longer words as a product listing (few stop words, prices, short lines)
    "score": ("score", "\n".join(f"{a.title()} {b} - ${9 + i % 90}.99 - in stock" for i, (a, b) in enumerate(zip(
        *[iter([w.strip(".,:;").lower() for w in CLEAN.split() if len(w) > 4])] * 2)))),
    "boilerplate": ("boilerplate", "Skip to content\n\nWe use cookies to improve your experience.\n\n"
                                   "Privacy policy | Terms of use\n\nCopyright (c) 2024 Example Ltd. All rights reserved.\n\n"
                                   "Hello, welcome to our site."),
}


def judge(text: str, p) -> str | None:
    h = Heuristics(p)
    text, _, drop = h.strip(text)
    drop = drop or h.check(text)
    return drop.reason if drop else None


def test_clean_document_passes_every_filter():
    assert judge(CLEAN, params()) is None


@pytest.mark.parametrize("name", HEURISTICS)
def test_each_filter_drops_its_case(name):
    reason, text = BAD[name]
    assert judge(text, params(heuristics=[name])) == reason  # that filter alone catches it
    assert judge(CLEAN, params(heuristics=[name])) is None


def test_document_stats_measure_what_the_filters_threshold():
    page = "The cat sat on the mat.\nHome\nHome\n- a list item with the words of a longer line\nIs it?"
    stats = document_stats(page)  # 5 lines of 23, 4, 4, 45, 6 characters; 21 words (the "-" is one)
    assert list(stats) == list(STATISTICS)
    assert stats["line_punct"] == pytest.approx(2 / 5) and stats["short_lines"] == pytest.approx(4 / 5)
    assert stats["bullet_lines"] == pytest.approx(1 / 5) and stats["dup_line_chars"] == pytest.approx(4 / 82)
    assert stats["stop_word_ratio"] == pytest.approx(5 / 21) and stats["log_words"] == pytest.approx(np.log1p(21))
    assert stats["log_mean_line_chars"] == pytest.approx(np.log1p(82 / 5))
    assert quality_score(stats, {"line_punct": 10.0}, -4.0) == pytest.approx(0.5)
    with pytest.raises(ParamsError, match=r"quality.score_weights has unknown statistics \['lines'\]"):
        params(score_weights={"lines": 1.0})


def test_length_upper_bound_and_switches():
    assert judge(CLEAN, params(max_words=50)) == "too_long"
    assert judge(BAD["length"][1], params(heuristics=[])) is None  # every filter off: nothing is dropped


def test_lorem_ipsum_page_is_dropped():
    assert judge(CLEAN + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", params()) == "boilerplate"


def test_boilerplate_is_stripped_and_the_document_kept():
    page = ("Skip to content\n\n" + CLEAN + "\n\nWe use cookies to give you the best experience on our site.\n"
            "This project is released with a Contributor Code of Conduct.\n\nRead more")
    text, stripped, drop = Heuristics(params()).strip(page)
    assert drop is None and stripped > 100
    assert text == CLEAN
    # a long paragraph that mentions a policy is prose: only nothing or its boilerplate line goes
    essay = " ".join([SENTENCES[1]] * 12) + " Our privacy policy changed in May."
    assert strip_boilerplate(essay) == (essay, 0)


def test_boilerplate_lines_of_a_single_newline_page_go_and_the_page_stays():
    # Web text often has no blank line at all: the whole page is one "paragraph". A footer or navigation
    # line goes on its own, the content lines stay, and the page is not dropped as boilerplate.
    content = CLEAN.replace("\n\n", "\n").replace(". ", ".\n")
    page = ("Skip to main content\nHome\n" + content + "\nShare this:\nFacebook\n"
            "Copyright © 2024 Example Ltd. All rights reserved.\nPrivacy Policy | Terms of Use")
    text, stripped, drop = Heuristics(params()).strip(page)
    assert drop is None and text == "Home\n" + content + "\nFacebook"
    assert stripped == len(page) - len(text)
    assert judge(page, params()) is None  # and every other filter keeps it
    # a licence hard-wrapped over lines goes sentence by sentence, the rest of its paragraph stays
    mit = ("Permission is hereby granted, free of charge, to any person obtaining a copy\nof this software and "
           "associated documentation files, to deal\nin the Software without restriction.\nThe Software is a tool.")
    assert strip_boilerplate(mit)[0] == "The Software is a tool."
    caps = ('THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS\n"AS IS" AND ANY EXPRESS OR '
            'IMPLIED WARRANTIES\nARE DISCLAIMED.\n\n' + CLEAN)
    assert strip_boilerplate(caps)[0] == CLEAN


def test_gutenberg_header_and_licence_are_stripped_and_the_book_kept():
    table = pq.read_table(GUTENBERG / "shard_00000.parquet").slice(0, 1)  # The Garden of Survival
    book = table["text"][0].as_py()
    text, stripped = strip_gutenberg(book)
    assert "*** START OF" in book and "Section 4.  Information about Donations" in book
    assert "PROJECT GUTENBERG" not in text.upper() and "Donations" not in text
    assert text.startswith("Produced by David Moynihan") and text.endswith("THE END")
    assert stripped == len(book) - len(text) > 15_000
    h = Heuristics(params())
    kept, counted, drop = h.strip(book)
    assert drop is None and h.check(kept) is None and counted >= stripped
    # the 1990s layout: the licence ("small print") comes first, then the book
    old = [t for t in pq.read_table(GUTENBERG / "shard_00002.parquet")["text"].to_pylist()
           if "*END*THE SMALL PRINT!" in t][0]
    text, stripped = strip_gutenberg(old)
    assert "SMALL PRINT" not in text.upper() and stripped > 10_000 and len(text) > 100_000


# ----------------------------------------------------------------------------------------------------
# Language ID


def test_lid_keeps_english_and_drops_other_languages():
    lid = quality.LanguageId(params())
    verdicts = {lang: lid.check(text) for lang, text in LANGUAGES.items()}
    assert verdicts.pop("en") is None
    for lang, drop in verdicts.items():
        assert drop is not None and drop.reason == "language" and drop.detail.startswith(lang), (lang, drop)
    assert quality.LanguageId(params(lid_languages=["en", "fr"])).check(LANGUAGES["fr"]) is None


def test_text_sample_is_one_bounded_line():
    sample = quality.text_sample("line one\nline two\r\n" * 5000 + "\0end", 1000)
    assert "\n" not in sample and "\0" not in sample and len(sample) <= 1000
    assert quality.text_sample("a\n\nb", 1000) == "a b"


# ----------------------------------------------------------------------------------------------------
# Classifier


def _qa(i: int) -> dict:
    topics = ["bread", "a bicycle", "tomatoes", "a bookshelf", "the roof", "a letter", "the garden", "a kite"]
    verbs = ["bake", "repair", "grow", "build", "clean", "write", "plan", "fly"]
    k = i % len(topics)
    return {"question": f"How should I {verbs[k]} {topics[k]} at home? (question {i})",
            "answer": f"Start by reading the instructions carefully. To {verbs[k]} {topics[k]}, gather the tools "
                      f"first, work slowly, and check each step before moving on; ask a friend to help if needed."}


def _spam(i: int) -> str:
    items = ["watches", "phones", "sneakers", "pills", "loans", "casino chips", "followers", "gift cards"]
    return (f"BUY CHEAP {items[i % 8].upper()} NOW!!! best price guaranteed free shipping click here "
            f"limited offer #{i} discount code SALE{i} hot deals win win win")


def test_classifier_trains_on_a_separable_fixture_and_reports_held_out_scores(tmp_path):
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(_qa(i)) for i in range(200)) + "\n")
    pq.write_table(pa.table({"text": [_spam(i) for i in range(200)]}), tmp_path / "spam.parquet")
    p = offline(classifier_positives=[f"local:{tmp_path}/qa.jsonl#question+answer"],
                classifier_negatives=[f"local:{tmp_path}/*.parquet"], classifier_holdout=0.2, classifier_epochs=20,
                classifier_window_words=16)  # the fixture's documents have 18-45 words
    ctx = quality.SourceContext([], tmp_path / "cache", p.seed)
    positives, pos_counts = quality.collect(p.classifier_positives, "quality.classifier_positives", p, ctx)
    negatives, neg_counts = quality.collect(p.classifier_negatives, "quality.classifier_negatives", p, ctx)
    assert list(pos_counts.values()) == [200] and list(neg_counts.values()) == [200]
    # one window of 16 words per document: lower case, punctuation split off, no newline
    assert all(len(line.split()) >= 16 and line == line.lower() and "\n" not in line for line in positives + negatives)
    report = quality.train_classifier(p, positives, negatives, tmp_path)
    assert report.holdout_docs == 40 and report.train_docs == 160
    assert report.precision >= 0.95 and report.recall >= 0.95
    model = quality.Scorer(tmp_path / report.model_file, p.classifier_window_words, p.classifier_windows).model
    scores = quality.hq_scores(model, [quality.classifier_line(text.split()) for text in (
        _spam(999), "How should I bake bread at home? Start by reading the instructions carefully.")])
    assert scores[0] < 0.5 < scores[1]


def test_classifier_sources_are_validated(tmp_path, monkeypatch):
    for spec in ("embedded:numpy", "ftp://host/x.parquet", "https://host/data.jsonl", "local:x#a+", "web"):
        with pytest.raises(ParamsError, match="quality.classifier_positives"):
            params(classifier_positives=[spec])
    assert quality.parse_source("shuffled:local:a/*.jsonl#q+a") == quality.Source(
        "shuffled", inner=quality.Source("local", "a/*.jsonl", ("q", "a")))
    # a .json list of records (alpaca_eval, GPTeacher), and the language reference alone out of stdlib
    (tmp_path / "answers.json").write_text(json.dumps([{"instruction": "Why?", "output": "Because."}, {"output": "So."}]))
    ctx = quality.SourceContext([], tmp_path, 0)
    assert list(quality.read_source(quality.parse_source(f"local:{tmp_path}/*.json#output"), ctx)) == [
        ("answers.json:0", "Because."), ("answers.json:1", "So.")]
    (tmp_path / "bad.json").write_text(json.dumps({"output": "x"}))
    with pytest.raises(UserError, match="bad.json: a .json source must hold a list of records"):
        list(quality.read_source(quality.parse_source(f"local:{tmp_path}/bad.json"), ctx))
    docs = [sources.Doc("python-reference/if", "The if statement.", "python-reference"),
            sources.Doc("python-stdlib/os.py", "OS routines.", "python-stdlib")]
    monkeypatch.setattr(sources, "embedded_documents", lambda parts, stats: iter(docs) if parts == ["stdlib"] else iter([]))
    assert list(quality.read_source(quality.parse_source("embedded:reference"), ctx)) == [("python-reference/if", "The if statement.")]
    assert len(list(quality.read_source(quality.parse_source("embedded:stdlib"), ctx))) == 2


def _chunks(words: list[str], rng, low: int, high: int, n: int) -> list[str]:
    starts_and_lengths = [(rng.randrange(len(words) - high), rng.randint(low, high)) for _ in range(n)]
    return [" ".join(words[start:start + k]) for start, k in starts_and_lengths]


def test_windowed_classifier_cannot_learn_length(tmp_path):
    """Positives and negatives cut from the same books, differing only in length (positives 20-40 words,
    negatives 300-900): the old whole-document classifier learns length (held-out precision ~1 with
    nothing else to learn; Spearman of its score with length ~-0.5 to -0.7 on unseen text), the windowed
    one cannot, and its score on documents of 20-900 words does not follow their length."""
    books = [strip_gutenberg(t)[0] for t in pq.read_table(GUTENBERG / "shard_00000.parquet").slice(0, 8)["text"].to_pylist()]
    words, unseen = " ".join(books[:6]).split(), " ".join(books[6:]).split()
    rng = random.Random(0)
    positives, negatives, test = _chunks(words, rng, 20, 40, 400), _chunks(words, rng, 300, 900, 400), _chunks(unseen, rng, 20, 900, 600)
    length = [len(t.split()) for t in test]
    for name, docs in (("pos", positives), ("neg", negatives)):
        pq.write_table(pa.table({"text": docs}), tmp_path / f"{name}.parquet")
    p = offline(classifier_positives=[f"local:{tmp_path}/pos.parquet"], classifier_negatives=[f"local:{tmp_path}/neg.parquet"],
                classifier_window_words=20, classifier_epochs=20, classifier_max_docs=1000)

    (tmp_path / "old").mkdir()
    old = quality.train_classifier(p, [quality.text_sample(t, 4000) for t in positives],
                                   [quality.text_sample(t, 4000) for t in negatives], tmp_path / "old")
    old_model = quality._fasttext().load_model(str(tmp_path / "old" / old.model_file))
    old_rho = quality.spearman(quality.hq_scores(old_model, [quality.text_sample(t, 4000) for t in test]), length)
    assert old.precision > 0.9 and old_rho < -0.3  # what this test would catch

    ctx = quality.SourceContext([], tmp_path, p.seed)
    lines = [quality.collect(specs, "k", p, ctx)[0] for specs in (p.classifier_positives, p.classifier_negatives)]
    assert all(len(line.split()) >= 20 and line == line.lower() for line in lines[0] + lines[1])  # 20 words, + punctuation
    (tmp_path / "new").mkdir()
    new = quality.train_classifier(p, *lines, tmp_path / "new")
    write_dataset(tmp_path / "test", {"train": test, "val": test[:1]})
    scored = quality.Scorer(tmp_path / "new" / new.model_file, p.classifier_window_words, p.classifier_windows).run(
        quality.plan_chunks([tmp_path / "test/shard_00000.parquet"], read_manifest(tmp_path / "test")[:1])[0])
    assert list(scored.words) == length
    assert abs(quality.spearman(scored.scores, length)) < 0.15
    assert quality.spearman(np.arange(5.0), np.array([1.0, 3, 2, 5, 4])) == pytest.approx(0.8)
    assert quality.spearman(np.ones(4), np.arange(4.0)) is None


def test_window_starts_cover_the_document_without_overlap():
    assert quality.window_starts(0, 50, 8) == [] and quality.window_starts(30, 50, 8) == [0]
    assert quality.window_starts(99, 50, 8) == [0]
    assert quality.window_starts(1000, 50, 8) == [0, 136, 271, 407, 543, 679, 814, 950]
    assert quality.window_starts(160, 50, 8) == [0, 55, 110]
    assert quality.window_starts(1000, 50, 1) == [475]
    assert quality.classifier_line("Hello,\nWorld!  It's  ok.".split()) == "hello , world ! it's ok ."


def test_params_reject_thresholds_out_of_range():
    with pytest.raises(ParamsError, match=r"quality.lid_threshold must be <= 1.0"):
        params(lid_threshold=1.5)
    with pytest.raises(ParamsError, match=r"quality.max_top_ngram_chars"):
        params(max_top_ngram_chars=[0.2, 1.2])
    with pytest.raises(ParamsError, match=r"quality.heuristics has unknown filters \['stopwords'\]"):
        params(heuristics=["stopwords"])
    with pytest.raises(ParamsError, match=r"quality.classifier_window_words must be >= 8"):
        params(classifier_window_words=4)
    with pytest.raises(ParamsError, match=r"quality.classifier_windows must be >= 1"):
        params(classifier_windows=0)
    with pytest.raises(ParamsError, match=r"quality.classifier_keep must be one of top_fraction, threshold, random"):
        params(classifier_keep="best")
    with pytest.raises(ParamsError, match=r"quality.classifier_top_fraction must be > 0"):
        params(classifier_keep="random", classifier_top_fraction=0.0)


# ----------------------------------------------------------------------------------------------------
# The whole filter: outputs, determinism, odd input


def _files(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_filter_dataset_is_deterministic_and_independent_of_workers(mixed, tmp_path):
    one = run_filter(offline(workers=1), mixed, tmp_path / "one")
    two = run_filter(offline(workers=2), mixed, tmp_path / "two")
    files = [{**_files(tmp_path / run / "filtered"), **_files(tmp_path / run / "model")} for run in ("one", "two")]
    metas = [json.loads(f.pop("meta.json")) for f in files]
    assert files[0] == files[1]  # shards, manifest, audit table, model: byte for byte
    assert [m["params"].pop("workers") for m in metas] == [1, 2] and metas[0] == metas[1]
    assert one.metrics()["docs_out"] == two.metrics()["docs_out"]
    m = one.metrics()
    assert m["docs_in"] == 350 and m["val_docs_in"] == 50
    assert m["docs_out"] == m["docs_in"] - sum(m[f"dropped_{r}"] for r in quality.ALL_REASONS)
    assert m["dropped_classifier"] > 0 and 0.0 <= m["classifier_precision"] <= 1.0
    # the same split as the input, the audit table holds every dropped document
    out = tmp_path / "one/filtered"
    assert [s.split for s in read_manifest(out)] == ["train", "val"]
    audit = pq.read_table(out / quality.AUDIT_FILE)
    assert audit.num_rows == m["docs_in"] - m["docs_out"]
    assert set(audit["reason"].to_pylist()) <= set(quality.ALL_REASONS)
    kept = {i for path in shard_paths(out) for i in pq.read_table(path)["id"].to_pylist()}
    assert not kept & set(audit["id"].to_pylist())


def test_random_keep_drops_as_many_as_the_classifier_would(mixed, tmp_path):
    """classifier_keep: random, the blind control of a filter ablation: no model, the same top fraction of
    the train split kept (ceil(fraction x survivors)), chosen by a seeded draw per document."""
    result = run_filter(offline(classifier_keep="random", classifier_top_fraction=0.7), mixed, tmp_path)
    audit = pq.read_table(tmp_path / "filtered" / quality.AUDIT_FILE).to_pylist()
    train_kept = sum(s.rows for s in read_manifest(tmp_path / "filtered") if s.split == "train")
    train_dropped = sum(1 for row in audit if row["reason"] == "classifier" and row["split"] == "train")
    assert train_kept == math.ceil(0.7 * (train_kept + train_dropped)) and train_dropped > 0
    assert all(row["detail"].startswith("random draw") for row in audit if row["reason"] == "classifier")
    assert result.classifier is None and "random" in result.summary()


def test_audit_sample_is_seeded(mixed, tmp_path):
    p = offline(classifier=False, audit_fraction=0.5, min_words=680)  # about half the documents are shorter
    result = run_filter(p, mixed, tmp_path)
    audit = pq.read_table(tmp_path / "filtered" / quality.AUDIT_FILE)["id"].to_pylist()
    dropped = result.tally.docs - result.tally.kept
    assert 0.3 * dropped < len(audit) < 0.7 * dropped
    assert all(quality.audited(i, p) for i in audit)
    meta = json.loads((tmp_path / "model/meta.json").read_text())
    assert meta["enabled"] is False and not (tmp_path / "model/model.bin").exists()


def test_none_text_and_odd_unicode_never_crash(tmp_path):
    odd = [None, "", "\x00\x01\x02", "🙂" * 300, "e\u0301" * 500, "\ufffd " * 200, "x" * 100_000,
           "مرحبا بكم في " * 60, "\u202e" + CLEAN, "\r\n" * 500]
    data = write_dataset(tmp_path / "data", {"train": odd + [CLEAN], "val": odd[::-1] + [CLEAN]})
    result = run_filter(offline(classifier=False), data, tmp_path)
    assert result.tally.kept == 4  # in each split: the clean document, with and without an RTL override
    with pytest.raises(UserError, match="every document of the train split was dropped"):
        junk = [text for text in odd if text is None or CLEAN not in text]
        run_filter(offline(classifier=False), write_dataset(tmp_path / "bad", {"train": junk, "val": [CLEAN]}),
                   tmp_path / "bad-out")


def test_missing_text_column_is_one_line(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("shard_00000.parquet", "shard_00001.parquet"):
        pq.write_table(pa.table({"id": ["a"], "body": [CLEAN], "source": ["x"]}), folder / name)
    write_manifest(folder, [ShardInfo("shard_00000.parquet", "train"), ShardInfo("shard_00001.parquet", "val")])
    with pytest.raises(UserError, match=r"shard_00000.parquet has no 'text' column \(columns: id, body, source\)"):
        run_filter(offline(), folder, tmp_path)


# ----------------------------------------------------------------------------------------------------
# The stage as the engines run it


def workspace(tmp_path: Path, **values) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump({"quality": values}))
    return ws


ARGS = ["--data", "data/dedup", "--model-out", "models/quality", "--out", "data/filtered",
        "--metrics", "reports/metrics/quality.json"]


def test_stage_writes_outputs_metrics_and_model(tmp_path):
    ws = workspace(tmp_path, workers=2, classifier_positives=[f"local:{GSM8K}#question+answer"],
                   classifier_negatives=["shuffled:input"], classifier_max_docs=200, classifier_buckets=20000,
                   classifier_dim=16)
    write_dataset(ws / "data/dedup", {"train": mixed_docs(0, 200), "val": mixed_docs(1, 40)})
    proc = run_stage("quality", ARGS, ws)
    assert proc.returncode == 0, proc.stderr
    assert "[quality] kept" in proc.stdout and "dropped" in proc.stdout
    metrics = json.loads((ws / "reports/metrics/quality.json").read_text())
    for key in ("docs_in", "docs_out", "stripped_chars", "classifier_precision", "classifier_recall",
                "docs_per_s", "mb_per_s", "seconds", *(f"dropped_{r}" for r in quality.ALL_REASONS)):
        assert key in metrics, key
    for key in ("classifier_spearman_length", "classifier_spearman_line_chars"):  # measured on every scored document
        assert -1.0 <= metrics[key] <= 1.0 and metrics[key] == meta_of(ws)[key.removeprefix("classifier_")]
    assert "Spearman with length" in proc.stdout
    assert metrics["docs_in"] == 240 and 0 < metrics["docs_out"] < 240
    meta = json.loads((ws / "models/quality/meta.json").read_text())
    assert meta["enabled"] and (ws / "models/quality" / meta["model"]).is_file()
    assert meta["holdout_docs"] == metrics["classifier_holdout_docs"] > 0
    assert [s.rows for s in read_manifest(ws / "data/filtered")] != [0, 0]
    assert not list((ws / "data/filtered").glob(".*"))  # no scratch folder or temporary file left


def test_the_demo_classifier_does_not_follow_length(tmp_path):
    """The demo recipe's download and quality sections, run as the demo runs them, on the demo's own text:
    the classifier's score does not follow document length (|Spearman| < 0.15, issue 18). With the stdlib's
    docstrings as positives it was -0.16 at this seed (-0.13 to -0.22 over seeds 0-3): docstrings are the
    short part of the very input, so the score ranked the long package READMEs low."""
    recipe = yaml.safe_load((ROOT / "workflow/recipes/demo.yaml").read_text())
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump({"download": recipe["download"], "quality": recipe["quality"]}))
    proc = run_stage("download", ["--out", "data/dedup", "--cache", ".cache/download", "--metrics", "m.json"], ws)
    assert proc.returncode == 0, proc.stderr
    proc = run_stage("quality", ARGS, ws)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((ws / "reports/metrics/quality.json").read_text())
    assert metrics["dropped_classifier"] > 0 and metrics["classifier_holdout_docs"] > 0
    assert abs(metrics["classifier_spearman_length"]) < 0.15, metrics["classifier_spearman_length"]


def meta_of(ws: Path) -> dict:
    return json.loads((ws / "models/quality/meta.json").read_text())


def test_stage_empty_input_exits_2_with_one_line(tmp_path):
    ws = workspace(tmp_path)
    write_dataset(ws / "data/dedup", {"train": [], "val": []})
    proc = run_stage("quality", ARGS, ws)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: [quality]") and "has no documents" in lines[0]
    assert not (ws / "data/filtered").exists() and not (ws / "models/quality").exists()


# ----------------------------------------------------------------------------------------------------
# Per shard: pass A one job per shard, then a gather (what `snakemake --config per_shard=true` runs)


def file_hashes(folder: Path) -> dict[str, str]:
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """240 real documents in three shards (two train, one val) of row groups of 32: several chunks each."""
    folder = tmp_path_factory.mktemp("sharded") / "data"
    folder.mkdir()
    docs, infos = mixed_docs(0, 200), []
    for i, (split, part) in enumerate((("train", docs[:110]), ("train", docs[110:]), ("val", mixed_docs(1, 40)))):
        name = f"shard_{i:05d}.parquet"
        pq.write_table(pa.table([pa.array(c, pa.string()) for c in zip(*part)], schema=SCHEMA), folder / name,
                       row_group_size=32)
        infos.append(ShardInfo(name, split, rows=len(part), chars=sum(len(d[1]) for d in part),
                               sha256=hashlib.sha256((folder / name).read_bytes()).hexdigest()))
    write_manifest(folder, infos)
    return folder


TIMINGS = {"lid_cpu_s", "heuristics_cpu_s", "classifier_train_s", "classifier_score_cpu_s", "docs_per_s", "mb_per_s",
           "seconds"}


@pytest.mark.parametrize("keep", ["top_fraction", "random", "off"])
def test_parts_then_gather_is_byte_identical_to_the_plain_run(sharded, tmp_path, keep):
    classifier = keep != "off"
    p = offline(classifier=classifier, classifier_keep="top_fraction" if keep == "off" else keep, audit_fraction=0.5,
                min_words=400)  # pass A drops some in most chunks
    plain = run_filter(p, sharded, tmp_path / "plain")
    parts = tmp_path / "parts"
    for shard in read_manifest(sharded):
        (parts / shard.name).mkdir(parents=True)
        part = quality.filter_part(p, sharded, shard.name, parts / shard.name)
        assert part["finished"] >= part["started"] and part["tally"]["docs"] == shard.rows
    gathered = run_filter(p, sharded, tmp_path / "gathered", parts)
    for folder in ("filtered", "model"):  # shards, manifest, audit table; model and its meta.json
        assert file_hashes(tmp_path / "gathered" / folder) == file_hashes(tmp_path / "plain" / folder)
    assert pq.ParquetFile(tmp_path / "plain/filtered" / quality.AUDIT_FILE).metadata.num_row_groups > 5  # one per chunk
    assert {k: v for k, v in gathered.metrics().items() if k not in TIMINGS} == \
        {k: v for k, v in plain.metrics().items() if k not in TIMINGS}
    m = plain.metrics()
    assert (m["dropped_classifier"] > 0) == classifier and m["docs_out"] > 0
    assert classifier or not list((parts / "shard_00000").glob(".*"))  # nothing left half-written in a part
    assert (m["classifier_spearman_length"] is not None) == (keep == "top_fraction")
    if keep == "random":
        meta = json.loads((tmp_path / "plain/model/meta.json").read_text())
        assert not meta["enabled"] and "random" in meta["note"] and not (tmp_path / "plain/model/model.bin").exists()
    if classifier:
        return
    # an unknown shard, a part made with other params, a missing part: one line each
    with pytest.raises(UserError, match=r"shard 'shard_00009' is not listed in .*manifest.json \(it lists shard_00000"):
        quality.filter_part(p, sharded, "shard_00009", tmp_path / "x")
    shutil.rmtree(parts / "shard_00001")
    (parts / "shard_00001").mkdir()
    quality.filter_part(offline(classifier=False, min_words=10), sharded, "shard_00001", parts / "shard_00001")
    with pytest.raises(UserError, match=r"shard_00001/part.json was made from other inputs .*delete .*shard_00001"):
        run_filter(p, sharded, tmp_path / "again", parts)
    (parts / "shard_00001" / quality.PART).unlink()
    with pytest.raises(UserError, match=r"shard shard_00001 of .*data has no finished part \(run `quality.py --shard"):
        run_filter(p, sharded, tmp_path / "again2", parts)


def test_stage_per_shard_flags_write_what_the_plain_stage_writes(sharded, tmp_path):
    ws = workspace(tmp_path, workers=1, classifier_positives=[f"local:{GSM8K}#question+answer"],
                   classifier_negatives=["shuffled:input"], classifier_max_docs=200, classifier_buckets=20000,
                   classifier_dim=16)
    shutil.copytree(sharded, ws / "data/dedup")
    assert run_stage("quality", ARGS, ws).returncode == 0
    plain = json.loads((ws / "reports/metrics/quality.json").read_text())
    for folder in ("data/filtered", "models/quality"):
        (ws / folder).rename(ws / f"{folder}.plain")
    for shard in ("shard_00000", "shard_00001", "shard_00002"):
        proc = run_stage("quality", [*ARGS, "--shard", shard, "--parts", ".cache/parts"], ws)
        assert proc.returncode == 0, proc.stderr
    assert not (ws / "data/filtered").exists() and not (ws / "models/quality").exists()  # parts only
    proc = run_stage("quality", [*ARGS, "--gather", "--parts", ".cache/parts"], ws)
    assert proc.returncode == 0, proc.stderr
    for folder in ("data/filtered", "models/quality"):
        assert file_hashes(ws / folder) == file_hashes(ws / f"{folder}.plain")
    gathered = json.loads((ws / "reports/metrics/quality.json").read_text())
    assert {k: v for k, v in gathered.items() if k not in TIMINGS} == {k: v for k, v in plain.items() if k not in TIMINGS}
    assert set(gathered) == set(plain) and gathered["seconds"] > 0 and gathered["dropped_classifier"] > 0
    proc = run_stage("quality", [*ARGS, "--shard", "shard_00000"], ws)
    assert proc.returncode == 2 and "--parts goes with --shard NAME or --gather" in proc.stderr
