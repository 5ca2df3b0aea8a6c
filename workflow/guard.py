"""What the Snakefile does at DAG build, before Snakemake plans, locks or deletes anything, so that the same
command recovers after a kill, a reboot or a power cut, and two runs never share a workspace.

1. One run per workspace, whichever engine runs it. The workspace lock is DVC's own repo lock,
   `.dvc/tmp/lock`: a `flock` (DVC takes it through zc.lockfile) that `dvc repro`, `dvc exp run`,
   `dvc status` and `dvc commit` all take, and that the kernel drops when its holder dies, so it is never
   stale. A Snakemake run holds it from DAG build to its end, so a `dvc repro` started meanwhile refuses at
   once, before it deletes anything; and a second `snakemake` refuses here. DVC lets go of that lock while
   a stage's command runs (dvc/stage/run.py, `unlocked_repo`) and records the command's pid in
   `.dvc/tmp/rwlock` instead: a live pid there is a DVC run too.
2. Stale Snakemake locks. Snakemake's own locks (`.snakemake/locks/N.{input,output}.lock`: lists of files,
   no pid; snakemake/persistence/file.py) outlive a kill -9 and stop the next run with LockException.
   Whoever holds the workspace lock is the only run here, so any Snakemake lock left is stale: it is
   removed, as `snakemake --unlock` would (which deletes that folder too, `_delete_locks`).
3. Half-made outputs. A killed job's outputs stay marked incomplete (`.snakemake/incomplete/`);
   profiles/default/config.yaml, which Snakemake loads on every run, says `rerun-incomplete: true`, so
   they are remade instead of stopping the run with IncompleteFilesException. Stages write atomically,
   so what exists is either whole or a stage's own scratch; daychat.cli deletes the scratch when the
   stage starts again.
4. What DVC did since. After `dvc repro` (say, to recover from a kill under Snakemake), Snakemake's own
   records still hold the old params and the incomplete marks of the killed job, so it would rerun
   stages DVC has just brought up to date. When DVC did anything since Snakemake last looked, or a killed
   job left incomplete marks, the stages `dvc status` finds up to date are adopted: `snakemake --touch
   --rerun-incomplete` on those stages alone records them as done (what the README used to ask people to
   type). Stages DVC finds out of date are left to run.
   What Snakemake finished but a kill kept from committing to dvc.lock (the stages note it in a journal,
   `.snakemake/daychat/finished`) is committed first, so DVC agrees too.
   Snakemake's benchmarks (`benchmark:`, benchmarks/<stage>.tsv) are outputs to it as well: a missing one
   reruns a stage named as a target (`snakemake pretrain`), and one older than its stage's outputs dates
   them back, rerunning what reads them. So, before Snakemake plans: a stage whose outputs exist but whose
   benchmark is missing, or older than its metrics file (the stage ran since, under DVC), gets a benchmark
   row of "NA" (not measured; Snakemake writes NA for what it could not measure), and after the adoption's
   touch the adopted stages' benchmarks are dated with it. A benchmark thus always describes the outputs
   that exist, or says it does not know.
5. params.yaml, all of it, is validated (daychat.params.validate_all, model shapes included) before any
   job runs: a bad value stops the run in one line naming the key, before Snakemake deletes outputs.
   The verdict is remembered for the same params.yaml and code, so a no-op rerun pays nothing.

A dry run (`snakemake -n`) does 2-5 when no other run is under way, then lets the lock go; while one is,
it says so and plans from what it sees. Jobs that Snakemake re-parses the Snakefile for (cluster
executors) and the adoption's own `--touch` skip all of it (NESTED).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

LOCK_FILE = ".dvc/tmp/lock"  # DVC's repo lock (dvc/repo/__init__.py: tmp_dir / "lock")
RWLOCK_FILE = ".dvc/tmp/rwlock"  # DVC's per-path locks of running stage commands (dvc/rwlock.py)
SNAKEMAKE_LOCKS = ".snakemake/locks"
INCOMPLETE = ".snakemake/incomplete"  # Snakemake's marks of outputs whose job has not finished
DVC_STATE = "dvc.state"  # in STATE: dvc_state() when Snakemake last committed or adopted
# In STATE: the stages that finished under Snakemake and are not in dvc.lock yet (daychat.cli appends to the
# file named by this variable, which the Snakefile sets for its jobs; the Snakefile's closing `dvc commit`
# empties it). A run killed before its commit leaves them there for the next run to commit.
JOURNAL = "finished"
JOURNAL_ENV = "DAYCHAT_JOURNAL"  # = daychat.cli.JOURNAL_ENV
STATE = ".snakemake/daychat"  # our notes beside Snakemake's records: what it last saw
NESTED = "DAYCHAT_SNAKEMAKE_NESTED"  # set for the adoption's own snakemake --touch
# Snakemake's benchmark columns (snakemake/benchmark.py, BenchmarkRecord.get_header): the NA row of a stage that ran
# without Snakemake measuring it has them all.
BENCHMARK_HEADER = ["s", "h:m:s", "max_rss", "max_vms", "max_uss", "max_pss", "io_in", "io_out", "mean_load", "cpu_time"]
# DVC tries its lock 7 times over 3 s before giving up (dvc/lock.py); the same patience here, so that two
# commands started together do not fail on each other's few-millisecond holds.
LOCK_TRIES, LOCK_DELAY = 7, 0.5


class GuardError(Exception):
    """One line for the person at the keyboard: why this run cannot start."""


class Guard:
    """The workspace lock of this Snakemake run (None: not held, e.g. a dry run)."""

    def __init__(self, root: Path, fd: int | None):
        self.root, self.fd = root, fd

    def release(self) -> None:
        """Let the workspace go (before the final `dvc commit`, which takes DVC's lock itself)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def journal(self) -> set[str]:
        """Stages that finished under Snakemake (this run or a killed one) and are not committed yet."""
        return set((_read_state(self.root, JOURNAL) or "").split())

    def commit(self, stages: list[str]) -> str | None:
        """`dvc commit` these stages (DVC addresses), empty the journal, remember DVC's state; the error
        text when DVC refused. Lets the workspace go first: the commit takes DVC's lock itself."""
        self.release()
        if stages:
            result = subprocess.run(["dvc", "commit", "--force", "--quiet", *stages], cwd=self.root,
                                    capture_output=True, text=True)
            if result.returncode != 0:
                return (result.stderr or result.stdout).strip()[-300:]
        (self.root / STATE / JOURNAL).unlink(missing_ok=True)
        self.record_dvc_lock()
        return None

    def record_dvc_lock(self) -> None:
        """Remember DVC's state as this run left it: a later change is DVC's doing (see `adopt`)."""
        _write_state(self.root, DVC_STATE, dvc_state(self.root))


def start(root: str | os.PathLike, *, dry_run: bool, snakefile: str, stages: list, per_shard: bool,
          say=print) -> Guard | None:
    """Steps 1-5 of the module docstring; raises GuardError when the run must not start. None: nothing to
    guard or commit (the adoption's own touch, a folder without DVC, a dry run while another run is on)."""
    root = Path(root)
    if os.environ.get(NESTED) or not (root / ".dvc").is_dir():
        return None
    try:
        guard = Guard(root, take_lock(root))
    except GuardError as busy:
        if not dry_run:
            raise
        say(f"[daychat] note: {busy}; this plan may change when that run ends")
        return None
    try:
        clear_stale_snakemake_locks(root, say)
        validate_params(root)
        commit_journal(guard, stages, say)
        settle_benchmarks(root, stages)
        adopt(guard, snakefile=snakefile, stages=stages, per_shard=per_shard, say=say)
    except BaseException:
        guard.release()
        raise
    if dry_run:  # plans only: leave the workspace to whoever runs next
        guard.release()
    else:
        os.environ[JOURNAL_ENV] = str((root / STATE / JOURNAL).resolve())  # for the jobs this run starts
    return guard


def take_lock(root: Path) -> int:
    """Hold DVC's repo lock (and check no DVC stage command is running), or raise GuardError naming who has it."""
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == LOCK_TRIES - 1:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                raise GuardError(f"another run is using this workspace: {describe(holder)}") from None
            time.sleep(LOCK_DELAY)
    running = dvc_commands_running(root)
    if running:
        os.close(fd)
        raise GuardError(f"another run is using this workspace: {running[0]}")
    # The same layout as zc.lockfile's (" <content>\n"), so that DVC reads it as it reads its own.
    content = f" {os.getpid()} {socket.gethostname()} snakemake {' '.join(sys.argv[1:])[:200]}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, content, 0)
    return fd


def describe(holder: str) -> str:
    """`pid host snakemake args` (ours) or ` pid` (DVC's) -> a phrase a person can act on."""
    words = holder.split()
    if not words or not words[0].isdigit():
        return "a process that left no pid in " + LOCK_FILE
    pid = int(words[0])
    host = words[1] if len(words) > 1 else socket.gethostname()
    what = " ".join(words[2:]) if len(words) > 2 else _cmdline(pid) or "dvc"
    where = "" if host == socket.gethostname() else f" on {host}"
    return f"{what[:120]} (pid {pid}{where}); wait for it to end or stop it, then rerun the same command"


def dvc_commands_running(root: Path) -> list[str]:
    """The DVC stage commands running here now: rwlock entries whose pid is alive (DVC drops dead ones itself)."""
    try:
        table = json.loads((root / RWLOCK_FILE).read_text())
    except (OSError, ValueError):
        return []
    infos = list((table.get("write") or {}).values())
    infos += [info for entries in (table.get("read") or {}).values() for info in entries]
    running = []
    for info in infos:
        pid = info.get("pid") if isinstance(info, dict) else None
        if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            running.append(f"{info.get('cmd', 'dvc')[:120]} (pid {pid}); wait for it to end or stop it, "
                           "then rerun the same command")
    return running


def clear_stale_snakemake_locks(root: Path, say=print) -> None:
    locks = root / SNAKEMAKE_LOCKS
    if locks.is_dir() and any(locks.iterdir()):
        shutil.rmtree(locks)
        say("[daychat] removed Snakemake's locks left by a run that did not end cleanly (killed?)")


def commit_journal(guard: Guard, stages: list, say=print) -> None:
    """Commit the stages a killed Snakemake run finished but could not commit (its closing `dvc commit`
    never ran, or was killed): they are whole, and the next run may have nothing left to run (a run with
    nothing to do ends before its onsuccess)."""
    names = guard.journal()
    if not names:
        return
    error = guard.commit([s.address for s in stages if s.name in names])
    guard.fd = take_lock(guard.root)
    if error:
        say(f"[daychat] note: dvc commit of what a killed run finished failed ({error})")
    else:
        say(f"[daychat] recorded in dvc.lock what a killed run finished: {', '.join(sorted(names))}")


def validate_params(root: Path) -> None:
    """daychat.params.validate_all in a subprocess (the checks import torch; Snakemake's process need not),
    skipped when params.yaml and the library are as they were at the last success."""
    key = hashlib.sha256(_read_bytes(root / "params.yaml"))
    library = root / "daychat"
    for path in sorted(library.rglob("*.py")):
        stat = path.stat()
        key.update(f"{path.relative_to(library)} {stat.st_mtime_ns} {stat.st_size}\n".encode())
    if _read_state(root, "params.ok") == key.hexdigest():
        return
    result = subprocess.run([sys.executable, "-c", _VALIDATE, "params.yaml"], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise GuardError(_last(result))
    _write_state(root, "params.ok", key.hexdigest())


_VALIDATE = """
import sys
from daychat.errors import UserError
from daychat.params import validate_all
try:
    validate_all(sys.argv[1])
except UserError as e:
    sys.exit(str(e))
"""


def dvc_state(root: Path) -> str:
    """What changes when DVC did something here: dvc.lock, and the mtime of its rwlock, which every DVC
    command that runs, checks or commits a stage rewrites (dvc repro of identical work leaves dvc.lock
    byte for byte as it was)."""
    rwlock = root / RWLOCK_FILE
    mtime = rwlock.stat().st_mtime_ns if rwlock.is_file() else 0
    return hashlib.sha256(_read_bytes(root / "dvc.lock") + f"\n{mtime}".encode()).hexdigest()


def adopt(guard: Guard, *, snakefile: str, stages: list, per_shard: bool, say=print) -> None:
    """Step 4: record as done, in Snakemake's own records, the stages `dvc status` finds up to date, when
    DVC did something since Snakemake last looked, or a killed Snakemake job left incomplete marks (DVC
    may have remade those outputs since). The guard holds the workspace lock again after."""
    root = guard.root
    marked = (root / INCOMPLETE).is_dir() and any(p.is_file() for p in (root / INCOMPLETE).rglob("*"))
    if not marked and _read_state(root, DVC_STATE) == dvc_state(root):
        return
    if not (root / "dvc.lock").is_file():  # DVC never ran a stage here: Snakemake's records are all there is
        _write_state(root, DVC_STATE, dvc_state(root))
        return
    # `dvc status` and the touch take DVC's lock and Snakemake's locks themselves: let go meanwhile.
    guard.release()
    try:
        _adopt(root, snakefile=snakefile, stages=stages, per_shard=per_shard, say=say)
    finally:
        guard.fd = take_lock(root)


def _adopt(root: Path, *, snakefile: str, stages: list, per_shard: bool, say) -> None:
    env = {**os.environ, NESTED: "1"}
    result = subprocess.run(["dvc", "status", "--json", "dvc.yaml"], cwd=root, capture_output=True, text=True, env=env)
    try:
        changed = set(json.loads(result.stdout or "{}")) if result.returncode == 0 else None
    except ValueError:
        changed = None
    if changed is None:
        say(f"[daychat] note: could not ask DVC which stages are up to date ({_last(result)}); Snakemake "
            "decides alone")
        return
    # A per-shard stage's gathering rule reads parts that are long gone: leave it to run (once).
    done = [s for s in stages if not s.on_demand and s.name not in changed and not (per_shard and s.shards)]
    if done:
        targets = [out for s in done for out in s.outputs]
        # --keep-incomplete: a touch that fails (say, an input dated in the future) must not delete outputs,
        # as Snakemake does to a failed job's; they stay marked incomplete, and the run remakes them.
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", snakefile, "--directory", str(root), "--touch",
               "--rerun-incomplete", "--keep-incomplete", "--cores", "1", "--quiet", "--config",
               f"per_shard={str(per_shard).lower()}", "--allowed-rules", *(s.name for s in done), "--", *targets]
        touched = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
        if touched.returncode != 0:
            say(f"[daychat] note: could not adopt what DVC ran ({_last(touched)}); Snakemake decides alone")
            return
        now = time.time()
        for stage in done:  # newer than the outputs the touch just dated (see settle_benchmarks)
            if (root / stage.benchmark()).is_file():
                os.utime(root / stage.benchmark(), (now, now))
        if "Nothing to be done" not in touched.stdout + touched.stderr:
            say(f"[daychat] up to date for DVC, so for Snakemake too: {', '.join(s.name for s in done)}")
    _write_state(root, DVC_STATE, dvc_state(root))  # after our own `dvc status`, which rewrote the rwlock


def settle_benchmarks(root: Path, stages: list) -> list[str]:
    """Give every stage whose outputs exist a benchmark that is not older than them (step 4): a row of NA where
    Snakemake did not measure the run that made them. Returns the stages given one."""
    from daychat.io import write_text

    settled = []
    for stage in stages:
        outputs = [root / out for out in stage.outputs]
        if not outputs or not all(out.exists() for out in outputs):
            continue  # never ran, or not whole: Snakemake runs it and writes the benchmark
        bench, metrics = root / stage.benchmark(), root / (stage.metrics or stage.outputs)[0]
        if bench.is_file() and bench.stat().st_mtime >= metrics.stat().st_mtime:
            continue
        write_text(bench, "\t".join(BENCHMARK_HEADER) + "\n" + "\t".join(["NA"] * len(BENCHMARK_HEADER)) + "\n")
        settled.append(stage.name)
    return settled


def _read_bytes(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def _read_state(root: Path, name: str) -> str | None:
    try:
        return (root / STATE / name).read_text().strip()
    except OSError:
        return None


def _write_state(root: Path, name: str, value: str) -> None:
    path = root / STATE / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _last(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else f"exit status {result.returncode}"
