"""Pruned-model types: the stock Llama / Mistral / Qwen2 classes, with decoder layers sized per layer.

A structurally pruned model is not uniform: layers inside the pruned range have fewer query heads,
KV heads and MLP channels than the rest. Stock configs hold one scalar of each, so this file adds
one model type per supported family (`loram_llama`, `loram_mistral`, `loram_qwen2`):

- The config keeps every global field of the *original* model unchanged (`config.num_attention_heads`
  etc. are the unpruned sizes) and records the pruned layers in transformers' `per_layer_config`
  schema, sparsely: `{"<layer>": {"num_attention_heads": n_q, "num_key_value_heads": n_kv,
  "intermediate_size": I}}`. `head_dim` is global: whole heads are pruned, RoPE is unchanged.
- The model builds decoder layer i from `config.per_layer_config[i]` and is otherwise the stock
  class: same module names and state-dict keys, so peft, bitsandbytes, gradient checkpointing,
  generation and caches work unchanged. Layer i's projections, with hd = head_dim, H = hidden:
      q_proj [n_q*hd, H], k_proj/v_proj [n_kv*hd, H], o_proj [H, n_q*hd]   (Qwen2: q/k/v biases sized alike)
      gate_proj/up_proj [I, H], down_proj [H, I]

Self-contained on purpose (imports only torch, transformers and the standard library): the file is
copied into every saved checkpoint, and `config.json`'s `auto_map` points at it, so
`from_pretrained(dir, trust_remote_code=True)` works without the `loram` package. With the package,
`register()` makes the Auto classes know these types and no remote code is needed.
"""

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

# The only attributes a LoRAM config lets vary per layer.
PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


class _PerLayerSizesConfig:
    """Mixin for the family configs: global fields = original sizes, `per_layer_config` = pruned layers."""

    def __post_init__(self, **kwargs):
        # head_dim must be explicit before any layer changes its head count: the stock attention falls
        # back to hidden_size // num_attention_heads, which would change the head size of pruned layers.
        if "head_dim" not in kwargs and getattr(self, "head_dim", None) is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self._check_per_layer_sizes()

    def __getattribute__(self, key):
        # transformers treats a global read of a per-layer attribute as ambiguous (it raises, or logs a
        # notice when allowed). Here the global value has one meaning, the original model's size, so it is
        # returned directly; layer sizes are read from `config.per_layer_config[i]`.
        if key in PER_LAYER_FIELDS:
            values = object.__getattribute__(self, "__dict__")
            if key in values:
                return values[key]
        return super().__getattribute__(key)

    @property
    def allow_global_per_layer_attribute_access(self) -> bool:
        # Default True (kept out of config.json): iterating the config must list the original sizes too.
        return self.__dict__.get("allow_global_per_layer_attribute_access", True)

    @allow_global_per_layer_attribute_access.setter
    def allow_global_per_layer_attribute_access(self, value: bool) -> None:
        self.__dict__["allow_global_per_layer_attribute_access"] = value

    def _check_per_layer_sizes(self) -> None:
        """Refuse per-layer overrides this model cannot build, layer by layer (ValueError)."""
        if not self.is_heterogeneous:
            return
        unsupported = sorted(set(self.per_layer_attributes) - set(PER_LAYER_FIELDS))
        if unsupported:
            raise ValueError(f"per_layer_config may only set {', '.join(PER_LAYER_FIELDS)}; got {unsupported}")
        for i, layer in enumerate(self.per_layer_config):
            if getattr(layer, "skip", None):
                raise ValueError(f"layer {i}: per_layer_config 'skip' is not supported by {type(self).__name__}")
            n_q, n_kv, inter = (getattr(layer, f) for f in PER_LAYER_FIELDS)
            if min(n_q, n_kv, inter) < 1:
                raise ValueError(f"layer {i}: sizes must be positive, got heads={n_q} kv_heads={n_kv} mlp={inter}")
            if n_q % n_kv:
                raise ValueError(f"layer {i}: num_attention_heads={n_q} is not a multiple of num_key_value_heads={n_kv}")
        if not self.per_layer_attributes:
            # Every override equalled the global value (transformers drops those); an empty spec would
            # still mark the config heterogeneous, and the model is uniform.
            self.per_layer_config = None


class LoramLlamaConfig(_PerLayerSizesConfig, LlamaConfig):
    model_type = "loram_llama"
    _auto_class = "AutoConfig"  # save_pretrained copies this file and writes `auto_map`


