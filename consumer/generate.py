"""`loram generate`: stream a completion from a model, optionally with a (recovered) adapter.

    loram generate ORIGINAL --adapter RECOVERED --prompt "Natalia sold clips to 48 friends..."

The prompt goes through the tokenizer's chat template when it has one (as a user turn with the
generation prompt), otherwise it is used as is. Tokens are printed as they are generated.
"""

from dataclasses import dataclass

from loram.shared.architectures import check_positions
from loram.shared.configs import Config, check_seed, option
from loram.shared.errors import LoramError
from loram.shared.hub import endpoint_option, revision_option


@dataclass
class GenerateConfig(Config):
    model: str = option(help="The model (folder or Hub id): usually the original.", argument=True)
    prompt: str = option(help="The prompt (a user message when the tokenizer has a chat template).")
    adapter: str | None = option(None, "A peft adapter folder, e.g. a recovered LoRAM adapter.")
    max_new_tokens: int = option(256, "Most tokens to generate.")
    temperature: float = option(0.0, "0 for greedy decoding.")
    seed: int = option(0, "Seed for sampling.")
    ignore_fingerprint: bool = option(False, "Use an adapter on a base other than its recorded one (fingerprint or pruned manifest).")
    revision: str | None = revision_option("MODEL")
    endpoint: str | None = endpoint_option()

    def check(self):
        if not self.prompt.strip():
            raise LoramError("--prompt is empty; give the text to complete, e.g. --prompt \"What is 2 + 3?\"")
        if not 0 <= self.temperature < float("inf"):  # negative, NaN or infinite
            raise LoramError(f"--temperature must be a number >= 0 (0: greedy decoding), got {self.temperature:g}")
        if self.max_new_tokens < 1:
            raise LoramError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        check_seed(self.seed)


def generate(config: GenerateConfig | None = None, stream=None, **kwargs) -> str:
    """Generate (printing tokens to `stream`, default stdout, as they come); returns the completion."""
    import sys

    import torch
    from transformers import TextStreamer

    from loram.evaluate import load_spec

    cfg = GenerateConfig.given(config, **kwargs)
    model, tokenizer = load_spec(cfg.model, cfg.adapter, cfg.ignore_fingerprint, cfg.endpoint, cfg.revision)
    if tokenizer.chat_template:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": cfg.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(cfg.prompt, return_tensors="pt")
    prompt_tokens = enc["input_ids"].shape[1]
    check_positions(model.config, prompt_tokens + cfg.max_new_tokens,
                    f"the prompt's {prompt_tokens} tokens plus --max-new-tokens {cfg.max_new_tokens}")
    out_stream = stream or sys.stdout

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            print(text, end="" if not stream_end else "\n", file=out_stream, flush=True)

    torch.manual_seed(cfg.seed)
    sampling = {"do_sample": True, "temperature": cfg.temperature} if cfg.temperature > 0 else {"do_sample": False}
    out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, streamer=_Streamer(tokenizer, skip_prompt=True,
                         skip_special_tokens=True), pad_token_id=pad_token_id(tokenizer),
                         **sampling)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def pad_token_id(tokenizer) -> int | None:
    """The tokenizer's pad id (0 is a real id, not a missing one), else its end-of-sequence id."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
