#!/usr/bin/env bash
# status.sh ID: one line, running | success | failed, for a job started by submit.sh (see there).
set -euo pipefail
job="${DAYCHAT_QUEUE:-.snakemake/local-queue}/$1"
if [[ -f "$job.rc" ]]; then
    [[ "$(cat "$job.rc")" == 0 ]] && echo success || echo failed
elif [[ -f "$job.pid" ]] && kill -0 "$(cat "$job.pid")" 2> /dev/null; then
    echo running
elif [[ -f "$job.rc" ]]; then  # it finished between the two checks
    [[ "$(cat "$job.rc")" == 0 ]] && echo success || echo failed
else
    echo failed  # gone without an exit code: killed
fi
