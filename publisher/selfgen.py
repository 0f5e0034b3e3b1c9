"""`loram publish selfgen`: alignment text of a chosen domain, written by the original model itself.

    loram publish selfgen ORIGINAL --prompts math --count 128 --out mathgen.jsonl
    loram publish align PRUNED --data wiki-chat:1 --data mathgen.jsonl:1 ... --out aligned

The paper aligns on general text and text of its consumers' domain, half and half (FineWeb + OpenWebMath for
math tasks). A publisher without a corpus of that domain can ask the original for one: each prompt is a user
turn, the original's sampled answer the assistant turn, and the conversation, rendered in the model's chat
template, is one record `{"text": ...}` of a JSON-lines file that `--data FILE.jsonl` reads. No dataset goes
in, so nothing of a consumer's fine-tuning or evaluation set can leak into alignment.

Prompts (`--prompts`): `math` (built in, `MATH_PROMPTS`: 32 everyday topics x 4 requests for a grade-school
math word problem with a worked solution, shuffled with `--seed`), or a `.txt` file with one prompt per line.
With `--count` above the number of prompts, the prompts repeat and each repetition is sampled anew.

Sampling: `--temperature` 0.7 and `--top-p` 0.9 (the settings measured; temperature 1 and greedy were not),
seeded, `--batch` prompts at a time padded on the left (with the end-of-sequence token when the tokenizer has
no pad token). The same seed, batch and number of CPU threads give the same file (`LORAM_THREADS` fixes the
thread count).

Output and resume: `--out` is written once, whole, at the end. Meanwhile every finished batch is committed to a
hidden progress folder next to it (`.NAME.jsonl.selfgen/`: the conversations so far, the random number
generators' state after them, and `progress.json` with their byte count and sha256 and the options that decide
the text). An interrupted run (Ctrl-C, a lost machine) continues with `--resume`: the committed conversations are
verified against their hash and kept, generation goes on from the next prompt with the generators restored, and the
file is the one an uninterrupted run writes (same options, batch and thread count). Other options than the run
began with are refused, naming them; a new run next to an interrupted one's progress is refused unless it passes
`--resume` or `--overwrite`.

Measured on SmolLM2-135M (docs/alignment.md): the default alignment objective on 128 `math` conversations closes
51% of the gap from the original to LoRA on GSM8K, against 40% on Wikipedia in chat form (`wiki-chat`) and 30%
without alignment; half `wiki-chat`, half `math` 50%.
"""

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from loram.shared.architectures import check_positions
from loram.shared.configs import Config, check_seed, option
from loram.shared.errors import LoramError, say, warn
from loram.shared.hub import endpoint_option, resolve_model, revision_option
from loram.shared.manifest import MANIFEST_JSON

MATH_TOPICS = ("apples at a market", "a bakery", "a school trip", "saving pocket money", "a train journey", "a garden",
               "a bookshop", "a football team", "baking cookies", "a farm", "a birthday party", "painting a fence",
               "a car trip", "a library", "a pet shop", "a lemonade stand", "a swimming pool", "a pizza order",
               "a classroom", "buying school supplies", "a zoo", "a bike ride", "a toy store", "a concert",
               "a recipe", "a road race", "a fruit basket", "a movie night", "a coffee shop", "a fishing trip",
               "a craft fair", "a parking lot")
MATH_ASKS = ("Write a short grade-school math word problem about {}, then solve it step by step and give the "
             "final answer.",
             "Make up an arithmetic word problem involving {} and explain how to solve it.",
             "Give me a two-step math problem about {} and its worked solution.",
             "Create a math question about {} that needs multiplication or division, and answer it step by step.")
MATH_PROMPTS = tuple(a.format(t) for t in MATH_TOPICS for a in MATH_ASKS)
BUILT_IN = {"math": MATH_PROMPTS}


