"""Checkpoints of a training run: everything needed to continue it exactly, written atomically.

A run's checkpoints live in one folder, one file per save:

    step_000500.pt   torch.save of {"step", "model", "optimizers", "loader", "loop", "rng", "meta"}

A file is written under a temporary name and renamed into place, so a kill during a save leaves the
previous checkpoint as the latest and never a truncated one (its temporary is deleted when the run
resumes). After a save only the last `keep` are kept. Before a save the free space is checked against
the size of the state (the older checkpoints are deleted only once the new one is whole, so they do not
count as free), so a full disk stops the run with one line saying how much is needed where, not with
torch's "unexpected pos" from its zip writer.

`save_async` does not stall training for the write: the state is copied to host memory at the step
boundary (a copy of every tensor, so later steps cannot change what is written; ~1 s for a d20's ~6 GB
over PCIe) and a background thread writes it while training goes on. At most one write is in flight (a
second save first waits for the first), `wait()` joins it and re-raises its error, and the file is the
same bytes a plain `save` of that state writes, so resuming from it is exact. The cost is host memory: one
copy of the state while it is written.

The folder must not be a pipeline output: DVC and Snakemake both delete a stage's outputs before they
rerun it, which would make resuming impossible. The pretrain stage keys it by a fingerprint of its
inputs (see `run_fingerprint`), so a rerun with the same inputs resumes and one with other params starts
fresh in a folder of its own.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import threading
from pathlib import Path
from typing import Any

import torch

from daychat.errors import UserError
from daychat.io import atomic_path, clean_stale_temps, ensure_space, free_bytes, tree_bytes

_NAME = re.compile(r"step_(\d+)\.pt")
_TEMP = re.compile(r"\.step_(\d+)\.pt\..*\.tmp")  # atomic_path's temporary of a save


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Save, find and load the checkpoints in `folder`, keeping the last `keep`."""

    def __init__(self, folder: str | os.PathLike, keep: int = 2):
        self.folder = Path(folder)
        self.keep = max(1, keep)
        # The temporary of a save that a kill interrupted (a run's checkpoints have one writer: its stage,
        # which holds the stage lock, see daychat.cli).
        if self.folder.is_dir():
            for step in {m.group(1) for p in self.folder.iterdir() if (m := _TEMP.fullmatch(p.name))}:
                clean_stale_temps(self.folder / f"step_{step}.pt")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step:06d}.pt"

    def all(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary files of an interrupted save are not listed)."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        path = self.path(step)
        ensure_space(self.folder, state_bytes(state), f"checkpoint {path.name}")
        with atomic_path(path) as tmp:
            save_file({"step": step, **state}, tmp)
        for old in self.all()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def save_async(self, step: int, state: dict[str, Any]) -> Path:
        """Copy `state` to host memory now and write it in a background thread; returns the path it will have."""
        self.wait()  # one write in flight at a time (and its error, if any, surfaces here)
        snapshot = to_host(state)

        def write() -> None:
            try:
                self.save(step, snapshot)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()
        return self.path(step)

    def wait(self) -> None:
        """Block until the background write (if any) is on disk; re-raise what it failed with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, UserError) or getattr(error, "errno", None) == errno.ENOSPC:
                raise error  # already one line, or a full disk that daychat.cli says as such
            raise UserError(f"writing a checkpoint to {self.folder} failed ({type(error).__name__}: {error})") from error

    def load(self, path: str | os.PathLike | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The checkpoint at `path` (default: the latest), or None when there is none."""
        path = Path(path) if path else self.latest()
        if path is None:
            return None
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise load_error(e, path, damaged="delete that file to resume from the checkpoint before it") from None


