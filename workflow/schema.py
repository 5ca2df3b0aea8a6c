"""params.yaml against its JSON Schema, the Snakefile's first check at DAG build.

workflow/schemas/params.schema.json is generated from the section declarations (daychat/sections.py) by
`python -m daychat.params --schema`; tests/test_params.py keeps it current. This check needs neither
daychat nor torch, so it runs in Snakemake's own process on every parse of the Snakefile; the full check
(the domains' rules, model shapes) follows in workflow/guard.py. Either stops the run with one line that
names the key, before Snakemake plans or deletes anything.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import jsonschema
import yaml


class SchemaError(Exception):
    pass


class _Yaml12Numbers(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where a plain 3e-4 or 1e19 is a string; YAML 1.2 (DVC's ruamel, editors) and
    daychat.params read a number. Read them as numbers here too, so that the schema sees what the stages get."""


_Yaml12Numbers.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def check(params: str | Path, schema: str | Path) -> None:
    """Raise SchemaError (one line) for the first key of `params` that `schema` refuses."""
    params = Path(params)
    try:
        data = yaml.load(params.read_text(encoding="utf-8"), Loader=_Yaml12Numbers) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SchemaError(f"{params.name}: cannot be read ({str(e).splitlines()[0]})") from None
    rules = json.loads(Path(schema).read_text(encoding="utf-8"))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(rules).iter_errors(data))
    if error is None:
        return
    key = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        unknown = next(str(name) for name in error.instance if name not in known)
        close = difflib.get_close_matches(unknown, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(known))}"
        what = "section" if not key else "key"
        raise SchemaError(f"{params.name}: {f'{key}.' if key else ''}{unknown} is not a known {what} ({hint})")
    raise SchemaError(f"{params.name}: {key or 'the file'} {_must_be(error)}")


# The wording daychat.params uses for the same mistakes, so that a key says the same whichever check finds it.
_TYPES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
          "array": "a list", "object": "a mapping"}


def _must_be(error: jsonschema.ValidationError) -> str:
    got, rule = error.instance, error.validator_value
    if error.validator == "type" and rule in _TYPES:
        return f"must be {_TYPES[rule]}, got {got!r}"
    if error.validator == "minimum":
        return f"must be >= {rule}, got {got!r}"
    if error.validator == "maximum":
        return f"must be <= {rule}, got {got!r}"
    if error.validator == "enum":
        return f"must be one of {', '.join(map(str, rule))}, got {got!r}"
    return f"is not valid: {' '.join(error.message.split())} (workflow/schemas/params.schema.json)"