class LoramMistralConfig(_PerLayerSizesConfig, MistralConfig):
    model_type = "loram_mistral"
    _auto_class = "AutoConfig"


class LoramQwen2Config(_PerLayerSizesConfig, Qwen2Config):
    model_type = "loram_qwen2"
    _auto_class = "AutoConfig"


def _per_layer_decoder_layers(config: PreTrainedConfig, layer_class: type) -> nn.ModuleList:
    """Decoder layers built from their own configs, each then pointed at the global config.

    Sizes are fixed at construction; at run time the stock modules read only global settings from
    `self.config` (attention implementation, sliding window), which must follow later changes such
    as `model.set_attn_implementation(...)`. Hence every submodule ends up holding the model's config.
    """
    layers = nn.ModuleList()
    for i in range(config.num_hidden_layers):
        layer = layer_class(config.per_layer_config[i], i)
        for module in layer.modules():
            if isinstance(getattr(module, "config", None), PreTrainedConfig):
                module.config = config
        layers.append(layer)
    return layers


class _PerLayerModel:
    """Mixin for the family base models: the stock `__init__`, with layers built by `_per_layer_decoder_layers`."""

    decoder_layer_class: type

    def __init__(self, config):
        # The stock __init__ builds every layer at the global (unpruned) size. Letting it see zero layers
        # keeps its family-specific set-up (embeddings, norm, rotary, flags) and allocates no layer.
        num_layers = config.num_hidden_layers
        config.num_hidden_layers = 0
        try:
            super().__init__(config)
        finally:
            config.num_hidden_layers = num_layers
        self.layers = _per_layer_decoder_layers(config, self.decoder_layer_class)
        self.post_init()  # initializes the new layers' weights (a no-op on the meta device)


class _PerLayerCausalLM:
    """Mixin for the family causal LMs: the stock `__init__` with our base model instead of the stock one."""

    base_model_class: type

    def __init__(self, config):
        # The stock __init__ hard-codes the stock base model (full-size layers); this repeats its body.
        PreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class LoramLlamaModel(_PerLayerModel, LlamaModel):
    config_class = LoramLlamaConfig
    decoder_layer_class = LlamaDecoderLayer
    _auto_class = "AutoModel"


class LoramLlamaForCausalLM(_PerLayerCausalLM, LlamaForCausalLM):
    config_class = LoramLlamaConfig
    base_model_class = LoramLlamaModel
    _auto_class = "AutoModelForCausalLM"


class LoramMistralModel(_PerLayerModel, MistralModel):
    config_class = LoramMistralConfig
    decoder_layer_class = MistralDecoderLayer
    _auto_class = "AutoModel"


class LoramMistralForCausalLM(_PerLayerCausalLM, MistralForCausalLM):
    config_class = LoramMistralConfig
    base_model_class = LoramMistralModel
    _auto_class = "AutoModelForCausalLM"


class LoramQwen2Model(_PerLayerModel, Qwen2Model):
    config_class = LoramQwen2Config
    decoder_layer_class = Qwen2DecoderLayer
    _auto_class = "AutoModel"


class LoramQwen2ForCausalLM(_PerLayerCausalLM, Qwen2ForCausalLM):
    config_class = LoramQwen2Config
    base_model_class = LoramQwen2Model
    _auto_class = "AutoModelForCausalLM"


# (config, base model, causal LM) per family, keyed by our model type.
MODEL_CLASSES: dict[str, tuple[type, type, type]] = {
    c.model_type: (c, m, lm)
    for c, m, lm in (
        (LoramLlamaConfig, LoramLlamaModel, LoramLlamaForCausalLM),
        (LoramMistralConfig, LoramMistralModel, LoramMistralForCausalLM),
        (LoramQwen2Config, LoramQwen2Model, LoramQwen2ForCausalLM),
    )
}


def auto_map(model_type: str) -> dict[str, str]:
    """The `auto_map` entries of `config.json` that let `trust_remote_code=True` find these classes."""
    module = __name__.rsplit(".", 1)[-1]
    return {cls._auto_class: f"{module}.{cls.__name__}" for cls in MODEL_CLASSES[model_type]}


_registered = False


def register() -> None:
    """Make AutoConfig / AutoModel / AutoModelForCausalLM know the LoRAM types (idempotent, cheap to repeat)."""
    global _registered
    if _registered:
        return
    _registered = True
    for config_class, model_class, lm_class in MODEL_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, lm_class, exist_ok=True)