def load_error(e: BaseException, path: str | os.PathLike, *, damaged: str, mismatch: str = "") -> UserError:
    """One line for an error met while loading a checkpoint or a model, by what it means, so that nobody is
    told to delete a day of checkpoints for an error that is not theirs: out of memory and device errors
    leave the file as it was (run again once memory or the card is back); only an unreadable file is
    damaged (`damaged` says what to do then); a file that reads but does not match the model or the run
    (`mismatch`) was written by other code or settings and is not damaged either."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    name = type(e).__name__
    lower = text.lower()
    if isinstance(e, MemoryError) or isinstance(e, torch.OutOfMemoryError) or "out of memory" in lower:
        return UserError(f"{path}: out of memory while loading it ({name}: {first}); the file is not damaged: "
                         "free memory (other programs, other jobs on the card) and run again")
    if "cuda error" in lower or "cublas" in lower or "cudnn" in lower or "accelerator" in name.lower():
        return UserError(f"{path}: the GPU failed while loading it ({name}: {first}); the file is not damaged: "
                         "check the card (nvidia-smi) and run again")
    if isinstance(e, OSError) and e.errno is not None:
        return UserError(f"{path}: cannot be read from disk ({name}: {first}); check the disk and run again")
    if isinstance(e, (EOFError, pickle.UnpicklingError)) or any(
            s in lower for s in ("pytorchstreamreader", "central directory", "unexpected eof", "invalid header",
                                 "corrupt", "truncated", "zip archive", "magic number")):
        return UserError(f"{path} is damaged ({name}: {first}); {damaged}")
    return UserError(f"{path} does not match this run ({name}: {first}); it is not damaged, it was written by "
                     f"other code or settings" + (f": {mismatch}" if mismatch else ""))


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested state (dicts, lists): what torch.save writes, less the pickle."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def save_file(state: Any, path: str | os.PathLike) -> None:
    """torch.save, with a full disk said as one: torch's zip writer turns ENOSPC into a RuntimeError
    ("[enforce fail at inline_container.cc] ... unexpected pos"), which daychat.cli would take for a bug."""
    try:
        torch.save(state, path)
    except RuntimeError as e:
        if free_bytes(path) >= state_bytes(state):  # room enough: not a full disk, a real error
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e


def to_host(obj: Any) -> Any:
    """A copy of a state tree (dicts, lists, tuples) whose tensors are fresh CPU copies, detached from
    anything training goes on changing."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj  # numbers, strings, None: immutable


def run_fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (params, input hashes): the name of a run's checkpoint folder."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# The final model folder: what the next stages (and people) load.
#
#     model.pt       fp32 state_dict (torch.save of a plain dict of tensors: loads with weights_only=True)
#     optimizer.pt   optional: the optimizers' final state_dicts (a list), so that SFT continues from them
#     config.json    the GPTConfig
#     tokenizer/     a copy of the tokenizer the model was trained with (a few hundred KB)
#     meta.json      params, code version, hardware, data, FLOPs, final metrics

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"


def write_model_folder(out: str | os.PathLike, model: torch.nn.Module, config: Any, meta: dict,
                       tokenizer: str | os.PathLike, optimizers: list[dict] | None = None) -> None:
    """Write the model folder `out` as a whole (built under a temporary name, then renamed); with
    `optimizers` (their state_dicts) also optimizer.pt."""
    import dataclasses
    import shutil

    from daychat.io import atomic_dir, write_json
    from daychat.provenance import reproducible

    state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    opt_state = to_host(optimizers) if optimizers is not None else None
    ensure_space(Path(out).parent, state_bytes(state) + state_bytes(opt_state) + tree_bytes(tokenizer),
                 f"model folder {Path(out).name}")
    with atomic_dir(out) as tmp:
        save_file(state, tmp / MODEL_FILE)
        if opt_state is not None:
            save_file(opt_state, tmp / OPTIMIZER_FILE)
        write_json(tmp / CONFIG_FILE, dataclasses.asdict(config))
        shutil.copytree(tokenizer, tmp / TOKENIZER_DIR)
        write_json(tmp / META_FILE, reproducible(meta))  # timings stay in the stage's metrics file


def read_model_config(folder: str | os.PathLike):
    """The GPTConfig of a model folder without loading its weights (a memory preflight needs the shapes
    before anything goes to the device)."""
    from daychat.model import GPTConfig

    folder = Path(folder)
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} not found: {folder} is not a finished model folder (run the pretrain stage)")
    try:
        return GPTConfig(**json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:
        raise UserError(f"{folder} holds a model this code cannot load ({type(e).__name__}: {e}); "
                        "rerun the pretrain stage") from None


def load_model_folder(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    """(GPT in eval mode on `device`, its meta.json) from a folder written by `write_model_folder`."""
    from daychat.model import GPT, GPTConfig

    folder = Path(folder)
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} not found: {folder} is not a finished model folder (run the pretrain stage)")
    try:
        config = GPTConfig(**json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=device)
        model.init_weights()  # buffers (rotary tables); the weights come from the file
        model.load_state_dict(torch.load(folder / MODEL_FILE, map_location=device, weights_only=True))
    except (EOFError, pickle.UnpicklingError):  # torch's own message here is many lines about weights_only
        raise UserError(f"{folder / MODEL_FILE} is damaged (not a saved state dict); rerun the stage that "
                        f"wrote {folder}") from None
    except (ValueError, TypeError, RuntimeError, KeyError, MemoryError, OSError) as e:
        raise load_error(e, folder / MODEL_FILE, damaged=f"rerun the stage that wrote {folder}",
                         mismatch=f"rerun the stage that wrote {folder} with this code") from None
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    return model.eval(), meta


def load_optimizer_state(folder: str | os.PathLike, device: str | torch.device = "cpu") -> list[dict] | None:
    """The optimizers' state_dicts saved in a model folder (optimizer.pt), or None when it has none."""
    path = Path(folder) / OPTIMIZER_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}); rerun the pretrain stage") from None
