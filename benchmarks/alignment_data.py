"""Self-generated chat-format alignment text for the alignment grid: does the original's own voice align better?

The demo's adapter is trained and evaluated on chat-rendered examples (system prompt, user turn, assistant
turn of SmolLM2's template). `loram publish align --data wiki-chat` renders the `wiki` split in that form
(publisher/align_data.py); this script writes the other chat-form general text the grid measured, drawn
from neither GSM8K nor news:

    selfgen.jsonl     the original's own answers (sampled: temperature 0.7, top-p 0.9, 192 new tokens, seed 0)
                      to 128 general prompts: three questions about each `wiki` title and the first message
                      of 400 chitchat-dataset conversations (chitchat-dataset 0.9.0 on PyPI, pinned), shuffled
    mathgen.jsonl     the original's own answers (sampled as selfgen, 256 new tokens) to 128 generic requests for a
                      grade-school math word problem with a worked solution (MATH_TOPICS x MATH_ASKS, shuffled):
                      math-domain text a publisher can make without any dataset, in the spirit of the paper's
                      OpenWebMath share, and nothing of GSM8K in it
    gsm8k-oracle.jsonl  NOT general text, a diagnostic bound: GSM8K fine-tuning items 500..999 (`gsm8k-train`;
                      the demo's LoRA trains on items 0..59, the held-out set is items 1000+) rendered as chat
                      (question as the user turn, answer as the assistant's): what aligning on the fine-tuning
                      task's own domain could give, which no publisher can do for a task it does not know

    python benchmarks/alignment_data.py --out DIR          # writes DIR/selfgen.jsonl, mathgen.jsonl, gsm8k-oracle.jsonl

Each file holds {"text": rendered conversation} records, which `loram publish align --data FILE` reads.
On 2 CPU cores (16 prompts per batch) selfgen takes about 10 minutes to generate, mathgen about 4.
"""

import argparse
import json
import random
import zipfile
from pathlib import Path


def chitchat_wheel():
    from loram.shared.assets import Wheel

    return Wheel("chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
                 "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")


def _write(path: Path, texts: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tmp.replace(path)


def prompts(count: int, seed: int = 0) -> list[str]:
    from loram.shared.assets import fetch_wheel, read_records

    asks = []
    for r in read_records("wiki"):
        asks += [f"Tell me about {r['title']}.", f"Explain {r['title']} in simple terms.",
                 f"What is important to know about {r['title']}?"]
    with zipfile.ZipFile(fetch_wheel(chitchat_wheel())) as zf:
        chats = json.loads(zf.read("chitchat_dataset/dataset.json"))
    for key in list(chats)[:400]:
        first = chats[key]["messages"][0][-1]["text"]
        if len(first) > 20:
            asks.append(first)
    random.seed(seed)
    random.shuffle(asks)
    return asks[:count]


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


def math_prompts(count: int, seed: int = 0) -> list[str]:
    asks = [a.format(t) for t in MATH_TOPICS for a in MATH_ASKS]
    random.Random(seed).shuffle(asks)
    return asks[:count]


def self_generated(model, tokenizer, asks: list[str], batch: int = 16, new_tokens: int = 192) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    texts = []
    for i in range(0, len(asks), batch):
        part = asks[i:i + batch]
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=False,
                                                  add_generation_prompt=True) for a in part]
        enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=True, temperature=0.7, top_p=0.9,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        for ask, ids in zip(part, gen[:, enc.input_ids.shape[1]:], strict=True):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}], tokenize=False))
        print(f"self-generated: {len(texts)}/{len(asks)}", flush=True)
    return texts


ORACLE_ITEMS = range(500, 1000)  # of gsm8k-train: disjoint from the demo's 60 training items and the held-out set


def oracle(tokenizer) -> list[str]:
    """GSM8K fine-tuning items ORACLE_ITEMS as chat text (the in-domain bound of the grid; not general text)."""
    from loram.shared.assets import read_records

    records = read_records("gsm8k-train")
    return [tokenizer.apply_chat_template([{"role": "user", "content": records[i]["question"]},
                                           {"role": "assistant", "content": records[i]["answer"]}], tokenize=False)
            for i in ORACLE_ITEMS]


def build(out: Path, count: int = 128, files=("selfgen", "mathgen", "gsm8k-oracle")) -> None:
    """Write out/NAME.jsonl for each of `files` (selfgen, mathgen, gsm8k-oracle) where missing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loram.shared.assets import model_dir

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    loaded = []

    def original():  # loaded once, and only when a self-generated file is missing
        if not loaded:
            loaded.append(AutoModelForCausalLM.from_pretrained(model_dir()).eval())
        return loaded[0]
    if "gsm8k-oracle" in files and not (out / "gsm8k-oracle.jsonl").is_file():
        _write(out / "gsm8k-oracle.jsonl", oracle(tokenizer))
    if "selfgen" in files and not (out / "selfgen.jsonl").is_file():
        torch.manual_seed(0)
        asks = prompts(count)  # seeds python's random after torch's, as the grid's files were made
        _write(out / "selfgen.jsonl", self_generated(original(), tokenizer, asks))
    if "mathgen" in files and not (out / "mathgen.jsonl").is_file():
        torch.manual_seed(0)
        _write(out / "mathgen.jsonl", self_generated(original(), tokenizer, math_prompts(count), new_tokens=256))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=128, help="self-generated conversations")
    ap.add_argument("--files", nargs="+", default=["selfgen", "mathgen", "gsm8k-oracle"], help="which files to write")
    args = ap.parse_args()
    build(args.out, args.count, args.files)


if __name__ == "__main__":
    main()
