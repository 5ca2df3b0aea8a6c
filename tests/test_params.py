"""params.yaml loading: every mistake is one line naming the key; every recipe in the repo is valid."""

from pathlib import Path

import pytest
import yaml

from daychat.params import SECTIONS, ParamsError, load_section, parse_section, read_params
from daychat.errors import UserError

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
