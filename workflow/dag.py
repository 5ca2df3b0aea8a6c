"""dvc.yaml -> a list of stages both engines agree on.

DVC reads dvc.yaml itself; the Snakefile reads it through this module and makes one rule per stage:
deps become inputs, outs/metrics/plots become outputs (folders as `directory()`), the params.yaml
sections a stage declares become the rule's `params:` (so Snakemake's params trigger reruns exactly
the stages whose knobs changed), and the command is passed through `params` as well (a `shell:`
string built in a loop is evaluated late and would run the last stage's command for every rule).

Only the dvc.yaml features daychat uses are supported, and anything else is refused by name rather
than half-understood: plain `${section.key}` interpolation from params.yaml, string or single-key
mapping entries for deps/outs/metrics/plots, params from params.yaml. This module imports nothing but
PyYAML so that a no-op `snakemake all` stays fast.

On-demand stages (probe, plan) live in a second file, planning/dvc.yaml, with `wdir: ..` so that their
paths read like the pipeline's: plain `dvc repro` / `dvc exp run` reproduce the root dvc.yaml only, so
they never run unasked under DVC, and the Snakefile leaves them out of `all`. Snakemake names them like
any rule (`snakemake probe`); DVC addresses them as planning/dvc.yaml:probe (Stage.address).

Per-shard stages: `meta: {shards: data/filtered}` says a stage's work splits by the shards listed in
that folder's manifest.json (a dep another stage writes). DVC ignores `meta` and runs the plain command
(every shard in one process); with `--config per_shard=true` the Snakefile runs the stage as one job per
shard (`cmd --shard NAME --parts DIR`, each writing DIR/NAME/) and a gather job (`cmd --gather --parts
DIR`) that assembles the stage's outputs, byte-identical to the plain command's. A shard's NAME is its
file name in the manifest without the suffix (`shard_00003.parquet` -> `shard_00003`).

A stage with no upstream folder to split by (download: its shards come from its own params and source)
says `meta: {shards: self}`: it lists its own shards, and per-shard mode first runs `cmd --list --parts
DIR` (rule `<stage>_list`, a checkpoint) that writes DIR/shards.json, `{"shards": [{"name": ...}, ...]}`
in output order, then the shard jobs and the gather as above.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"cmd", "deps", "params", "outs", "metrics", "plots", "desc", "meta"}
PLANNING_FILE = "planning/dvc.yaml"  # the on-demand stages; each must say `wdir: ..`
META_KEYS = {"shards"}  # what workflow/dag.py understands under a stage's `meta:`
SELF = "self"  # `meta: {shards: self}`: the stage lists its own shards (`cmd --list --parts DIR`)
SHARD_LIST = "shards.json"  # what `--list` writes in the parts folder
PARTS_ROOT = ".cache/shards"  # per-shard parts, <root>/<stage>/<shard>/: scratch, neither git nor DVC tracks it
# Snakemake's per-job log (the job's stdout and stderr, tee'd) and benchmark (wall time, peak RSS...) of every rule,
# named by job: `pretrain`, `dedup_shard/shard_00003`, `download_list`. Neither git nor DVC tracks them (.gitignore,
# .dvcignore; not in dvc.yaml); a DVC run writes neither. The report stage reads the benchmarks (daychat/report.py).
LOGS, BENCHMARKS = "logs", "benchmarks"
# What `snakemake --report report.html` shows (the outputs marked with report() in the Snakefile): the report stage's
# plots and page, and every stage's metrics file. Captions: workflow/report/*.rst.
REPORT_PLOTS = ("reports/report", "plots.rst", "Plots")  # a folder of PNGs (daychat/report.py)
REPORT_PAGE = ("reports/report.md", "page.rst", "Report")  # the markdown page: tables, samples, provenance header
REPORT_METRICS = ("metrics.rst", "Metrics")  # each stage's flat metrics file, one subcategory per stage
_INTERP = re.compile(r"\$\{\s*([A-Za-z0-9_.\-]+)\s*\}")


class DagError(Exception):
    pass


@dataclass
class Stage:
    name: str
    cmd: str
    deps: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)  # keys in params.yaml: "tokenizer" or "tokenizer.vocab_size"
    outs: list[str] = field(default_factory=list)  # cached outputs (files or folders)
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    on_demand: bool = False  # declared in planning/dvc.yaml: outside `all` (probe, plan)
    shards: str | None = None  # meta.shards: a dep folder whose manifest.json lists the shards the work splits by, or SELF

    @property
    def outputs(self) -> list[str]:
        return self.outs + self.metrics + self.plots

    @property
    def address(self) -> str:
        """How DVC commands name the stage: `probe` would look in the root dvc.yaml only."""
        return f"{PLANNING_FILE}:{self.name}" if self.on_demand else self.name

    @property
    def parts(self) -> str:
        """Where the per-shard jobs of this stage write their parts (one folder per shard)."""
        return f"{PARTS_ROOT}/{self.name}"

    @property
    def lists_shards(self) -> bool:
        """`meta: {shards: self}`: the shard list comes from the stage's own `--list` job, not a dep's manifest."""
        return self.shards == SELF

    @property
    def shard_list(self) -> str:
        """The file the stage's `--list` job writes (only for a stage that lists its own shards)."""
        return f"{self.parts}/{SHARD_LIST}"

    def log(self, job: str | None = None) -> str:
        """The log of this stage's rule, or of one of its per-shard rules (`job`: `dedup_shard`...)."""
        return f"{LOGS}/{job or self.name}.log"

    def benchmark(self, job: str | None = None) -> str:
        return f"{BENCHMARKS}/{job or self.name}.tsv"

    @property
    def per_shard_rules(self) -> list[str]:
        """The rules per-shard mode adds for this stage, besides its own (which then gathers)."""
        return [f"{self.name}_list"] * self.lists_shards + [f"{self.name}_shard"] if self.shards else []


