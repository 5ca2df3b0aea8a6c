"""The configuration of a daychat GPT for Hugging Face transformers (shipped inside an exported model folder).

    AutoConfig.from_pretrained(folder, trust_remote_code=True)

The daychat GPTConfig is kept whole under `daychat_gpt` (whatever fields it has: the architecture lives in
the gpt.py copied beside this file, so a new field there needs no change here). The standard attributes
(hidden_size, num_hidden_layers, ...) are derived from it for tools that read them; the model is built
from `daychat_gpt` alone.
"""

from transformers import PretrainedConfig


class DaychatConfig(PretrainedConfig):
    model_type = "daychat"

    def __init__(self, daychat_gpt: dict | None = None, **kwargs):
        self.daychat_gpt = dict(daychat_gpt or {})
        kwargs.setdefault("tie_word_embeddings", False)  # daychat's embedding and lm_head are separate
        super().__init__(**kwargs)