@dataclass
class SelfgenConfig(Config):
    model: str = option(help="The original model (folder or Hub id): it writes the text.", argument=True)
    out: Path = option(help="The JSON-lines file to write ({\"text\": conversation} per line).")
    prompts: str = option("math", "Built-in prompt set (math: requests for worked grade-school math problems) or a "
                                  ".txt file with one prompt per line.")
    count: int = option(128, "Conversations to write (prompts repeat, each sampled anew, when there are fewer).")
    max_new_tokens: int = option(256, "Most tokens of each answer.")
    temperature: float = option(0.7, "Sampling temperature (> 0).")
    top_p: float = option(0.9, "Nucleus sampling: the smallest set of tokens with this much probability.")
    batch: int = option(16, "Prompts generated together.")
    seed: int = option(0, "Seed for the prompt order and for sampling.")
    resume: bool = option(False, "Continue an interrupted run into --out from the conversations it committed (the "
                                 "same options give the file an uninterrupted run writes).")
    overwrite: bool = option(False, "Replace an existing --out.")
    revision: str | None = revision_option("MODEL")
    endpoint: str | None = endpoint_option()

    def check(self):
        for name in ("count", "max_new_tokens", "batch"):
            if getattr(self, name) < 1:
                raise LoramError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.temperature < float("inf"):
            raise LoramError(f"--temperature must be a number > 0 (the text is sampled), got {self.temperature:g}")
        if not 0 < self.top_p <= 1:
            raise LoramError(f"--top-p must lie in (0, 1], got {self.top_p:g}")
        check_seed(self.seed)
        if self.out.suffix != ".jsonl":
            raise LoramError(f"--out {self.out}: write a .jsonl file (what `loram publish align --data` reads as "
                             "records with a text field)")
        if self.out.is_dir():
            raise LoramError(f"--out {self.out} is a folder; name a .jsonl file")
        if self.resume and self.overwrite:
            raise LoramError("--resume and --overwrite contradict each other; choose one")
        if self.out.exists() and not self.overwrite:
            raise LoramError(f"--out {self.out} already exists; choose another --out or pass --overwrite")


@dataclass
class SelfgenResult:
    out: Path
    conversations: int
    tokens: int  # answer tokens of every conversation in the file
    seconds: float  # this run's generation, without loading the model
    peak_memory_bytes: int  # CPU: the process's peak RSS; GPU: peak allocated, summed over the GPUs
    resumed: int = 0  # conversations an interrupted run had committed (--resume)
    new_tokens: int = 0  # answer tokens this run generated
    cut: int = 0  # answers of the file cut at --max-new-tokens (said as a warning)


def read_prompts(spec: str) -> list[str]:
    """A built-in prompt set by name, or the non-empty lines of a .txt file."""
    if spec in BUILT_IN:
        return list(BUILT_IN[spec])
    path = Path(spec)
    if path.suffix == ".txt" and not path.is_file():
        raise LoramError(f"--prompts {spec}: no such file; give a .txt file with one prompt per line, or a built-in "
                         f"prompt set ({', '.join(BUILT_IN)})")
    if path.suffix != ".txt":
        what = "is not a .txt file" if path.is_file() else "is neither a built-in prompt set nor a .txt file"
        raise LoramError(f"--prompts {spec} {what}: give a built-in prompt set ({', '.join(BUILT_IN)}) or a .txt "
                         "file with one prompt per line")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise LoramError(f"--prompts {spec} is not UTF-8 text; give a .txt file with one prompt per line") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise LoramError(f"--prompts {spec} holds no prompt; write one prompt per line")
    return prompts


def prompt_order(prompts: list[str], count: int, seed: int) -> list[str]:
    """`count` prompts: the set shuffled with `seed`, repeated (each pass shuffled anew) as often as needed."""
    rng, order = random.Random(seed), []
    while len(order) < count:
        batch = list(prompts)
        rng.shuffle(batch)
        order += batch
    return order[:count]


class Batch(NamedTuple):
    texts: list[str]  # each ask with its answer, rendered as one chat
    tokens: int  # answer tokens, each answer's end-of-sequence token included
    cut: int  # answers that reached max_new_tokens before their end-of-sequence token


def conversations(model, tokenizer, asks: list[str], batch: int = 16, max_new_tokens: int = 256,
                  temperature: float = 0.7, top_p: float = 0.9) -> Iterator[Batch]:
    """Per batch of `batch` asks: the original's sampled answer to each, rendered with the ask as one chat, the
    batch's answer tokens and how many answers were cut at `max_new_tokens`.

    Sampling follows torch's global RNG (seed it first). The tokenizer is set to pad on the left (generation
    continues every row from its last prompt token), with its end-of-sequence token when it has no pad token;
    the caller's tokenizer keeps those settings."""
    import torch

    pad_left(tokenizer)
    device = model.get_input_embeddings().weight.device  # where the input ids go, also under device_map="auto"
    for i in range(0, len(asks), batch):
        part = asks[i:i + batch]
        rendered = [chat(tokenizer, [{"role": "user", "content": a}], add_generation_prompt=True) for a in part]
        enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                       top_p=top_p, pad_token_id=tokenizer.pad_token_id)
        texts, tokens, cut = [], 0, 0
        for ask, ids in zip(part, generated[:, enc.input_ids.shape[1]:].tolist(), strict=True):
            stop = tokenizer.eos_token_id
            tokens += ids.index(stop) + 1 if stop in ids else len(ids)  # up to the end of the answer, its stop token too
            cut += stop not in ids
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            texts.append(chat(tokenizer, [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]))
        yield Batch(texts, tokens, cut)