def load_stages(root: str | Path = ".") -> list[Stage]:
    """Parse `root/dvc.yaml` (and `root/planning/dvc.yaml` if present), resolving `${...}` against
    `root/params.yaml`."""
    root = Path(root)
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise DagError(f"{dvc_yaml} not found: run from a workspace (the project root or runs/<recipe>/)")
    params = _load_params(root / "params.yaml")
    stages = _parse(dvc_yaml, params, on_demand=False)
    if (root / PLANNING_FILE).is_file():
        stages += _parse(root / PLANNING_FILE, params, on_demand=True)
    names = [s.name for s in stages]
    for name in names:
        if names.count(name) > 1:
            raise DagError(f"stage {name} is declared twice (dvc.yaml and {PLANNING_FILE}): names are Snakemake rules")
        for suffix in ("_shard", "_list"):
            if f"{name}{suffix}" in names:
                raise DagError(f"stage {name}{suffix} clashes with the per-shard rule of stage {name}: rename it")
    produced = {out for s in stages for out in s.outputs}
    for s in stages:
        if s.shards not in (None, SELF) and (s.shards not in s.deps or s.shards not in produced):
            raise DagError(f"dvc.yaml: stage {s.name}: meta.shards {s.shards!r} must be one of its deps that another "
                           f"stage writes (a text dataset folder with a manifest.json), or {SELF!r} (the stage "
                           "lists its own shards with `--list`)")
    return stages


def producer(stages: list[Stage], path: str) -> Stage:
    """The stage that writes `path`."""
    return next(s for s in stages if path in s.outputs)


