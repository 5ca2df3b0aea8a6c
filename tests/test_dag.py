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


def logged(command: str) -> str:
    """A rule's shell: the command, its output tee'd to the job's log (the Snakefile's _logged)."""
    return f"export PYTHONUNBUFFERED=1; ( {command} ) 2>&1 | tee {{log}}"


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
        assert rule["params"]["cmd"] == stage["cmd"] and rule["shell"] == logged("{params.cmd}")
        # Snakemake's conventions: a log and a benchmark per job, outside DVC's outputs; one software environment
        assert rule["log"] == [f"logs/{name}.log"] and rule["benchmark"] == f"benchmarks/{name}.tsv"
        assert not {"logs", "benchmarks"} & {Path(p).parts[0] for p in stage["outs"] + stage["deps"]}
        assert rule["conda"] == "workflow/envs/daychat.yaml"
        assert rule["input"] == stage["deps"]
        assert sorted(rule["output"]) == sorted(stage["outs"])  # outs + metrics + plots on both sides
        # declared params ride along as rule params with their current values
        assert {k: v for k, v in rule["params"].items() if k != "cmd"} == {
            key.replace(".", "__"): dag._lookup(params, key, name) for key in stage["params"]}
    on_demand = {s.name for s in dag.load_stages(workdir) if s.on_demand}
    assert sorted(rules["all"]["input"]) == sorted(o for n, s in stages.items() if n not in on_demand for o in s["outs"])
    assert not any(rule["checkpoint"] for rule in rules.values())  # per-shard mode is opt-in
    # what `snakemake --report` shows: the report stage's plots and page, and every stage's metrics file
    metrics = [m for s in dag.load_stages(workdir) for m in s.metrics]
    assert sorted(f for rule in rules.values() for f in rule["report"]) == sorted(
        ["reports/report", "reports/report.md", *metrics])


def test_per_shard_mode_adds_a_shard_rule_and_a_checkpoint():
    rules = snakemake_rules(ROOT, "per_shard=true")
    stages = {s.name: s for s in dag.load_stages(ROOT)}
    sharded = [s for s in stages.values() if s.shards]
    assert {"dedup": "data/raw", "quality": "data/dedup", "pretokenize": "data/filtered"}.items() <= \
        {s.name: s.shards for s in sharded}.items()
    assert set(rules) - {"all"} == set(stages) | {rule for s in sharded for rule in s.per_shard_rules}
    # the stages that write a shards folder (download: data/raw, dedup: data/dedup, quality: data/filtered),
    # and the list job of a stage that lists its own shards (download)
    assert {n for n, r in rules.items() if r["checkpoint"]} == \
        {dag.producer(list(stages.values()), s.shards).name for s in sharded if not s.lists_shards} | \
        {f"{s.name}_list" for s in sharded if s.lists_shards} >= {"download", "dedup", "quality", "download_list"}
    for stage in sharded:
        shard, gather = rules[f"{stage.name}_shard"], rules[stage.name]
        assert shard["params"]["cmd"] == gather["params"]["cmd"] == stage.cmd  # the stage's command, plus flags
        assert shard["shell"] == logged("{params.cmd} --shard {wildcards.shard} --parts {params.parts}")
        assert shard["params"]["parts"] == "<function>"  # the folder of the job's output: .cache/shards/<stage>
        assert gather["shell"] == logged(f"{{params.cmd}} --gather --parts .cache/shards/{stage.name}")
        assert shard["log"] == [f"logs/{stage.name}_shard/{{shard,[A-Za-z0-9_.\\-]+}}.log"]
        assert shard["benchmark"] == f"benchmarks/{stage.name}_shard/{{shard,[A-Za-z0-9_.\\-]+}}.tsv"
        # [-1]: the parts, via the checkpoint; a stage that lists its own shards also reads its list
        assert shard["input"] == gather["input"][:-1] == stage.deps + [stage.shard_list] * stage.lists_shards
        assert shard["output"] == [f".cache/shards/{stage.name}/{{shard,[A-Za-z0-9_.\\-]+}}"]
        assert shard["params"][stage.name] == gather["params"][stage.name]  # a params edit reruns the shards
        assert sorted(gather["output"]) == sorted(stage.outputs)


