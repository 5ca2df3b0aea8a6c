"""One DAG, two engines: the Snakemake rules made from dvc.yaml agree with DVC's own reading of it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

from workflow import dag, workspace

ROOT = Path(__file__).resolve().parents[1]


def snakemake_rules(workdir: Path, *config: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "snakemake_rules.py"), str(ROOT / "Snakefile"), str(workdir),
                          *config], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def dvc_stages(workdir: Path) -> dict:
    with Repo(str(workdir)) as repo:
        stages = {}
        for stage in repo.index.stages:
            params = [key for d in stage.deps if isinstance(d, ParamsDependency) for key in d.params]
            stages[stage.name] = {
                "cmd": stage.cmd,
                "deps": [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)],
                "outs": [o.def_path for o in stage.outs],
                "params": params,
            }
        return stages


@pytest.fixture(scope="module")
def ci_workspace(tmp_path_factory) -> Path:
    return workspace.sync("ci", tmp_path_factory.mktemp("ws") / "ci")


@pytest.mark.parametrize("where", ["root", "workspace"])
def test_snakemake_rules_agree_with_dvc_index(where, ci_workspace):
    workdir = ROOT if where == "root" else ci_workspace
    rules, stages = snakemake_rules(workdir), dvc_stages(workdir)
    assert set(rules) - {"all"} == set(stages)
    params = dag.load_params(workdir)
    for name, stage in stages.items():
        rule = rules[name]
        assert rule["params"]["cmd"] == stage["cmd"] and rule["shell"] == "{params.cmd}"
        assert rule["input"] == stage["deps"]
        assert sorted(rule["output"]) == sorted(stage["outs"])  # outs + metrics + plots on both sides
        # declared params ride along as rule params with their current values
        assert {k: v for k, v in rule["params"].items() if k != "cmd"} == {
            key.replace(".", "__"): dag._lookup(params, key, name) for key in stage["params"]}
    on_demand = {s.name for s in dag.load_stages(workdir) if s.on_demand}
    assert sorted(rules["all"]["input"]) == sorted(o for n, s in stages.items() if n not in on_demand for o in s["outs"])
    assert not any(rule["checkpoint"] for rule in rules.values())  # per-shard mode is opt-in


def test_per_shard_mode_adds_a_shard_rule_and_a_checkpoint():
    rules = snakemake_rules(ROOT, "per_shard=true")
    stages = {s.name: s for s in dag.load_stages(ROOT)}
    sharded = [s for s in stages.values() if s.shards]
    assert [s.name for s in sharded] == ["pretokenize"] and stages["pretokenize"].shards == "data/filtered"
    assert set(rules) - {"all"} == set(stages) | {"pretokenize_shard"}
    assert [n for n, r in rules.items() if r["checkpoint"]] == ["quality"]  # writes data/filtered
    shard, gather = rules["pretokenize_shard"], rules["pretokenize"]
    cmd = stages["pretokenize"].cmd
    assert shard["params"]["cmd"] == gather["params"]["cmd"] == cmd  # the stage's command, plus flags
    assert shard["shell"] == "{params.cmd} --shard {wildcards.shard} --parts {params.parts}"
    assert shard["params"]["parts"] == ".cache/shards/pretokenize"
    assert gather["shell"] == "{params.cmd} --gather --parts .cache/shards/pretokenize"
    assert shard["input"] == gather["input"][:-1] == stages["pretokenize"].deps  # [-1]: the parts, via the checkpoint
    assert shard["output"] == [".cache/shards/pretokenize/{shard,[A-Za-z0-9_.\\-]+}"]
    assert shard["params"]["pretokenize"] == gather["params"]["pretokenize"]  # a params edit reruns the shards
    assert sorted(gather["output"]) == sorted(stages["pretokenize"].outputs)


def test_meta_shards_is_checked(tmp_path):
    (tmp_path / "params.yaml").write_text("a: {n: 1}\n")
    head = "stages:\n  w:\n    cmd: echo\n    outs: [d]\n  s:\n    cmd: echo\n    deps: [d, e]\n"
    (tmp_path / "dvc.yaml").write_text(head + "    meta: {shards: d}\n")
    assert [s.shards for s in dag.load_stages(tmp_path)] == [None, "d"]
    for meta, error in (("{shards: e}", "must be one of its deps that another stage writes"),
                        ("{shards: x}", "must be one of its deps"),
                        ("{on_demand: true}", r"meta \['on_demand'\] not supported")):
        (tmp_path / "dvc.yaml").write_text(head + f"    meta: {meta}\n")
        with pytest.raises(dag.DagError, match=error):
            dag.load_stages(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d/manifest.json").write_text(json.dumps({"shards": [{"file": "shard_00000.parquet"}, {"file": "b.parquet"}]}))
    assert dag.shard_names(tmp_path / "d") == ["shard_00000", "b"]
    (tmp_path / "d/manifest.json").write_text(json.dumps({"shards": [{"file": "a.parquet"}, {"file": "a.jsonl"}]}))
    with pytest.raises(dag.DagError, match="must be unique"):
        dag.shard_names(tmp_path / "d")


def test_dvc_yaml_conventions():
    for stage in dag.load_stages(ROOT):
        script = f"stages/{stage.name}.py"
        assert script in stage.deps and stage.cmd.startswith(f"python {script} "), stage.name
        assert len(stage.metrics) == 1 and stage.metrics[0].startswith("reports/metrics/"), stage.name
        produced = {o for s in dag.load_stages(ROOT) for o in s.outputs}
        for dep in stage.deps:
            if dep not in produced:  # code: a file (Snakemake sees a folder's mtime, not its content)
                assert (ROOT / dep).is_file(), f"{stage.name}: dep {dep} is not an existing file"
        assert set(stage.params) <= set(yaml.safe_load((ROOT / "params.yaml").read_text())), stage.name


def test_workspace_is_a_faithful_copy(ci_workspace):
    assert (ci_workspace / "dvc.yaml").read_bytes() == (ROOT / "dvc.yaml").read_bytes()
    assert (ci_workspace / dag.PLANNING_FILE).read_bytes() == (ROOT / dag.PLANNING_FILE).read_bytes()
    assert (ci_workspace / "params.yaml").read_bytes() == (ROOT / "workflow/recipes/ci.yaml").read_bytes()
    for name in workspace.CODE_LINKS:
        assert (ci_workspace / name).resolve() == ROOT / name
    before = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ci_workspace, capture_output=True, text=True).stdout
    workspace.sync("ci", ci_workspace)  # idempotent: nothing changed, no new commit
    after = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ci_workspace, capture_output=True, text=True).stdout
    assert before == after


def test_unsupported_dvc_yaml_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text("a: {n: 1}\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo ${a.m}\n")
    with pytest.raises(dag.DagError, match=r"params.yaml has no key a.m"):
        dag.load_stages(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    foreach: [1, 2]\n    do: {cmd: echo}\n")
    with pytest.raises(dag.DagError, match="not supported"):
        dag.load_stages(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo\n")
    (tmp_path / "planning").mkdir()
    (tmp_path / dag.PLANNING_FILE).write_text("stages:\n  p:\n    cmd: echo\n")
    with pytest.raises(dag.DagError, match="wdir"):
        dag.load_stages(tmp_path)
    (tmp_path / dag.PLANNING_FILE).write_text("stages:\n  s:\n    wdir: ..\n    cmd: echo\n")
    with pytest.raises(dag.DagError, match="declared twice"):
        dag.load_stages(tmp_path)


def test_planning_stages_are_on_demand_and_addressed_by_file():
    stages = {s.name: s for s in dag.load_stages(ROOT)}
    assert stages["probe"].on_demand and stages["plan"].on_demand and not stages["pretrain"].on_demand
    assert stages["probe"].address == "planning/dvc.yaml:probe" and stages["pretrain"].address == "pretrain"
    root_only = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "probe" not in root_only and "plan" not in root_only  # plain `dvc repro` never runs them
