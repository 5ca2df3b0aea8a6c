"""Print Snakemake's own view of the rules as JSON: `python tests/snakemake_rules.py SNAKEFILE WORKDIR [KEY=VALUE...]`
(the KEY=VALUEs as `snakemake --config`).

Run as a subprocess: Snakemake's API changes the working directory and sets up logging globally.
"""

import json
import sys
from pathlib import Path

import yaml
from snakemake.io import is_flagged
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

config = {key: yaml.safe_load(value) for key, value in (arg.split("=", 1) for arg in sys.argv[3:])}

with SnakemakeApi(OutputSettings(quiet=None)) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(), config_settings=ConfigSettings(config=config),
                            snakefile=Path(sys.argv[1]), workdir=Path(sys.argv[2]))
    rules = {}
    for rule in workflow._workflow.rules:
        # a param computed per job (a function of its wildcards and outputs) has no value before the job
        params = {name: "<function>" if callable(rule.params[i]) else rule.params[i]
                  for name, (i, _) in rule.params._names.items()}
        rules[rule.name] = {"input": [str(f) for f in rule.input], "output": [str(f) for f in rule.output],
                            "params": params, "shell": rule.shellcmd, "checkpoint": rule.is_checkpoint,
                            "log": [str(f) for f in rule.log], "benchmark": str(rule.benchmark) if rule.benchmark else None,
                            "conda": rule.conda_env, "report": [str(f) for f in rule.output if is_flagged(f, "report")]}
print(json.dumps(rules))
