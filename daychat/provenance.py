"""Where a result came from: the code (git commit, dirty or not), the libraries, the hardware, the inputs.

Every model folder's meta.json and the report's header record these, so that any number traces back to
the exact code, params, data and machine that produced it (modded-nanogpt embeds the same in every log).

Nothing here runs at import, and nothing initialises CUDA unless asked: `hardware()` looks at the GPU
only through `torch.cuda`, only when torch is importable and a device is visible, and `nvidia-smi` for
the driver version (torch does not expose it). The project's git repository is found from this file's
real path, so a recipe workspace (runs/<recipe>/, whose daychat/ is a symlink) reports the code's commit,
not the workspace's own history.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from daychat.io import sha256_file

CODE_ROOT = Path(__file__).resolve().parents[1]

# The distributions whose version can change a number: the engines, the numerics, the data readers.
LIBRARIES = ("torch", "numpy", "tiktoken", "rustbpe", "snakemake", "dvc", "dvclive", "pyarrow", "pandas",
             "datasketch", "fasttext-numpy2", "matplotlib")


def _git(root: Path, *cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version(root: str | os.PathLike = CODE_ROOT) -> dict[str, Any]:
    """{"commit", "dirty", "describe"} of the git checkout at `root`; None values outside a git checkout.

    `dirty` ignores untracked files (a new scratch file does not change what ran) but counts every edit to
    a tracked one, staged or not."""
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None,
            "describe": _git(root, "describe", "--always", "--dirty") if commit else None}


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent), plus python and torch's CUDA/cuDNN build."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import torch

        versions["torch"] = torch.__version__  # the local tag (+cpu, +cu128) says which build
        versions["cuda"] = torch.version.cuda  # the CUDA the wheel was built for; None on a CPU build
        # cudnn.version() loads the library but creates no CUDA context
        versions["cudnn"] = str(torch.backends.cudnn.version()) if torch.version.cuda else None
    except ImportError:
        pass
    return versions


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return None


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def hardware(gpu: bool = True) -> dict[str, Any]:
    """CPU model, cores, RAM, OS; with `gpu`, each visible CUDA device's name and memory and the driver.

    Called from a function, never at import: `torch.cuda.get_device_properties` initialises CUDA."""
    info: dict[str, Any] = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "ram_gib": ram_gib(),
                            "platform": platform.platform(), "gpus": []}
    if gpu:
        try:
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    props = torch.cuda.get_device_properties(i)
                    info["gpus"].append({"name": props.name, "memory_gib": props.total_memory / 2 ** 30,
                                         "capability": f"{props.major}.{props.minor}"})
                info["gpu_driver"] = gpu_driver()
        except ImportError:
            pass
    return info


def hardware_line(hw: dict[str, Any]) -> str:
    """One line for a person: `NVIDIA GeForce RTX 4090 (24.0 GiB, driver 550.54); AMD ... (16 cores, 64 GiB RAM)`."""
    ram = f", {hw['ram_gib']:.0f} GiB RAM" if hw.get("ram_gib") else ""
    host = f"{hw.get('cpu')} ({hw.get('cpu_cores')} cores{ram})"
    gpus = hw.get("gpus") or []
    if not gpus:
        return f"{host}; no CUDA GPU"
    driver = f", driver {hw['gpu_driver']}" if hw.get("gpu_driver") else ""
    names = "; ".join(f"{g['name']} ({g['memory_gib']:.1f} GiB{driver})" for g in gpus)
    return f"{names}; {host}"


def sha256_path(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a folder as the sorted (relative path, file sha256) list of its files.

    A folder that describes itself (manifest.json or meta.json at its top, as every data and token folder
    here does: shard names, sizes and hashes) is hashed by that file alone, so hashing 20 GB of shards
    costs nothing."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path, chunk)
    for name in ("manifest.json", "meta.json"):
        if (path / name).is_file():
            return sha256_path(path / name)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(path).as_posix()}\0{sha256_path(file)}\n".encode())
    return h.hexdigest()


def input_hashes(paths: Iterable[str | os.PathLike]) -> dict[str, str | None]:
    """{path: sha256} of the inputs that exist (None for the ones that do not)."""
    return {str(p): sha256_path(p) if Path(p).exists() else None for p in paths}


def dvc_lock_hashes(lock: str | os.PathLike = "dvc.lock") -> dict[str, str]:
    """{output path: md5} of every stage's outputs as DVC recorded them in dvc.lock (what `dvc repro`
    checks against): the data each stage produced, without hashing anything again."""
    import yaml

    lock = Path(lock)
    if not lock.is_file():
        return {}
    spec = yaml.safe_load(lock.read_text()) or {}
    hashes = {}
    for body in (spec.get("stages") or {}).values():
        for out in body.get("outs") or []:
            if isinstance(out, dict) and out.get("path") and out.get("md5"):
                hashes[out["path"]] = out["md5"]
    return hashes


# What changes from one run of identical work to the next: wall time, speed, measured memory, a peak FLOP/s
# benchmarked on the CPU. Metrics files (reports/metrics/*.json) and the dvclive curves keep them; artifacts
# (model folders, eval details) must not, so that rerunning identical work gives identical bytes (and DVC
# and the stages downstream see no change where there is none).
RUN_NOISE = frozenset({"seconds", "wall_s", "train_seconds", "elapsed_s", "items_per_s", "examples_per_s",
                       "tok_per_s", "tokens_per_s", "mb_per_s", "docs_per_s", "mfu", "peak_mem_gib",
                       "peak_flops", "date"})


def reproducible(record: Any) -> Any:
    """`record` (JSON-able) without the RUN_NOISE keys at any depth: what an artifact may carry."""
    if isinstance(record, dict):
        return {key: reproducible(value) for key, value in record.items() if key not in RUN_NOISE}
    if isinstance(record, (list, tuple)):
        return [reproducible(value) for value in record]
    return record


def params_digest(params: Any) -> str:
    """A short, stable digest of a params mapping (key order and YAML formatting do not matter)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def provenance(inputs: Iterable[str | os.PathLike] = (), params: Any = None, gpu: bool = True) -> dict[str, Any]:
    """Everything above in one JSON-able mapping, stamped with the time (UTC)."""
    record = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "code": code_version(), "libraries": library_versions(), "hardware": hardware(gpu)}
    if params is not None:
        record["params_digest"] = params_digest(params)
    if inputs:
        record["inputs"] = input_hashes(inputs)
    return record
