"""A daychat GPT as a Hugging Face transformers model (shipped inside an exported model folder).

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The network is daychat's own, from gpt.py beside this file (a verbatim copy of daychat/model/gpt.py at
export time), so the logits are daychat's to the last bit; this file only adapts it to transformers'
interfaces: `forward(input_ids, labels=...)` returning logits (and the shifted next-token loss), and
`generate`. The weights are `model.safetensors`, with daychat's parameter names under `model.`.

Generation keeps daychat's own KV cache (gpt.KVCache) instead of a transformers Cache: `generate` feeds
the whole sequence at every step, and `forward` runs only the tokens after the longest prefix already in
the cache (checked token by token, so a reused cache always holds exactly the positions it claims).
The cache lives for one `generate` call. Padding is not supported (the GPT has no attention mask):
generate one prompt at a time, or prompts of equal length.
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_daychat import DaychatConfig
from .gpt import GPT, GPTConfig, KVCache


class DaychatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DaychatConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    main_input_name = "input_ids"

    def __init__(self, config: DaychatConfig):
        super().__init__(config)
        self.model = GPT(GPTConfig(**config.daychat_gpt))
        self._generation = None  # (ids fed so far (B, T), KVCache) during a generate call
        self._rotary_device = None  # where the rotary tables were last computed
        self.post_init()

    def _init_weights(self, module):
        pass  # every parameter comes from model.safetensors (a missing one fails daychat's export check)

    def _fill_rotary_tables(self):
        """The rotary tables are derived buffers, not in the weights file, and transformers materialises such
        buffers uninitialised after building the model on the "meta" device: compute them (fp32, as daychat
        does) once per device the model runs on."""
        gpt = self.model
        device = gpt.wte.weight.device
        if self._rotary_device != device:
            gpt.cos, gpt.sin = gpt._rotary_tables(gpt.config.sequence_len, device=device)
            self._rotary_device = device

    def get_input_embeddings(self):
        return self.model.wte

    def get_output_embeddings(self):
        return self.model.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the KV cache is daychat's own (see the module docstring)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, daychat_generate: bool = False, **kwargs) -> CausalLMOutput:
        """input_ids (B, T) -> logits (B, T, vocab_size), fp32 and soft-capped as in daychat.
        With labels (B, T): the mean next-token cross-entropy (labels shifted inside, -100 ignored)."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("daychat models take no padding (the attention mask has zeros): run one prompt at "
                             "a time or prompts of equal length")
        self._fill_rotary_tables()
        if daychat_generate:
            logits = self._generation_logits(input_ids)
        else:
            self._generation = None
            logits = self.model(input_ids)
        loss = None
        if labels is not None:
            V = logits.size(-1)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def _generation_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Logits of the tokens of input_ids that the cache does not hold yet (B, T_new, V)."""
        cached = self._generation
        if cached is not None:
            seen, cache = cached
            n = seen.size(1)
            if not (seen.size(0) == input_ids.size(0) and n < input_ids.size(1)
                    and torch.equal(seen, input_ids[:, :n])):
                cached = None
        if cached is None:
            seen, cache, n = input_ids[:, :0], KVCache(self.model.config.sequence_len), 0
        logits = self.model(input_ids[:, n:], kv_cache=cache)
        self._generation = (input_ids.clone(), cache)
        return logits

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        inputs = {"input_ids": input_ids, "daychat_generate": bool(use_cache)}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return inputs

    def generate(self, *args, **kwargs):
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._generation = None  # free the cache's memory
