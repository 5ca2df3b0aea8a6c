# Generic: every rule comes from dvc.yaml (see workflow/dag.py), so the two engines run one DAG.
#   snakemake --cores 8 all                      the recipe in params.yaml, here
#   snakemake --cores 2 -d runs/demo all         a recipe's own workspace (see workflow/workspace.py)
import importlib.util
import os
import subprocess
import sys

from snakemake.exceptions import WorkflowError

_spec = importlib.util.spec_from_file_location("daychat_dag", os.path.join(workflow.basedir, "workflow", "dag.py"))
_dag = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dag)

try:
    _STAGES = _dag.load_stages(".")
    _PARAMS = _dag.load_params(".")
except _dag.DagError as e:
    raise WorkflowError(str(e))


def _output(path):
    return directory(path) if _dag.is_folder(path) else path


rule all:
    input: [out for s in _STAGES if not s.on_demand for out in s.outputs]
    default_target: True


for _stage in _STAGES:
    rule:
        name: _stage.name
        input: _stage.deps
        output: [_output(p) for p in _stage.outputs]
        # The command travels in params (a shell string built in this loop would be formatted late, with
        # the last stage's values); the declared params.yaml sections ride along so that editing one
        # reruns this stage and what is downstream of it.
        params: cmd=_stage.cmd, **_dag.param_values(_stage, _PARAMS)
        # The stages form a chain and parallelise inside (workers params, torch threads): each asks for
        # every core, and Snakemake caps that at --cores (it also sets OMP_NUM_THREADS, else 1).
        threads: os.cpu_count() or 1
        shell: "{params.cmd}"


onsuccess:
    # Record what Snakemake just brought up to date in dvc.lock, so `dvc status` agrees. Only the stages
    # of this run's DAG: committing a stage that was not checked could bless stale outputs.
    ran = {job.rule.name for job in workflow.dag.jobs}
    done = sorted(s.address for s in _STAGES if s.name in ran)
    if done:
        subprocess.run(["dvc", "commit", "--force", "--quiet", *done], check=True)