def pad_left(tokenizer) -> None:
    """Pad on the left, with the end-of-sequence token when the tokenizer has no pad token (Llama-3's has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoramError("the tokenizer has neither a pad nor an end-of-sequence token, and generation pads "
                             "its batches; use a tokenizer that defines one")
        tokenizer.pad_token = tokenizer.eos_token


def chat(tokenizer, turns: list[dict], **kwargs) -> str:
    """`turns` rendered with the tokenizer's chat template; a template that fails is one LoramError."""
    from loram.publisher.align_data import render_chat

    return render_chat(tokenizer, turns, fix="fix the template or use another model", **kwargs)


def selfgen(config: SelfgenConfig | None = None, **kwargs) -> SelfgenResult:
    """Write `--count` conversations of the original with itself to `--out` (whole or not at all; every finished
    batch committed to a progress folder that `--resume` continues from)."""
    import torch
    from tqdm.auto import tqdm

    from loram.publisher.selfgen_progress import Progress
    from loram.shared.outputs import check_writable
    from loram.shared.progress import peak_memory_bytes
    from loram.shared.pruned_model import from_pretrained, load_config, load_tokenizer
    from loram.shared.runtime import configure_threads, default_device

    cfg = SelfgenConfig.given(config, **kwargs)
    prompts = read_prompts(cfg.prompts)
    asks = prompt_order(prompts, cfg.count, cfg.seed)
    check_writable(cfg.out, fix="choose another --out")
    progress = Progress.open(cfg, prompts)  # --resume: the committed conversations, verified; else none left behind
    source = resolve_model(cfg.model, cfg.revision, cfg.endpoint)
    if (source.path / MANIFEST_JSON).is_file():
        raise LoramError(f"{cfg.model} is a LoRAM pruned checkpoint; the alignment text is the original's own: "
                         "give the model it was pruned from (the base its manifest names)")
    check_positions(load_config(source.path), cfg.max_new_tokens + 1,
                    f"--max-new-tokens {cfg.max_new_tokens} with a prompt of one token or more")
    tokenizer = load_tokenizer(source.path)
    if not getattr(tokenizer, "chat_template", None):
        raise LoramError(f"{cfg.model}: its tokenizer has no chat template, and selfgen writes conversations; use an "
                         "instruction-tuned model or align on plain text")
    pad_left(tokenizer)  # refuses a tokenizer that cannot pad before the model is loaded
    configure_threads()
    progress.check_threads(torch.get_num_threads())
    device = default_device()
    placement = {"device_map": "auto"} if device.type == "cuda" else {}
    model = from_pretrained(source.path, dtype="auto" if device.type == "cuda" else torch.float32, **placement).eval()
    started = time.perf_counter()
    if progress.done:
        progress.restore_rng()
    else:
        progress.start()  # --overwrite: an earlier run's progress goes only now, every input checked
        torch.manual_seed(cfg.seed)
    resumed, tokens_before = progress.done, progress.tokens
    try:
        with tqdm(total=len(asks), initial=resumed, desc="selfgen", unit="conversation") as bar:
            for part in conversations(model, tokenizer, asks[resumed:], cfg.batch, cfg.max_new_tokens,
                                      cfg.temperature, cfg.top_p):
                progress.commit(part.texts, part.tokens, part.cut)
                bar.update(len(part.texts))
    except KeyboardInterrupt as interrupt:
        again = "rerun it with --resume in place of --overwrite" if cfg.overwrite else \
            "rerun the same command with --resume"
        say(f"interrupted with {progress.done} of {len(asks)} conversations committed; {again} to continue"
            if progress.done else "interrupted before the first batch was committed; rerun the same command")
        interrupt.already_said = True  # the CLI's generic line would only repeat it
        raise
    seconds = time.perf_counter() - started
    progress.write(cfg.out)
    progress.remove()
    if progress.cut:
        warn(f"{progress.cut} of the {progress.done} answers reached --max-new-tokens {cfg.max_new_tokens} before "
             "their end and stop mid-sentence in the text (the chat template closes each turn); raise "
             "--max-new-tokens for whole answers")
    devices = {p.device for p in model.parameters()}  # several GPUs under device_map="auto"
    return SelfgenResult(cfg.out, progress.done, progress.tokens, seconds, peak_memory_bytes(devices), resumed,
                         progress.tokens - tokens_before, progress.cut)
