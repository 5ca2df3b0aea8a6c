"""Export a daychat model folder as a Hugging Face model folder that `transformers` loads.

    export(Path("models/sft"), Path("exports/daychat"), metrics_dir=Path("reports/metrics"))

writes, as a whole (built under a temporary name, checked, then renamed):

    model.safetensors        the weights (fp32, daychat's parameter names under `model.`)
    config.json              DaychatConfig: daychat's GPTConfig under `daychat_gpt` + the standard keys, auto_map
    generation_config.json   stop at <|assistant_end|> (or <|bos|>), the chat CLI's sampling defaults
    gpt.py                   a verbatim copy of daychat/model/gpt.py: the network itself
    modeling_daychat.py      DaychatForCausalLM: the GPT behind transformers' interfaces (generate, loss)
    configuration_daychat.py DaychatConfig
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
                             the BPE as a fast tokenizer, with daychat's chat format as a Jinja template
    README.md                the model card, from meta.json and the run's metrics
    daychat_meta.json        the model folder's meta.json (params, code version, data, metrics)

Load it with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(folder)`.

Why a shipped modeling file rather than transformers' own NanoChat class: daychat's GPT has value
embeddings with an input-dependent gate, per-layer residual and x0 scalars, an optional sliding-window
pattern, a padded vocabulary and its own rotary sign convention, none of which NanoChatForCausalLM has; a
converted checkpoint would load and give other logits. Shipping gpt.py itself keeps one definition of the
network: an architecture change in daychat flows into the next export with no edit here.

Before the rename, `check` loads the folder through transformers and compares its logits with daychat's
(to 1e-4), its tokenizer's ids on varied text, and its chat template's ids with
daychat.chat.format.render_prompt; a mismatch stops the export (a UserError) and leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from daychat.errors import UserError
from daychat.export import card
from daychat.export.hf_tokenizer import EOS, save_pretrained
from daychat.io import atomic_dir, sha256_file, write_json
from daychat.tokenizer import BOS, Tokenizer
from daychat.train.checkpoint import TOKENIZER_DIR, load_model_folder

FILES = Path(__file__).parent / "files"  # the modeling and configuration files copied into every export
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE = "DaychatForCausalLM"
# The chat CLI's defaults (daychat/chat/__main__.py), so `generate(do_sample=True)` samples like it.
SAMPLING = {"temperature": 0.6, "top_k": 50}


def export(model_dir: Path, out: Path, *, metrics_dir: Path | None = None, name: str | None = None,
           check: bool = True, say=print) -> dict[str, Any]:
    """Write the export of the model folder `model_dir` to `out` (see the module docstring) -> flat metrics."""
    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a folder: pass a model folder (models/sft)")
    model, meta = load_model_folder(model_dir, "cpu")
    tokenizer = Tokenizer.load(model_dir / TOKENIZER_DIR)
    config = model.config
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}; "
                        "rerun the stage that wrote it")
    name = name or out.name
    metrics_found = card.read_metrics(metrics_dir) if metrics_dir else {}
    with atomic_dir(out) as tmp:
        state = {f"model.{key}": value.detach().float().cpu().contiguous() for key, value in model.state_dict().items()}
        from safetensors.torch import save_file

        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / WEIGHTS_FILE).chmod(0o644)  # safetensors writes it private (0600): an export is for sharing
        shutil.copyfile(gpt_source(), tmp / "gpt.py")
        for path in sorted(FILES.glob("*.py")):
            shutil.copyfile(path, tmp / path.name)
        write_json(tmp / "config.json", hf_config(config, tokenizer))
        write_json(tmp / "generation_config.json", generation_config(config, tokenizer))
        save_pretrained(tokenizer, tmp, model_max_length=config.sequence_len)
        write_json(tmp / "daychat_meta.json", meta)
        counts = model.num_params()
        (tmp / "README.md").write_text(card.render(name=name, config=config, counts=counts, meta=meta,
                                                   metrics=metrics_found, tokenizer=tokenizer), encoding="utf-8")
        result = {"name": name, "params": counts["total"], "vocab_size": config.vocab_size,
                  "sequence_len": config.sequence_len, "depth": config.depth,
                  "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
                  "weights_mb": (tmp / WEIGHTS_FILE).stat().st_size / 1e6,
                  "files": len(list(tmp.iterdir())), "card_metrics": len(metrics_found)}
        if check:
            say(f"checking {out} with transformers (logits, tokenizer, chat template)")
            from daychat.export.check import check_export

            result.update(check_export(tmp, model, tokenizer))
    return result


def gpt_source() -> Path:
    """daychat/model/gpt.py: the file the export ships as the network's definition."""
    from daychat.model import gpt

    return Path(gpt.__file__)


def hf_config(config, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json: DaychatConfig's fields. The model is built from `daychat_gpt` alone; the standard keys
    describe it for tools (and `generate`'s length limit: max_position_embeddings)."""
    special = tokenizer.special_tokens
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "daychat",
        "auto_map": {"AutoConfig": "configuration_daychat.DaychatConfig",
                     "AutoModelForCausalLM": f"modeling_daychat.{ARCHITECTURE}"},
        "daychat_gpt": dataclasses.asdict(config),
        "vocab_size": config.vocab_size,
        "hidden_size": config.model_dim,
        "intermediate_size": 4 * config.model_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.sequence_len,
        "bos_token_id": special[BOS],
        "eos_token_id": special[EOS],
        "pad_token_id": special[EOS],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def generation_config(config, tokenizer: Tokenizer) -> dict[str, Any]:
    """Generation stops where daychat's engine does: at <|assistant_end|> (a reply's end) or <|bos|>."""
    special = tokenizer.special_tokens
    return {"bos_token_id": special[BOS], "eos_token_id": [special[EOS], special[BOS]], "pad_token_id": special[EOS],
            "max_length": config.sequence_len, "do_sample": True, **SAMPLING}


def push_to_hub(folder: Path, repo: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an export folder to the Hugging Face Hub repo `repo` (created if missing) -> its URL.
    The token comes from `token`, $HF_TOKEN or `huggingface-cli login`."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message="daychat export", ignore_patterns=[".*"])  # e.g. Snakemake's timestamp
    except Exception as e:  # network, auth, permissions: one line, the user's to fix
        raise UserError(f"push to the Hugging Face Hub repo {repo} failed ({type(e).__name__}: {e}); "
                        "check the repo name and your token (huggingface-cli login or HF_TOKEN)") from None
    return str(url)

