"""params.yaml, read and checked: every section parsed into its declared type, then the rules of its domain.

`params.yaml` is the single source of truth for every knob; DVC tracks the sections each stage declares
in `dvc.yaml`, and Snakemake sees the same values as rule params. A stage loads only its own section:

    p = load_section("tokenizer")          # -> TokenizerParams, or ParamsError with one line

Two layers check a section. Its declaration (daychat/sections.py: types, defaults, ranges, choices, rules
between its own keys) knows nothing of the code that uses it. Then the rules that need what a domain knows
run in that domain, listed in DOMAIN_RULES: the tokenizer's special tokens, the quality filters' names and
source specs, the SFT sources, the training schedule's batch arithmetic. The domains import the
declarations (daychat.sections), never this module, so the library's imports have no cycle
(tests/test_imports.py).

`python -m daychat.params --schema` prints the JSON Schema of params.yaml (committed as
workflow/schemas/params.schema.json, which params.yaml and the recipes name on their first line so that
editors complete and check keys; the Snakefile validates against it at DAG build).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from daychat.errors import UserError
from daychat.sections import (SCORE_WEIGHTS, SECTIONS, ChatEvalParams, CoreEvalParams, DedupParams,  # noqa: F401
                              DownloadParams, ExportParams, PARAMS_FILE, ParamsError, PlanParams, PretokenizeParams,
                              PretrainParams, ProbeParams, QualityParams, ReportParams, SftParams, TokenizerParams,
                              did_you_mean, json_schema, parse)

SCHEMA_FILE = "workflow/schemas/params.schema.json"  # from a workspace root: the project's, or runs/<name>/
# The first line of params.yaml and of every recipe: editors with the YAML language server (VS Code's YAML
# extension, and others) complete and check keys against the schema it names, relative to the file.
SCHEMA_COMMENT = "# yaml-language-server: $schema="


# ----------------------------------------------------------------------------------------------------
# The rules that live with the code that owns their meaning (imported when a section is read, so that
# reading one stage's section loads only its own domain)


def _tokenizer_rules(p: TokenizerParams) -> None:
    from daychat.tokenizer import check_params

    check_params(p)


def _quality_rules(p: QualityParams) -> None:
    from daychat.data.quality import check_params

    check_params(p)


def _pretrain_rules(p: PretrainParams) -> None:
    from daychat.train.schedule import check_batch

    check_batch("pretrain", p.total_batch, p.device_batch, [seq_len for _, seq_len in p.curriculum()], p.gpus)


def _sft_rules(p: SftParams) -> None:
    from daychat.sft.sources import parse_sources
    from daychat.train.schedule import check_batch

    parse_sources(p.sources, "sft.sources")
    check_batch("sft", p.total_batch, p.device_batch, [p.seq_len], p.gpus)


DOMAIN_RULES: dict[str, Callable[[Any], None]] = {
    "tokenizer": _tokenizer_rules,
    "quality": _quality_rules,
    "pretrain": _pretrain_rules,
    "sft": _sft_rules,
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
            raise ParamsError(str(name), f"is not a known section{did_you_mean(str(name), SECTIONS)}", path.name)
    return raw


def load_section(name: str, path: str | os.PathLike = PARAMS_FILE) -> Any:
    """Load and validate one section of params.yaml into its typed object."""
    raw = read_params(path)
    if name not in raw:
        raise ParamsError(name, "section is missing", Path(path).name)
    return parse_section(name, raw[name], Path(path).name)


def parse_section(name: str, values: Any, file: str = PARAMS_FILE) -> Any:
    """Section `name` (a mapping as read from params.yaml) as its typed object: its declaration, then its
    domain's rules; a ParamsError of one line naming the key otherwise."""
    p = parse(name, values, file)
    if name in DOMAIN_RULES:
        try:
            DOMAIN_RULES[name](p)
        except ParamsError as e:
            raise ParamsError(e.key, e.message, file) from None
    return p


def validate_all(path: str | os.PathLike = PARAMS_FILE) -> None:
    """Check every section of params.yaml (not only one stage's): what both engines do before any stage
    runs (the Snakefile at DAG build; under DVC each stage on start), so that a typo in any section stops
    the run before outputs are deleted or hours are spent upstream of it. Sections may be absent (a
    stage's own section is required by `load_section`)."""
    raw = read_params(path)
    for name in SECTIONS:
        if name in raw:
            parse_section(name, raw[name], Path(path).name)


def defaults(name: str) -> dict[str, Any]:
    """A section's default values, as they would be written in params.yaml."""
    import dataclasses

    return dataclasses.asdict(SECTIONS[name]())


def with_schema_line(text: str, schema: str) -> str:
    """`text` (a params file) whose first line names `schema`, the schema's path relative to the file: a
    recipe copied into a workspace, or written by the planner, names the schema from where it lands.
    A recipe in workflow/recipes/ names ../schemas/params.schema.json; a params.yaml at a workspace root
    names SCHEMA_FILE (in runs/<name>/, `workflow` is a link to the project's)."""
    lines = [line for line in text.splitlines(keepends=True) if not line.startswith(SCHEMA_COMMENT)]
    return f"{SCHEMA_COMMENT}{schema}\n" + "".join(lines)


def schema_text() -> str:
    """The JSON Schema of params.yaml as committed in workflow/schemas/params.schema.json."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m daychat.params", description=__doc__.split("\n", 1)[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--schema", action="store_true", help=f"print the JSON Schema of params.yaml (-> {SCHEMA_FILE})")
    what.add_argument("--check", metavar="PARAMS", help="validate a params file (all sections, domain rules included)")
    args = parser.parse_args(argv)
    if args.schema:
        sys.stdout.write(schema_text())
        return
    try:
        validate_all(args.check)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"{args.check}: ok")


if __name__ == "__main__":
    main()