def shard_names(folder: str | Path) -> list[str]:
    """The shards listed in `folder/manifest.json`, by name (file name without suffix), in manifest order.

    The same naming as daychat.data.textshards.shard_name; read here with json so that workflow/ does not
    import the library.
    """
    path = Path(folder) / "manifest.json"
    try:
        names = [Path(entry["file"]).stem for entry in json.loads(path.read_text())["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DagError(f"{path}: cannot list its shards ({e}); rerun the stage that writes {folder}") from None
    return _checked_names(path, names)


def listed_shards(path: str | Path) -> list[str]:
    """The shard names in a shard list a stage's `--list` job wrote (`{"shards": [{"name": ...}, ...]}`)."""
    path = Path(path)
    try:
        names = [entry["name"] for entry in json.loads(path.read_text())["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DagError(f"{path}: cannot list its shards ({e}); rerun the stage's list job") from None
    return _checked_names(path, names)


def shard_names_of(root: str | Path, stage: Stage) -> list[str]:
    """The shards a per-shard stage runs as, in the workspace `root`: from its shards folder's manifest,
    or from the list its own `--list` job wrote."""
    if not stage.shards:
        raise DagError(f"stage {stage.name} has no meta.shards: it does not run per shard")
    root = Path(root)
    return listed_shards(root / stage.shard_list) if stage.lists_shards else shard_names(root / stage.shards)


def _checked_names(path: Path, names: list[Any]) -> list[str]:
    if len(set(names)) != len(names) or any(not isinstance(n, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", n)
                                            for n in names):
        raise DagError(f"{path}: shard names must be unique file names of letters, digits, '_', '.', '-'")
    if SHARD_LIST in names:  # the shard job's output PARTS/NAME would be the list itself
        raise DagError(f"{path}: a shard may not be named {SHARD_LIST}")
    return names


def _parse(path: Path, params: dict[str, Any], on_demand: bool) -> list[Stage]:
    spec = _yaml(path)
    where = PLANNING_FILE if on_demand else "dvc.yaml"
    unknown_top = set(spec) - {"stages"}
    if unknown_top:
        raise DagError(f"{where}: top-level {sorted(unknown_top)} not supported by workflow/dag.py")
    stages = []
    for name, body in (spec.get("stages") or {}).items():
        extra = set(body) - SUPPORTED_KEYS - ({"wdir"} if on_demand else set())
        if extra:
            raise DagError(f"{where}: stage {name}: keys {sorted(extra)} not supported by workflow/dag.py")
        if on_demand and body.get("wdir") != "..":
            raise DagError(f"{where}: stage {name} must say `wdir: ..` (its paths are relative to the project root)")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise DagError(f"{where}: stage name {name!r} must be a Python identifier (it is a Snakemake rule)")
        stages.append(Stage(
            name=name,
            cmd=_resolve(body["cmd"], params, f"{name}.cmd"),
            deps=[_resolve(p, params, f"{name}.deps") for p in _paths(body.get("deps"))],
            params=[_param_key(p, name) for p in body.get("params") or []],
            outs=[_resolve(p, params, f"{name}.outs") for p in _paths(body.get("outs"))],
            metrics=[_resolve(p, params, f"{name}.metrics") for p in _paths(body.get("metrics"))],
            plots=[_resolve(p, params, f"{name}.plots") for p in _paths(body.get("plots"))],
            on_demand=on_demand,
            shards=_meta(body.get("meta"), params, where, name),
        ))
    return stages


def _meta(meta: Any, params: dict[str, Any], where: str, stage: str) -> str | None:
    if meta is None:
        return None
    if not isinstance(meta, dict) or set(meta) - META_KEYS:
        extra = sorted(set(meta) - META_KEYS) if isinstance(meta, dict) else meta
        raise DagError(f"{where}: stage {stage}: meta {extra!r} not supported by workflow/dag.py "
                       f"(it knows {sorted(META_KEYS)})")
    return _resolve(meta["shards"], params, f"{stage}.meta") if "shards" in meta else None


def param_values(stage: Stage, params: dict[str, Any]) -> dict[str, Any]:
    """The values of a stage's declared params, keyed like Snakemake rule params (dots -> '__')."""
    return {key.replace(".", "__"): _lookup(params, key, f"{stage.name}.params") for key in stage.params}


def downstream(stages: list[Stage], name: str) -> set[str]:
    """`name` and every stage that reads, directly or not, what it writes: what an edit of its params reruns."""
    producer = {out: s.name for s in stages for out in s.outputs}
    readers: dict[str, set[str]] = {s.name: set() for s in stages}
    for s in stages:
        for dep in s.deps:
            if dep in producer:
                readers[producer[dep]].add(s.name)
    found, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(readers[current])
    return found


def load_params(root: str | Path = ".") -> dict[str, Any]:
    return _load_params(Path(root) / "params.yaml")


def is_folder(stage_output: str) -> bool:
    """DVC outputs are folders or files; a path with no suffix is a folder by daychat's convention."""
    return Path(stage_output).suffix == ""


def _load_params(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DagError(f"{path} not found")
    return _yaml(path)


def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise DagError(f"{path.name}:{where} is not valid YAML ({getattr(e, 'problem', None) or e})") from None


def _paths(entries: Any) -> list[str]:
    out = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict) and len(entry) == 1:
            out.append(next(iter(entry)))
        else:
            raise DagError(f"dvc.yaml: unsupported path entry {entry!r}")
    return out


def _param_key(entry: Any, stage: str) -> str:
    if not isinstance(entry, str):
        raise DagError(f"dvc.yaml: stage {stage}: params from files other than params.yaml are not supported ({entry!r})")
    return entry


def _lookup(params: dict[str, Any], dotted: str, where: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DagError(f"dvc.yaml: {where}: params.yaml has no key {dotted}")
        node = node[part]
    return node


def _resolve(text: str, params: dict[str, Any], where: str) -> str:
    return _INTERP.sub(lambda m: str(_lookup(params, m.group(1), where)), str(text))
