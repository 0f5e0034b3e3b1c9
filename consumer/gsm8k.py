"""GSM8K accuracy by greedy generation: answers end in `#### n`; the number is compared exactly."""

import re

import torch
from tqdm.auto import tqdm

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_answer(text: str) -> str | None:
    """The number after `####`, else the last number in the text; commas and trailing .0 removed."""
    match = _FINAL.search(text)
    found = match.group(1) if match else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    found = found.replace(",", "").rstrip(".")
    return found[:-2] if found.endswith(".0") else found


def _messages(question: str, shots: list[dict]) -> list[dict]:
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": shot["question"]}, {"role": "assistant", "content": shot["answer"]}]
    return messages + [{"role": "user", "content": question}]


@torch.no_grad()
def accuracy(model, tokenizer, items: list[dict], shots: list[dict] = (), max_new_tokens: int = 256,
             progress: bool = True) -> tuple[float, list[dict]]:
    """(accuracy, per-item results) of greedy answers to GSM8K items {question, answer}."""
    model.eval()
    results = []
    for item in tqdm(items, desc="gsm8k", disable=not progress, leave=False):
        messages = _messages(item["question"], list(shots))
        if tokenizer.chat_template:
            enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
        else:
            text = "".join(f"{m['content']}\n" for m in messages)
            enc = tokenizer(text, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        reply = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        gold, got = extract_answer(item["answer"]), extract_answer(reply)
        results.append({"question": item["question"], "reply": reply, "gold": gold, "predicted": got,
                        "correct": got is not None and got == gold})
    return (sum(r["correct"] for r in results) / len(results) if results else 0.0), results
