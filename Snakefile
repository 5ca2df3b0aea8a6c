# Generic: every rule comes from dvc.yaml (see workflow/dag.py), so the two engines run one DAG.
#   snakemake --cores 8 all                      the recipe in params.yaml, here
#   snakemake --cores 2 -d runs/demo all         a recipe's own workspace (see workflow/workspace.py)
#   snakemake --config per_shard=true ...        stages with `meta: {shards: ...}` as one job per shard + a gather
#                                                (`shards: self`: after a `<stage>_list` job that lists them)
#
# After a kill, a reboot or `dvc repro`, rerun the same command: workflow/guard.py (called below, before
# Snakemake plans or deletes anything) takes the workspace lock, clears what a killed run left, validates
# the whole params.yaml and adopts what DVC did since; profiles/default sets rerun-incomplete.
import importlib.util
import os
import subprocess
import sys


def _module(name):
    spec = importlib.util.spec_from_file_location(f"daychat_{name}", os.path.join(workflow.basedir, "workflow", f"{name}.py"))
    loaded = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def _fail(message):
    # One line, as the stages say theirs (a WorkflowError would add Snakemake's file and stack lines).
    print(f"error: [snakemake] {message}", file=sys.stderr, flush=True)
    sys.exit(2)


_dag, _guard = _module("dag"), _module("guard")
try:
    _STAGES = _dag.load_stages(".")
    _PARAMS = _dag.load_params(".")
except _dag.DagError as e:
    _fail(e)
_schema = _module("schema")  # params.yaml against workflow/schemas/params.schema.json, before anything runs
try:
    _schema.check("params.yaml", os.path.join(workflow.basedir, "workflow", "schemas", "params.schema.json"))
except _schema.SchemaError as e:
    _fail(e)


def _output(stage, path):
    """A stage's output as Snakemake declares it; the report stage's plots and page, and every stage's metrics
    file, marked for `snakemake --report` (workflow/dag.py says which, workflow/report/ has the captions)."""
    out = directory(path) if _dag.is_folder(path) else path
    for where, caption, category in (_dag.REPORT_PLOTS, _dag.REPORT_PAGE):
        if path == where:
            patterns = ["{name}.png"] if _dag.is_folder(path) else []
            return report(out, caption=f"workflow/report/{caption}", category=category, patterns=patterns)
    if path in stage.metrics:
        caption, category = _dag.REPORT_METRICS
        return report(out, caption=f"workflow/report/{caption}", category=category, subcategory=stage.name)
    return out


def _logged(command):
    # The job's own stdout and stderr go to its log (`log:`) and, through tee, on to the terminal as before
    # (both on stdout: one stream keeps their order in the log). Unbuffered, so that the terminal and the log
    # follow the stage live, as they did without the pipe. pipefail (Snakemake's bash prefix) keeps the
    # stage's exit status. A killed job leaves its log as far as it got: nothing reads a log as a sign of
    # work done (Snakemake decides from outputs and its records, the report from metrics and benchmarks),
    # and the job's next run starts it afresh (Snakemake deletes a job's log before running it).
    return f"export PYTHONUNBUFFERED=1; ( {command} ) 2>&1 | tee {{log}}"


# One software environment for every rule: with `--use-conda` (a cluster, a fresh machine), Snakemake builds it
# from this file and its post-deploy script (which installs daychat itself); without, rules run in the
# current environment (`make setup`'s .venv) and the directive is only documentation.
_ENV = "workflow/envs/daychat.yaml"


# Per-shard mode (off unless `--config per_shard=true`, as the cluster profiles set it): a stage with
# `meta: {shards: FOLDER}` becomes a `<stage>_shard` rule, one job per shard listed in FOLDER/manifest.json,
# and its own rule gathers the parts. The shard list is known only once FOLDER is written, so the stage
# that writes it is a checkpoint: Snakemake re-plans the DAG after it ran. A stage with `meta: {shards:
# self}` (download) has no such folder: a cheap `<stage>_list` checkpoint runs `cmd --list --parts DIR`,
# which writes DIR/shards.json, and the shard jobs follow that list.
_PER_SHARD = {True: True, False: False, "true": True, "false": False}.get(config.get("per_shard", False))
if _PER_SHARD is None:  # a bool from a profile's `config:`, a string from --config
    _fail(f"--config per_shard={config['per_shard']!r}: use true or false")
_SHARDED = [s for s in _STAGES if s.shards] if _PER_SHARD else []
_CHECKPOINTS = {_dag.producer(_STAGES, s.shards).name for s in _SHARDED if not s.lists_shards}

_WORKSPACE = None  # this run's hold on the workspace (jobs re-parsing this file on a cluster take none)
if workflow.is_main_process:
    try:
        _WORKSPACE = _guard.start(".", dry_run=workflow.output_settings.dryrun, snakefile=workflow.main_snakefile,
                                  stages=_STAGES, per_shard=_PER_SHARD, say=lambda line: print(line, file=sys.stderr))
    except _guard.GuardError as e:
        _fail(e)
try:
    _VALUES = {s.name: _dag.param_values(s, _PARAMS) for s in _STAGES}
except _dag.DagError as e:
    _fail(e)


def _parts_folder(wildcards, output):
    """The parts folder (workflow/dag.py, Stage.parts) of a `<stage>_list` or `<stage>_shard` job: the folder of
    its one output, derived rather than spelled out (`snakemake --lint` warns of a param that repeats an output's
    prefix, which breaks where outputs are moved, e.g. to remote storage); the value is the same."""
    return os.path.dirname(output[0])


def _parts_of(stage):
    """Input function of a gathering rule: the part folder of every shard, once the checkpoint ran."""
    lister = f"{stage.name}_list" if stage.lists_shards else _dag.producer(_STAGES, stage.shards).name
    def parts(wildcards):
        getattr(checkpoints, lister).get()  # raises until the shard list exists and is up to date
        return [f"{stage.parts}/{name}" for name in _dag.shard_names_of(".", stage)]
    return parts


# `snakemake --report report.html`: this page, then the outputs marked with report() (see _output above),
# the runtime of every rule, and per output the rule, command, params and software environment that made it.
report: "workflow/report/workflow.rst"


rule all:
    input: [out for s in _STAGES if not s.on_demand for out in s.outputs]
    default_target: True


for _stage in _STAGES:
    _sharded = _stage in _SHARDED
    _listed = [_stage.shard_list] if _sharded and _stage.lists_shards else []  # the shard and gather jobs read it
    # The command travels in params (a shell string built in this loop would be formatted late, with
    # the last stage's values); the declared params.yaml sections ride along so that editing one
    # reruns this stage and what is downstream of it. A gathering rule also waits for every part.
    _rule = dict(
        name=_stage.name,
        input=[_stage.deps + _listed, _parts_of(_stage)] if _sharded else _stage.deps,
        output=[_output(_stage, p) for p in _stage.outputs],
        params=dict(cmd=_stage.cmd, **_VALUES[_stage.name]),
        shell=_logged(f"{{params.cmd}} --gather --parts {_stage.parts}" if _sharded else "{params.cmd}"),
    )
    # Wall time, peak RSS, I/O and CPU time of the job (Snakemake's benchmark TSV); the report stage's time
    # budget reads them (daychat/report.py). To Snakemake a benchmark is one more output of the job (a
    # missing one reruns a job named as a target, an old one dates its outputs): workflow/guard.py keeps
    # them in step with what DVC ran meanwhile, before Snakemake plans.
    # The keyword alone makes a checkpoint (no rule setting does): the two blocks define the same rule.
    if _stage.name in _CHECKPOINTS:
        checkpoint:
            name: _rule["name"]
            input: _rule["input"]
            output: _rule["output"]
            log: _stage.log()
            benchmark: _stage.benchmark()
            params: **_rule["params"]
            threads: os.cpu_count() or 1
            conda: _ENV
            shell: _rule["shell"]
    else:
        rule:
            name: _rule["name"]
            input: _rule["input"]
            output: _rule["output"]
            log: _stage.log()
            benchmark: _stage.benchmark()
            params: **_rule["params"]
            # The stages form a chain and parallelise inside (workers params, torch threads): each asks for
            # every core, and Snakemake caps that at --cores (it also sets OMP_NUM_THREADS, else 1).
            threads: os.cpu_count() or 1
            conda: _ENV
            shell: _rule["shell"]
    if _listed:
        # The stage lists its own shards (names and what each is made from) into its parts folder; kept
        # after the run (a few kB), so that a later run knows the shards without listing them again.
        checkpoint:
            name: f"{_stage.name}_list"
            input: _stage.deps
            output: _stage.shard_list
            log: _stage.log(f"{_stage.name}_list")
            benchmark: _stage.benchmark(f"{_stage.name}_list")
            params: cmd=_stage.cmd, parts=_parts_folder, **_VALUES[_stage.name]
            threads: 1
            conda: _ENV
            shell: _logged("{params.cmd} --list --parts {params.parts}")
    if _sharded:
        # One job per shard: the stage's command on that shard alone, into its part folder (scratch that
        # neither git nor DVC tracks; temp: Snakemake deletes it once the gather has run).
        rule:
            name: f"{_stage.name}_shard"
            input: _stage.deps + _listed
            output: temp(directory(f"{_stage.parts}/{{shard}}"))
            log: _stage.log(f"{_stage.name}_shard/{{shard}}")
            benchmark: _stage.benchmark(f"{_stage.name}_shard/{{shard}}")
            params: cmd=_stage.cmd, parts=_parts_folder, **_VALUES[_stage.name]
            wildcard_constraints: shard=r"[A-Za-z0-9_.\-]+"
            threads: os.cpu_count() or 1
            conda: _ENV
            shell: _logged("{params.cmd} --shard {wildcards.shard} --parts {params.parts}")


def _commit(ran):
    # Record in dvc.lock what Snakemake brought up to date, so that `dvc status` agrees: the stages whose job
    # ran and finished here, and those a killed run finished without committing (the journal the stages
    # append to, see workflow/guard.py). Never a stage Snakemake merely found up to date: its outputs may
    # have changed behind both engines' backs, and committing them would hide that from `dvc status`.
    if _WORKSPACE is None:
        return
    names = {job.rule.name for job in ran} | _WORKSPACE.journal()
    in_dag = {job.rule.name for job in workflow.dag.jobs}
    error = _WORKSPACE.commit(sorted(s.address for s in _STAGES if s.name in names and s.name in in_dag))
    if error:
        _fail(f"dvc commit failed, so dvc.lock misses this run's stages (rerun the same command): {error}")


onsuccess:
    _commit([job for job in workflow.dag.jobs if workflow.dag.needrun(job) and workflow.dag.finished(job)])


onerror:
    # What did finish goes into dvc.lock too, so that `dvc repro` does not redo it.
    _commit([job for job in workflow.dag.jobs if workflow.dag.needrun(job) and workflow.dag.finished(job)])
