#!/usr/bin/env bash
# A stand-in batch scheduler: try the cluster path (one job per stage, submitted, polled, collected) on
# one machine, with no Slurm. Snakemake's cluster-generic executor calls
#     submit.sh JOBSCRIPT      -> starts the job detached and prints its id     (as `sbatch --parsable`)
#     status.sh ID             -> running | success | failed                    (as `sacct`)
#     cancel.sh ID...          -> stops the jobs                                (as `scancel`)
# A job is a copy of its script (a scheduler spools it: Snakemake may delete the original), run in its own
# session so that cancel can stop the whole process group; its log and exit code land in the queue folder
# (.snakemake/local-queue/ of the working directory, or $DAYCHAT_QUEUE).
set -euo pipefail
queue="${DAYCHAT_QUEUE:-.snakemake/local-queue}"
mkdir -p "$queue"
id="$(date +%s%N)-$$"
cp "$1" "$queue/$id.sh"
# The exit code is written to a temporary name, then renamed: status never reads half a file.
setsid bash -c 'bash "$1.sh" > "$1.log" 2>&1; echo $? > "$1.rc.tmp"; mv "$1.rc.tmp" "$1.rc"' _ "$queue/$id" \
    < /dev/null > /dev/null 2>&1 &
echo $! > "$queue/$id.pid"
echo "$id"
