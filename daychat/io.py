"""File helpers shared by every stage: atomic writes, hashes, flat JSON metrics, free space.

Rule of the house: nothing half-written is ever left where a later stage would take it as done.
Files are written under a temporary name in the same folder and renamed into place (rename is atomic
on POSIX within one filesystem); folders are built under a temporary name and renamed as a whole.
A killed writer leaves its temporary behind (`.NAME.*.tmp`, `.NAME.*.old`): `clean_stale_temps` removes
them when the stage that owns NAME starts again (daychat.cli does it for every stage).

A full disk is said plainly: `ensure_space` refuses a large write before it starts, naming what needs how
much where, and `disk_full` recognises ENOSPC however a library wrapped it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _tmp_sibling(path: Path, suffix: str = ".tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with _naming(path):
            yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the output is an ordinary folder
    try:
        with _naming(path):
            yield tmp
        if path.exists():
            old = _tmp_sibling(path, ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A full disk while `path` is written says so with `path` (a failed write() names no file)."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _jsonable(value: Any) -> Any:
    # NaN/inf are not JSON; metrics readers (dvc, pandas) choke on them, so they become null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def write_metrics(path: str | os.PathLike, metrics: dict[str, Any]) -> None:
    """Flat metrics JSON (one level of scalars) so that `dvc metrics show` and `dvc exp show` list them."""
    for key, value in metrics.items():
        if isinstance(value, (dict, list, tuple)):
            raise ValueError(f"metric {key!r} is not a scalar; metrics files are flat")
    write_json(path, metrics)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put `src` at `dst` as a hard link (no copy, no extra space; `src` stays as it was), or as a copy
    where a link is impossible (another filesystem, fs.protected_hardlinks on files we do not own). An
    existing `dst` is an error, never overwritten."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        shutil.copyfile(src, dst)


# ----------------------------------------------------------------------------------------------------
# Stale temporaries and free space


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete what killed writers of `path` left beside it (`atomic_path` / `atomic_dir` temporaries and
    the `.old` copy of a replaced folder); returns what was deleted. Call it only while no other process
    writes `path` (the stage that owns it holds its lock, see daychat.cli)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    # `.NAME.<pid or mkdtemp's random letters>.tmp|old`: one dot-free part in between, so that the
    # temporaries of a sibling NAME.json are not taken for NAME's
    mine = re.compile(rf"\.{re.escape(path.name)}\.[^./]+\.(tmp|old)")
    removed = []
    for stale in sorted(p for p in path.parent.iterdir() if mine.fullmatch(p.name)):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes for an unprivileged writer on the filesystem that holds (or will hold) `path`."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# Slack on top of an estimate: filesystem blocks, metadata, a file the estimate does not count.
SPACE_MARGIN = 1.05
SPACE_SLACK = 1 << 20


def ensure_space(path: str | os.PathLike, need_bytes: float, what: str) -> None:
    """Refuse, in one line, to start writing ~`need_bytes` of `what` at `path` when its filesystem has less
    free: better now than a disk full halfway through (and a half-written file to clean up)."""
    from daychat.errors import UserError

    need = need_bytes * SPACE_MARGIN + SPACE_SLACK
    free = free_bytes(path)
    if need > free:
        raise UserError(f"disk full: {what} needs ~{human_bytes(need)} at {path} but only {human_bytes(free)} is free "
                        "there; free some space on that disk and rerun the same command")


# ENOSPC (no space left on device) and EDQUOT (disk quota exceeded) both mean: this write cannot fit.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded")


def disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind `exc`, if any: itself, what it was raised from, or (for libraries that
    re-raise with their own type, e.g. pyarrow's `OSError: ... No space left on device`) an error whose
    text says so. None when the disk was not full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (exc.errno in DISK_FULL_ERRNOS
                                         or any(t in str(exc).lower() for t in _DISK_FULL_TEXT)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_message(exc: OSError) -> str:
    """One line for a full disk: where, how much is left, and what to do."""
    where = exc.filename or ""
    free = ""
    if where:
        try:
            free = f" ({human_bytes(free_bytes(where))} free there now)"
        except OSError:
            pass
        where = f" while writing {where}"
    return f"disk full: no space left on the device{where}{free}; free some space and rerun the same command"