def test_a_stage_that_lists_its_own_shards_gets_a_list_checkpoint():
    rules = snakemake_rules(ROOT, "per_shard=true")
    stage = next(s for s in dag.load_stages(ROOT) if s.name == "download")
    assert stage.shards == dag.SELF and stage.lists_shards and stage.per_shard_rules == ["download_list", "download_shard"]
    listing = rules["download_list"]
    assert listing["checkpoint"] and listing["input"] == stage.deps  # no network, no upstream data: params and code
    assert listing["output"] == [".cache/shards/download/shards.json"] == [stage.shard_list]
    assert listing["shell"] == logged("{params.cmd} --list --parts {params.parts}")
    assert listing["params"]["cmd"] == stage.cmd and listing["params"]["parts"] == "<function>"
    assert listing["params"]["download"] == rules["download_shard"]["params"]["download"]  # a params edit relists
    assert rules["download"]["shell"] == logged("{params.cmd} --gather --parts .cache/shards/download")
    assert listing["log"] == ["logs/download_list.log"] and listing["benchmark"] == "benchmarks/download_list.tsv"
    # per_shard off: none of it (test_snakemake_rules_agree_with_dvc_index checks the rules are the plain ones)
    assert not {"download_list", "download_shard"} & set(snakemake_rules(ROOT))


def test_shard_names_of_reads_the_manifest_or_the_stages_own_list(tmp_path):
    (tmp_path / "params.yaml").write_text("a: {n: 1}\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  w:\n    cmd: echo\n    outs: [d]\n    meta: {shards: self}\n"
                                       "  s:\n    cmd: echo\n    deps: [d]\n    meta: {shards: d}\n")
    w, s = dag.load_stages(tmp_path)
    assert (w.shards, w.lists_shards, s.lists_shards) == ("self", True, False)
    with pytest.raises(dag.DagError, match=r"shards.json: cannot list its shards .*rerun the stage's list job"):
        dag.shard_names_of(tmp_path, w)
    (tmp_path / ".cache/shards/w").mkdir(parents=True)
    (tmp_path / ".cache/shards/w/shards.json").write_text(json.dumps({"shards": [{"name": "shard_00000"}, {"name": "x"}]}))
    (tmp_path / "d").mkdir()
    (tmp_path / "d/manifest.json").write_text(json.dumps({"shards": [{"file": "shard_00007.parquet"}]}))
    assert dag.shard_names_of(tmp_path, w) == ["shard_00000", "x"] and dag.shard_names_of(tmp_path, s) == ["shard_00007"]
    for names, error in ((["a", "a"], "must be unique"), (["a/b"], "must be unique"), (["shards.json"], "may not be named")):
        (tmp_path / ".cache/shards/w/shards.json").write_text(json.dumps({"shards": [{"name": n} for n in names]}))
        with pytest.raises(dag.DagError, match=error):
            dag.shard_names_of(tmp_path, w)


def test_meta_shards_is_checked(tmp_path):
    (tmp_path / "params.yaml").write_text("a: {n: 1}\n")
    head = "stages:\n  w:\n    cmd: echo\n    outs: [d]\n  s:\n    cmd: echo\n    deps: [d, e]\n"
    (tmp_path / "dvc.yaml").write_text(head + "    meta: {shards: d}\n")
    assert [s.shards for s in dag.load_stages(tmp_path)] == [None, "d"]
    for meta, error in (("{shards: e}", "must be one of its deps that another stage writes"),
                        ("{shards: Self}", r"meta.shards 'Self' must be one of its deps .*or 'self'"),
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
    # the recipe, its first line naming the schema from the workspace (through its `workflow` link)
    first, rest = (ci_workspace / "params.yaml").read_text().split("\n", 1)
    assert rest == (ROOT / "workflow/recipes/ci.yaml").read_text().split("\n", 1)[1]
    schema = ci_workspace / first.removeprefix("# yaml-language-server: $schema=")
    assert schema.resolve() == (ROOT / "workflow/schemas/params.schema.json").resolve()
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


@pytest.mark.parametrize("per_shard", ["false", "true"])
def test_snakemake_lint_is_clean(per_shard, ci_workspace):
    # Snakemake's own conventions (a log and a software environment per rule, no hard-coded output prefixes...),
    # as a person runs it from a workspace; exit status 1 and a list of lints otherwise
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--config", f"per_shard={per_shard}"],
                            cwd=ci_workspace, capture_output=True, text=True, env=workspace.tool_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr
