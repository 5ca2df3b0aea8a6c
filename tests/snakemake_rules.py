"""Print Snakemake's own view of the rules as JSON: `python tests/snakemake_rules.py SNAKEFILE WORKDIR`.

Run as a subprocess: Snakemake's API changes the working directory and sets up logging globally.
"""

import json
import sys
from pathlib import Path

from snakemake.api import SnakemakeApi
from snakemake.settings.types import OutputSettings, ResourceSettings

with SnakemakeApi(OutputSettings(quiet=None)) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=Path(sys.argv[1]), workdir=Path(sys.argv[2]))
    rules = {}
    for rule in workflow._workflow.rules:
        params = {name: rule.params[i] for name, (i, _) in rule.params._names.items()}
        rules[rule.name] = {"input": [str(f) for f in rule.input], "output": [str(f) for f in rule.output],
                            "params": params, "shell": rule.shellcmd}
print(json.dumps(rules))
