#!/usr/bin/env bash
# Run by `snakemake --use-conda` inside the env of daychat.yaml once it is built, from the workspace: install
# daychat (editable: stage code edits need no rebuild) with the dependencies pyproject.toml lists. The project is
# where `daychat/` points: the project root itself, or the project behind a recipe workspace's links
# (workflow/workspace.py).
set -euo pipefail
project="$(dirname "$(readlink -f daychat)")"
python -m pip install --quiet -e "$project"
