"""Kill it anywhere, rerun the same command: the pieces, one at a time (the whole, end to end, is in
test_pipeline.py and `make faults`). Stage locks and stale temporaries (daychat.cli), disk-full messages
(daychat.io, the checkpoints), the whole params.yaml checked at once (daychat.params), the workspace lock
both engines honour (workflow/guard.py), and artifacts without timings."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import daychat.io
import daychat.train.checkpoint
from daychat.errors import UserError
from daychat.io import clean_stale_temps, disk_full, ensure_space, write_text
from daychat.params import ParamsError, validate_all
from daychat.provenance import reproducible
from daychat.train.checkpoint import Checkpointer, save_file
from workflow import guard

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# A toy stage in a toy workspace: a dvc.yaml naming its outputs, a params.yaml, the stage's own script.

TOY = """
import os, sys, time
from pathlib import Path
from daychat.cli import run
from daychat.io import atomic_dir

def main():
    mode = sys.argv[1]
    if mode == "wait":  # hold the stage until told to finish
        while not Path("go").exists():
            time.sleep(0.05)
    if mode == "enospc":  # a library deep down hits a full disk and wraps it, as torch and pyarrow do
        try:
            raise OSError(28, "No space left on device", "data/out/part.bin")
        except OSError as e:
            raise RuntimeError("write failed") from e
    with atomic_dir("data/out") as tmp:
        (tmp / "x").write_text("done")

