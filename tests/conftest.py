import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _tools_on_path():
    """Stages are run as `python stages/<name>.py` and the Snakefile calls `dvc`: both must be this venv's."""
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds barrier waits (10x slower on a busy 2-core box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data() -> Path:
    """Real offline data (../shared/data); present on dev and CI machines."""
    path = SHARED / "data"
    assert path.is_dir(), f"{path} is missing: tests need ../shared beside the project"
    return path


def run_stage(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python stages/<name>.py ARGS` as the engines do (cwd = a workspace)."""
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *args], cwd=cwd,
                          capture_output=True, text=True)
