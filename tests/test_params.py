"""params.yaml loading: every mistake is one line naming the key; every recipe in the repo is valid."""

from pathlib import Path

import pytest
import yaml

from daychat.params import (SCHEMA_COMMENT, SCHEMA_FILE, SECTIONS, ParamsError, load_section, parse_section,
                            read_params, schema_text, with_schema_line)
from daychat.errors import UserError
from workflow import schema

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [ROOT / "params.yaml", *sorted((ROOT / "workflow" / "recipes").glob("*.yaml"))]


def _write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_valid(recipe):
    raw = read_params(recipe)
    for name in SECTIONS:
        assert name in raw, f"{recipe.name} lacks section {name}"
        load_section(name, recipe)


def test_unknown_key_suggests_the_closest(tmp_path):
    path = _write(tmp_path, {"tokenizer": {"vocab_sise": 4096}})
    with pytest.raises(ParamsError) as e:
        load_section("tokenizer", path)
    assert str(e.value) == "params.yaml: tokenizer.vocab_sise is not a known key (did you mean vocab_size?)"


def test_unknown_section_suggests_the_closest(tmp_path):
    path = _write(tmp_path, {"tokenzer": {}, "download": {}})
    with pytest.raises(ParamsError, match=r"tokenzer is not a known section \(did you mean tokenizer\?\)"):
        load_section("download", path)