run(main, "toy")
"""


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("DAYCHAT_STAGE_LOCK", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages:\n  toy:\n    cmd: python toy.py\n    outs:\n      - data/out\n"
                                       "    metrics:\n      - reports/toy.json:\n          cache: false\n")
    (tmp_path / "params.yaml").write_text("tokenizer:\n  vocab_size: 512\n")
    (tmp_path / "toy.py").write_text(TOY)
    return tmp_path


def start(ws: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DAYCHAT_STAGE_LOCK", None)
    return subprocess.Popen([sys.executable, "toy.py", mode], cwd=ws, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_lock(ws: Path) -> None:
    deadline = time.time() + 60
    while not (ws / ".cache/locks/toy.lock").is_file() or not (ws / ".cache/locks/toy.lock").read_text():
        assert time.time() < deadline
        time.sleep(0.05)


def test_a_stage_cleans_what_a_killed_run_left_and_refuses_a_second_copy(toy):
    (toy / "data/.out.k1ll3d.tmp").mkdir(parents=True)
    (toy / "data/.out.k1ll3d.tmp/half").write_text("x")
    (toy / "data/.out.4242.old").mkdir()
    (toy / "reports").mkdir()
    (toy / "reports/.toy.json.4242.tmp").write_text("{")
    (toy / "data/.other.k1ll3d.tmp").mkdir()  # another output's: not this stage's to delete
    first = start(toy, "wait")
    wait_for_lock(toy)
    second = start(toy, "plain")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2
    assert err.startswith("error: [toy] toy is already running in this workspace (pid ") and len(err.splitlines()) == 1
    (toy / "go").write_text("")
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert "deleted what a killed run left" in out
    assert sorted(p.name for p in (toy / "data").iterdir()) == [".other.k1ll3d.tmp", "out"]
    assert not (toy / "reports/.toy.json.4242.tmp").exists()


def test_a_killed_stage_never_leaves_its_lock_behind(toy):
    first = start(toy, "wait")
    wait_for_lock(toy)
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = start(toy, "plain")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err


def test_a_full_disk_anywhere_is_one_line(toy):
    proc = start(toy, "enospc")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.startswith("error: [toy] disk full: no space left on the device while writing data/out/part.bin")
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_every_stage_checks_the_whole_params_file(toy):
    (toy / "params.yaml").write_text("tokenizer:\n  vocab_size: 512\nsft:\n  warmup_stepz: 3\n")
    proc = start(toy, "plain")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == "error: [toy] params.yaml: sft.warmup_stepz is not a known key (did you mean warmup_steps?)"
    assert not (toy / "data/out").exists()


# ----------------------------------------------------------------------------------------------------
# Library pieces


def test_clean_stale_temps_takes_only_the_outputs_own(tmp_path):
    out = tmp_path / "tokens"
    for name in (".tokens.abc.tmp", ".tokens.12.old", ".tokens2.abc.tmp", ".tokensx.tmp", "tokens"):
        (tmp_path / name).mkdir()
    (tmp_path / ".tokens.json.1.tmp").write_text("{")  # a sibling output's temporary (tokens.json)
    removed = {p.name for p in clean_stale_temps(out)}
    assert removed == {".tokens.abc.tmp", ".tokens.12.old"}
    assert {p.name for p in tmp_path.iterdir()} == {".tokens2.abc.tmp", ".tokensx.tmp", "tokens", ".tokens.json.1.tmp"}


def test_ensure_space_says_how_much_is_needed_where(tmp_path, monkeypatch):
    monkeypatch.setattr(daychat.io, "free_bytes", lambda path: 3 << 20)
    ensure_space(tmp_path, 1 << 20, "the shards")
    with pytest.raises(UserError) as e:
        ensure_space(tmp_path / "data/tokens", 5 << 30, "the token shards")
    assert str(e.value) == (f"disk full: the token shards needs ~5.3 GiB at {tmp_path / 'data/tokens'} but only "
                            "3.0 MiB is free there; free some space on that disk and rerun the same command")


def test_disk_full_is_found_behind_the_wrappers():
    def raised(exc):
        try:
            raise exc
        except BaseException as e:
            return e

    inner = OSError(errno.ENOSPC, "No space left on device", "x")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from e
    except RuntimeError as outer:
        assert disk_full(outer) is inner
    assert disk_full(raised(OSError("[errno 28] Error writing bytes to file. Detail: No space left on device")))
    assert disk_full(raised(OSError(errno.EDQUOT, "Disk quota exceeded")))
    assert disk_full(raised(OSError(errno.EACCES, "Permission denied"))) is None
    assert disk_full(raised(ValueError("no space left on device"))) is None  # only OS errors


def test_atomic_writes_name_the_file_a_full_disk_stopped(tmp_path, monkeypatch):
    real_write = Path.write_text

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write(): no file name

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as e:
        write_text(tmp_path / "m.json", "{}")
    monkeypatch.setattr(Path, "write_text", real_write)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []  # and the temporary is gone


def test_checkpoints_check_space_first_and_call_torchs_error_a_full_disk(tmp_path, monkeypatch):
    state = {"model": {"w": torch.zeros(1000)}}
    monkeypatch.setattr(daychat.io, "free_bytes", lambda path: 1000)
    with pytest.raises(UserError, match=r"^disk full: checkpoint step_000003.pt needs ~1\.0 MiB at "):
        Checkpointer(tmp_path / "run").save(3, state)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())

    def torch_full(obj, path):  # what torch.save raises on ENOSPC, from its zip writer
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 248")

    monkeypatch.setattr(torch, "save", torch_full)
    monkeypatch.setattr(daychat.train.checkpoint, "free_bytes", lambda path: 1000)
    with pytest.raises(OSError) as e:
        save_file(state, tmp_path / "model.pt")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "model.pt")
    monkeypatch.setattr(daychat.train.checkpoint, "free_bytes", lambda path: 1 << 30)  # room: torch's error stays
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_file(state, tmp_path / "model.pt")


def test_a_killed_save_is_deleted_when_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    Checkpointer(run).save(10, {"w": torch.ones(2)})
    (run / ".step_000020.pt.4242.tmp").write_bytes(b"half a checkpoint")
    ck = Checkpointer(run)
    assert [p.name for p in run.iterdir()] == ["step_000010.pt"]
    assert ck.load()["step"] == 10


def test_a_shard_damaged_after_it_was_written_is_named(tmp_path):
    from daychat.data.textshards import ShardWriter, verify_shards, write_manifest

    infos = []
    for i, split in enumerate(("train", "val")):
        writer = ShardWriter(tmp_path / f"shard_{i:05d}.parquet", split)
        for j in range(50):
            writer.write(f"d{i}-{j}", "some text to compress " * 20, "test")
        infos.append(writer.close())
    write_manifest(tmp_path, infos)
    verify_shards(tmp_path)
    data = bytearray((tmp_path / "shard_00000.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, as a failing disk leaves it
    (tmp_path / "shard_00000.parquet").write_bytes(bytes(data))
    verify_shards(tmp_path, "shard_00001")  # a job that reads another shard is not stopped
    with pytest.raises(UserError, match=r"shard_00000\.parquet does not match the sha256 in .*manifest\.json: it was "
                                        r"damaged or replaced after it was written; restore it \(dvc checkout"):
        verify_shards(tmp_path)


def test_validate_all_names_the_key_of_a_model_that_cannot_be_built(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  depth: 2\n  aspect_ratio: 32\n  head_dim: 32\n  n_kv_head: 3\n")
    with pytest.raises(ParamsError) as e:
        validate_all(params)
    assert e.value.key == "pretrain.n_kv_head"
    assert str(e.value) == ("params.yaml: pretrain.n_kv_head does not make a valid model: n_head (2 = model_dim 64 "
                            "/ head_dim 32) must be a multiple of n_kv_head (3)")
    params.write_text("pretrain:\n  head_dim: 31\n")
    with pytest.raises(ParamsError, match=r"pretrain\.head_dim does not make a valid model: head_dim must be even"):
        validate_all(params)
    params.write_text("tokenizer:\n  vocab_size: 512\npretrian:\n  depth: 2\n")
    with pytest.raises(ParamsError, match=r"pretrian is not a known section \(did you mean pretrain\?\)"):
        validate_all(params)


def test_artifacts_carry_no_timings():
    record = {"params": {"seconds_per_step": 1}, "metrics": {"val_bpb": 1.5, "wall_s": 3.0, "tok_per_s": 9.0},
              "hardware": {"cpu": "x", "peak_flops": 1e12}, "tasks": [{"n": 4, "seconds": 0.3}]}
    assert reproducible(record) == {"params": {"seconds_per_step": 1}, "metrics": {"val_bpb": 1.5},
                                    "hardware": {"cpu": "x"}, "tasks": [{"n": 4}]}


def test_a_tokenizer_trained_twice_is_the_same_file(tmp_path):
    from daychat.tokenizer import Tokenizer

    text = ["the cat sat on the mat, " * 40, "a dog ate the cat's dinner " * 30] * 5
    for name in ("a", "b"):
        tok = Tokenizer.train(iter(text), 300)
        assert tok.train_seconds is not None and tok.train_seconds >= 0
        tok.save(tmp_path / name)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    assert "train_seconds" not in json.loads((tmp_path / "a/tokenizer.json").read_text())


# ----------------------------------------------------------------------------------------------------
# The workspace lock (workflow/guard.py): DVC's own repo lock, held by a Snakemake run


HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from workflow import guard
fd = guard.take_lock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def test_the_workspace_lock_refuses_a_second_run_and_dies_with_its_holder(tmp_path):
    (tmp_path / ".dvc/tmp").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT)), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(guard.GuardError) as e:
        guard.take_lock(tmp_path)
    assert str(e.value).startswith("another run is using this workspace: snakemake")
    assert f"(pid {holder.pid})" in str(e.value)
    holder.kill()  # kill -9: no cleanup ran, and the lock is free all the same
    holder.wait()
    os.close(guard.take_lock(tmp_path))


def test_a_running_dvc_stage_command_counts_as_a_run(tmp_path):
    (tmp_path / ".dvc/tmp").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        table = {"write": {str(tmp_path / "models/base"): {"pid": sleeper.pid, "cmd": "dvc repro"}}, "read": {}}
        (tmp_path / guard.RWLOCK_FILE).write_text(json.dumps(table))
        with pytest.raises(guard.GuardError, match=rf"dvc repro \(pid {sleeper.pid}\)"):
            guard.take_lock(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    os.close(guard.take_lock(tmp_path))  # the same entry, its process dead: DVC's own leftovers, ignored


def test_snakemakes_locks_left_by_a_killed_run_are_cleared(tmp_path):
    locks = tmp_path / guard.SNAKEMAKE_LOCKS
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("data/raw\n")
    said = []
    guard.clear_stale_snakemake_locks(tmp_path, said.append)
    assert not locks.exists() and said


def test_the_describe_line_names_a_dvc_holder_by_its_command():
    line = guard.describe(f" {os.getpid()}\n")  # DVC writes its pid alone (zc.lockfile)
    assert line.startswith(Path(sys.executable).name) or "python" in line
    assert f"(pid {os.getpid()})" in line


def test_stage_scripts_run_through_daychat_cli():
    """Every stage goes through daychat.cli.run, which is where the lock, the cleanup and the checks live."""
    for script in sorted((ROOT / "stages").glob("*.py")):
        assert "run(main, NAME)" in script.read_text(), script.name


def test_a_damaged_model_or_metrics_file_is_named_as_damaged(tmp_path):
    from daychat.model import GPT, GPTConfig
    from daychat.report import _read_json
    from daychat.train.checkpoint import load_model_folder, write_model_folder

    (tmp_path / "tok").mkdir()
    model = GPT(GPTConfig(vocab_size=300, sequence_len=32, depth=1, aspect_ratio=32, head_dim=32))
    model.init_weights()
    write_model_folder(tmp_path / "base", model, model.config, {"metrics": {"val_bpb": 2.0, "wall_s": 9.0}}, tmp_path / "tok")
    assert json.loads((tmp_path / "base/meta.json").read_text()) == {"metrics": {"val_bpb": 2.0}}  # no timings
    data = (tmp_path / "base/model.pt").read_bytes()
    (tmp_path / "base/model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"base/model\.pt is damaged \(RuntimeError: PytorchStreamReader"):
        load_model_folder(tmp_path / "base")
    (tmp_path / "pretrain.json").write_text('{"val_bpb": 1.2,')
    with pytest.raises(UserError, match=r"pretrain\.json is not valid JSON"):
        _read_json(tmp_path / "pretrain.json")
    assert _read_json(tmp_path / "missing.json") is None  # a stage not run yet is not damage
