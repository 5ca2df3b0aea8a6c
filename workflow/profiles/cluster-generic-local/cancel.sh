#!/usr/bin/env bash
# cancel.sh ID...: stop jobs started by submit.sh (each runs in its own session: kill its process group).
queue="${DAYCHAT_QUEUE:-.snakemake/local-queue}"
for id in "$@"; do
    [[ -f "$queue/$id.pid" ]] && kill -TERM -- "-$(cat "$queue/$id.pid")" 2> /dev/null
done
exit 0