@pytest.mark.parametrize("section, values, message", [
    ("tokenizer", {"vocab_size": "big"}, "tokenizer.vocab_size must be an integer, got 'big'"),
    ("tokenizer", {"vocab_size": 4096.5}, "tokenizer.vocab_size must be an integer"),
    ("tokenizer", {"max_chars": True}, "tokenizer.max_chars must be an integer"),
    ("download", {"timeout_s": "soon"}, "download.timeout_s must be a number"),
    ("download", {"include": "stdlib"}, "download.include must be a list"),
    ("pretokenize", {"dtype": "int8"}, "pretokenize.dtype must be one of auto, uint16, uint32, got 'int8'"),
    ("download", {"source": "s3"}, "download.source must be one of hf, url, local, embedded"),
])
def test_wrong_types_name_the_key(tmp_path, section, values, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_section(section, _write(tmp_path, {section: values}))


@pytest.mark.parametrize("section, values, message", [
    ("tokenizer", {"vocab_size": 100}, "tokenizer.vocab_size must be >= 265"),
    ("download", {"shards": 1}, "download.shards must be >= 2"),
    ("download", {"source": "url"}, "download.url is required when download.source is url"),
    ("download", {"source": "url", "url": "ftp://x"}, "download.url must start with"),
    ("download", {"source": "local"}, "download.path is required"),
    ("download", {"include": ["stdlib", "docs"]}, "download.include must list one or more of stdlib, packages"),
    ("pretokenize", {"workers": -1}, "pretokenize.workers must be >= 0"),
])
def test_impossible_values_name_the_key(tmp_path, section, values, message):
    with pytest.raises(ParamsError, match=message):
        load_section(section, _write(tmp_path, {section: values}))


def test_numbers_are_parsed_defensively():
    # PyYAML (YAML 1.1) leaves 2e9 and 3e-4 as strings; DVC's reader makes them floats.
    p = parse_section("tokenizer", {"max_chars": "2e9", "vocab_size": 4096.0})
    assert p.max_chars == 2_000_000_000 and p.vocab_size == 4096
    assert parse_section("download", {"timeout_s": "1.5e1"}).timeout_s == 15.0


def test_missing_file_and_section_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="params.yaml not found"):
        load_section("tokenizer", tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match="tokenizer section is missing"):
        load_section("tokenizer", _write(tmp_path, {"download": {}}))
    (tmp_path / "params.yaml").write_text("tokenizer: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_section("tokenizer", tmp_path / "params.yaml")


def test_defaults_fill_absent_keys():
    assert parse_section("tokenizer", {}).vocab_size == 32768
    assert parse_section("tokenizer", None).pattern == "gpt4"


def test_committed_schema_is_current():
    committed = (ROOT / SCHEMA_FILE).read_text(encoding="utf-8")
    assert committed == schema_text(), f"{SCHEMA_FILE} is stale: rerun `make schema`"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_names_the_schema_and_passes_it(recipe):
    first = recipe.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(SCHEMA_COMMENT), f"{recipe.name}: the first line must be {SCHEMA_COMMENT}<path>"
    path = recipe.parent / first.removeprefix(SCHEMA_COMMENT)  # relative to the file, as editors resolve it
    assert path.resolve() == (ROOT / SCHEMA_FILE).resolve()
    schema.check(recipe, path)


@pytest.mark.parametrize("values, message", [
    ({"tokenizer": {"vocab_sise": 5}}, "params.yaml: tokenizer.vocab_sise is not a known key (did you mean vocab_size?)"),
    ({"tokenzer": {}}, "params.yaml: tokenzer is not a known section (did you mean tokenizer?)"),
    ({"pretrain": {"depth": "x"}}, "params.yaml: pretrain.depth must be an integer, got 'x'"),
    ({"pretrain": {"depth": 0}}, "params.yaml: pretrain.depth must be >= 1, got 0"),
    ({"probe": {"seq_lens": 512}}, "params.yaml: probe.seq_lens must be a list, got 512"),
    ({"pretokenize": {"dtype": "int8"}}, "params.yaml: pretokenize.dtype must be one of auto, uint16, uint32, got 'int8'"),
    ({"quality": {"score_weights": {"alpha_words": "x"}}}, "params.yaml: quality.score_weights.alpha_words must be a number, got 'x'"),
])
def test_the_schema_refuses_in_one_line_naming_the_key(tmp_path, values, message):
    with pytest.raises(schema.SchemaError) as e:
        schema.check(_write(tmp_path, values), ROOT / SCHEMA_FILE)
    assert str(e.value) == message
    # the same line as the full check's (daychat.params), whichever finds the mistake first
    section, keys = next(iter(values.items()))
    with pytest.raises(ParamsError) as full:
        parse_section(section, keys) if section in SECTIONS else read_params(_write(tmp_path, values))
    assert str(full.value) == message


def test_the_schema_reads_numbers_as_yaml_1_2_does(tmp_path):
    # PyYAML leaves 3e-4 as a string; DVC, editors and daychat.params read a number, and so does the check.
    (tmp_path / "params.yaml").write_text("pretrain:\n  matrix_lr: 3e-4\n  tokens: 2_000_000\nplan:\n  ref_compute: 1e19\n")
    schema.check(tmp_path / "params.yaml", ROOT / SCHEMA_FILE)
    (tmp_path / "params.yaml").write_text("export:\n  name: '1e5'\n")  # quoted: a string, as the key wants
    schema.check(tmp_path / "params.yaml", ROOT / SCHEMA_FILE)


def test_the_schema_and_the_declarations_agree_on_defaults():
    import json

    properties = json.loads((ROOT / SCHEMA_FILE).read_text())["properties"]
    assert set(properties) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        defaults = parse_section(name, {})
        for key, prop in properties[name]["properties"].items():
            assert prop["default"] == getattr(defaults, key), f"{name}.{key}"


def test_with_schema_line_replaces_the_line_for_where_the_file_lands():
    recipe = f"{SCHEMA_COMMENT}../schemas/params.schema.json\n# a recipe\ntokenizer: {{}}\n"
    moved = with_schema_line(recipe, SCHEMA_FILE)
    assert moved == f"{SCHEMA_COMMENT}{SCHEMA_FILE}\n# a recipe\ntokenizer: {{}}\n"
    assert with_schema_line("tokenizer: {}\n", "s.json") == f"{SCHEMA_COMMENT}s.json\ntokenizer: {{}}\n"
