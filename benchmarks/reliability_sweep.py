"""Reliability sweep: bad inputs and faults through the real `loram` command, as a user makes them.

    python benchmarks/reliability_sweep.py [--workers 2] [--out benchmarks/results/reliability_sweep.md]

Builds tiny fixtures (a base model, its pruned checkpoint, a trained and a recovered adapter, corrupted
copies), runs every case in a fresh process, and writes one table row per case: the command, the exit
code, the line it prints (the `error:`/`warning:` line, or the last line) and whether anything was lost
or left behind: a folder that existed before is byte-for-byte unchanged, and no new output or hidden
temporary folder appears. docs/reliability.md shows the table; tests/test_errors.py, test_integrity.py,
test_warnings.py, test_overwrite.py and shared/test_training.py assert the same cases.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import file_tree, run_loram, save_tiny_checkpoint, tiny_pruned_workspace  # noqa: E402

TRAIN = ["--columns", "prompt=question,response=answer", "--seq-len", "32", "--steps", "1", "--save-every", "1"]
ALIGN = ["--data", "{r}/text.txt", "--steps", "1", "--seq-len", "16", "--batch", "2"]
EVAL = ["--data", "{r}/qa.jsonl", "--columns", "prompt=question,response=answer", "--seq-len", "32"]
GEN = ["--prompt", "hi", "--max-new-tokens", "2"]


def fixtures(r: Path) -> None:
    from safetensors.torch import load_file, save_file

    from loram.recover import recover
    from loram.train import train

    tiny_pruned_workspace(r)
    (r / "text.txt").write_text("\n\n".join(f"paragraph {i} " + "words " * 30 for i in range(40)))
    (r / "empty.jsonl").write_text("")
    (r / "noanswers.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": ""}) + "\n"
                                               for i in range(8)))
    (r / "a-file").write_text("not a folder\n")
    (r / "bad.yaml").write_text("lm_head: maybe\n")
    (r / "intkey.yaml").write_text("steps: 1\n1: 2\n")  # a key YAML reads as a number
    train(model=str(r / "pruned"), data=str(r / "qa.jsonl"), out=r / "adapter", steps=1, seq_len=32,
          columns="prompt=question,response=answer", save_every=1)
    recover(adapter=str(r / "adapter"), out=r / "recovered")
    (r / "asks.txt").write_text("Count to three.\n")
    shutil.copytree(r / "adapter", r / "adapter-k")  # then `--overwrite` into it killed before its first checkpoint:
    (r / ".adapter-k.replacing" / "checkpoints").mkdir(parents=True)  # its staging folder holds the pinned options
    (r / ".adapter-k.replacing" / "checkpoints" / "run_config.json").write_text("{}")
    from loram.publisher.prune import prune

    prune(base=str(r / "base"), out=r / "pruned-other", method="random", ratio=0.5, layers="1:3", seed=3)  # same shapes
    shutil.copytree(r / "pruned", r / "pruned-b")  # trained on, then corrupted: recover must notice
    train(model=str(r / "pruned-b"), data=str(r / "qa.jsonl"), out=r / "adapter-b", steps=1, seq_len=32,
          columns="prompt=question,response=answer", save_every=100)
    _flip(r / "pruned-b")
    # broken model folders
    shutil.copytree(r / "base", r / "badjson")
    (r / "badjson" / "config.json").write_text('{"model_type": "llama",\n')
    shutil.copytree(r / "base", r / "truncated")
    weights = (r / "truncated" / "model.safetensors").read_bytes()
    (r / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(r / "base", r / "remote")
    config = json.loads((r / "remote" / "config.json").read_text())
    (r / "remote" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM":
                                                                                 "modeling_x.X"}}))
    (r / "remote" / "modeling_x.py").write_text('raise SystemExit("remote code ran")\n')
    shutil.copytree(r / "base", r / "pickle")
    (r / "pickle" / "model.safetensors").rename(r / "pickle" / "pytorch_model.bin")
    save_tiny_checkpoint(r / "other-shape", "llama-mha")
    save_tiny_checkpoint(r / "wide", "llama-gqa", hidden_size=64)  # not the original: another hidden size
    save_tiny_checkpoint(r / "fewer-layers", "llama-gqa", num_hidden_layers=4)
    shutil.copytree(r / "adapter", r / "adapter-truncated", ignore=shutil.ignore_patterns("checkpoints"))
    (r / "adapter-truncated" / "adapter_model.safetensors").write_bytes(b"\x10\x00")  # a download cut short
    # corrupted pruned checkpoints
    for name, corrupt in CORRUPT.items():
        shutil.copytree(r / "pruned", r / name)
        corrupt(r / name)
    shutil.copytree(r / "pruned", r / "tampered")
    config = json.loads((r / "tampered" / "config.json").read_text())
    layers = config["per_layer_config"]
    key = next(iter(layers))
    layers[key]["intermediate_size"] = layers[key]["intermediate_size"] + 3
    (r / "tampered" / "config.json").write_text(json.dumps(config))
    scores = load_file(str(r / "pruned" / "importance.safetensors"))
    scores["layers.1.kv"][0] = float("nan")
    save_file(scores, str(r / "nan-scores.safetensors"))


def _flip(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))


def _manifest_edit(edit):
    def corrupt(folder: Path) -> None:
        m = json.loads((folder / "loram_manifest.json").read_text())
        edit(m)
        (folder / "loram_manifest.json").write_text(json.dumps(m))
    return corrupt


def _wrong_sha(m):
    m["files"]["model.safetensors"] = "0" * 64


def _index_edit(edit):
    """Change the kept-index tensors (and the JSON's counts and tensor hash to match), as a buggy tool would."""
    def corrupt(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        from loram.shared.manifest import MANIFEST_JSON, MANIFEST_TENSORS, sha256_file

        tensors = load_file(str(folder / MANIFEST_TENSORS))
        key = next(k for k in sorted(tensors) if k.endswith("kept_mlp_channels"))
        tensors[key] = edit(tensors[key].clone())
        save_file(tensors, str(folder / MANIFEST_TENSORS), metadata={"format": "pt"})
        data = json.loads((folder / MANIFEST_JSON).read_text())
        for entry in data["pruned_layers"]:
            if f"layers.{entry['layer']}.kept_mlp_channels" == key:
                entry["kept_mlp_channels"] = tensors[key].numel()
        data["tensors"]["sha256"] = sha256_file(folder / MANIFEST_TENSORS)
        (folder / MANIFEST_JSON).write_text(json.dumps(data))
    return corrupt


def _out_of_range(kept):
    kept[-1] = 10_000
    return kept


CORRUPT = {"flipped": _flip, "wrong-sha": _manifest_edit(_wrong_sha),
           "garbage-manifest": lambda f: (f / "loram_manifest.json").write_text("{not json"),
           "bad-counts": _index_edit(lambda kept: kept[:-1]), "bad-index": _index_edit(_out_of_range)}

# name: (argv with {r} for the fixture folder and OUT for the case's output folder, output folder exists
# before (with a file that must survive), extra environment, copy of the trained run to use as OUT)
CASES = {
    "train: empty data, --overwrite": (["train", "{r}/pruned", "--data", "{r}/empty.jsonl", *TRAIN, "--out", "OUT",
                                        "--overwrite"], True, {}, False),
    "train: unknown --targets, --overwrite": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN,
                                               "--targets", "foo", "--out", "OUT", "--overwrite"], True, {}, False),
    "train: missing model, --overwrite": (["train", "{r}/missing", "--data", "{r}/qa.jsonl", *TRAIN, "--out", "OUT",
                                           "--overwrite"], True, {}, False),
    "train: --columns names no column, --overwrite": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN,
                                                       "--columns", "prompt=q,response=answer", "--out", "OUT",
                                                       "--overwrite"], True, {}, False),
    "train: flipped byte in model.safetensors": (["train", "{r}/flipped", "--data", "{r}/qa.jsonl", *TRAIN,
                                                  "--out", "OUT"], False, {}, False),
    "train: wrong sha256 in the manifest": (["train", "{r}/wrong-sha", "--data", "{r}/qa.jsonl", *TRAIN, "--out",
                                             "OUT"], False, {}, False),
    "train: garbage loram_manifest.json": (["train", "{r}/garbage-manifest", "--data", "{r}/qa.jsonl", *TRAIN,
                                            "--out", "OUT"], False, {}, False),
    "train: kept counts disagree with config": (["train", "{r}/bad-counts", "--data", "{r}/qa.jsonl", *TRAIN,
                                                 "--out", "OUT"], False, {}, False),
    "train: kept index out of range": (["train", "{r}/bad-index", "--data", "{r}/qa.jsonl", *TRAIN, "--out", "OUT"],
                                       False, {}, False),
    "recover: flipped byte in the pruned checkpoint": (["recover", "{r}/adapter-b", "--out", "OUT"], False, {},
                                                       False),
    "publish align: flipped byte": (["publish", "align", "{r}/flipped", *ALIGN, "--out", "OUT"], False, {}, False),
    "publish align: garbage manifest": (["publish", "align", "{r}/garbage-manifest", *ALIGN, "--out", "OUT"], False,
                                        {}, False),
    "publish align: empty .jsonl": (["publish", "align", "{r}/pruned", "--data", "{r}/empty.jsonl", "--steps", "1",
                                     "--seq-len", "16", "--out", "OUT"], False, {}, False),
    "publish align: --seq-len above max positions": (["publish", "align", "{r}/pruned", "--data", "{r}/text.txt",
                                                      "--steps", "1", "--seq-len", "99999", "--out", "OUT"], False,
                                                     {}, False),
    "publish align: --warmup -5": (["publish", "align", "{r}/pruned", *ALIGN, "--warmup", "-5", "--out", "OUT"],
                                   False, {}, False),
    "publish align: --lr inf": (["publish", "align", "{r}/pruned", *ALIGN, "--lr", "inf", "--out", "OUT"], False,
                                {}, False),
    "publish align: --distill-from a model of another hidden size": (
        ["publish", "align", "{r}/pruned", *ALIGN, "--distill-from", "{r}/wide", "--out", "OUT"], False, {}, False),
    "train: config.json is not JSON": (["train", "{r}/badjson", "--data", "{r}/qa.jsonl", *TRAIN, "--out", "OUT"],
                                       False, {}, False),
    "generate: truncated model.safetensors": (["generate", "{r}/truncated", *GEN], False, {}, False),
    "train: --out is a file": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN, "--out", "{r}/a-file"],
                               False, {}, False),
    "merge: --out is a file": (["merge", "{r}/recovered", "--out", "{r}/a-file"], False, {}, False),
    "train: --out inside a file": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN, "--out",
                                    "{r}/a-file/adapter"], False, {}, False),
    "train: --warmup -5": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN, "--warmup", "-5", "--out", "OUT"],
                           False, {}, False),
    "train: --steps 2.7": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN[:-4], "--steps", "2.7",
                            "--out", "OUT"], False, {}, False),
    "train: --config with lm_head: maybe": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN, "--config",
                                             "{r}/bad.yaml", "--out", "OUT"], False, {}, False),
    "train: LORAM_THREADS=x": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN, "--out", "OUT"], False,
                               {"LORAM_THREADS": "x"}, False),
    "train: every response empty": (["train", "{r}/pruned", "--data", "{r}/noanswers.jsonl", *TRAIN, "--out",
                                     "OUT"], False, {}, False),
    "train: --resume with another --rank": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN[:-4],
                                             "--steps", "2", "--rank", "4", "--resume", "--out", "OUT"], True, {},
                                            "adapter"),
    "train: --resume with another --lr": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN[:-4], "--steps",
                                           "2", "--lr", "0.5", "--resume", "--out", "OUT"], True, {}, "adapter"),
    "train: --resume at the run's last step": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN, "--resume",
                                                "--out", "OUT"], True, {}, "adapter"),
    "eval: --batch 0": (["eval", "{r}/base", *EVAL, "--batch", "0"], False, {}, False),
    "eval: tampered per_layer_config": (["eval", "{r}/tampered", *EVAL], False, {}, False),
    "eval: adapter never recovered": (["eval", "{r}/base+{r}/adapter", *EVAL], False, {}, False),
    "merge: adapter never recovered": (["merge", "{r}/adapter", "--base", "{r}/base", "--out", "OUT"], False, {},
                                       False),
    "generate: adapter never recovered": (["generate", "{r}/base", "--adapter", "{r}/adapter", *GEN], False, {},
                                          False),
    "merge: --ignore-fingerprint onto another shape": (["merge", "{r}/recovered", "--base", "{r}/other-shape",
                                                        "--ignore-fingerprint", "--out", "OUT"], False, {}, False),
    "generate: --max-new-tokens 0": (["generate", "{r}/base", "--prompt", "hi", "--max-new-tokens", "0"], False, {},
                                     False),
    "generate: --max-new-tokens -5": (["generate", "{r}/base", "--prompt", "hi", "--max-new-tokens", "-5"], False,
                                      {}, False),
    "generate: --prompt ''": (["generate", "{r}/base", "--prompt", "", "--max-new-tokens", "2"], False, {}, False),
    "generate: --temperature -1": (["generate", "{r}/base", *GEN, "--temperature", "-1"], False, {}, False),
    "generate: folder with remote code": (["generate", "{r}/remote", *GEN], False, {}, False),
    "generate: only pytorch_model.bin": (["generate", "{r}/pickle", *GEN], False, {}, False),
    "publish prune: reversed --layers 5:2": (["publish", "prune", "{r}/base", "--method", "l2", "--layers", "5:2", "--out",
                                      "OUT"], False, {}, False),
    "publish prune: --method magic": (["publish", "prune", "{r}/base", "--method", "magic", "--out", "OUT"], False,
                                      {}, False),
    "publish prune: --ratio 1.5": (["publish", "prune", "{r}/base", "--ratio", "1.5", "--out", "OUT"], False, {},
                                   False),
    "publish prune: missing --calib, --overwrite": (["publish", "prune", "{r}/base", "--method", "taylor", "--layers",
                                                     "1:3", "--calib", "{r}/none.txt", "--out", "OUT", "--overwrite"],
                                                    True, {}, False),
    "publish prune: the default --layers 4:-2 on 6 layers": (["publish", "prune", "{r}/base", "--method", "l2",
                                                             "--out", "OUT"], False, {}, False),
    "publish prune: a pruned checkpoint as base": (["publish", "prune", "{r}/pruned", "--method", "l2", "--out",
                                                    "OUT"], False, {}, False),
    "recover: --out is the adapter, --overwrite": (["recover", "{r}/adapter", "--out", "{r}/adapter", "--overwrite"],
                                                   False, {}, False),
    "merge: --out is --base, --overwrite": (["merge", "{r}/recovered", "--base", "{r}/base", "--out", "{r}/base",
                                             "--overwrite"], False, {}, False),
    "recover: truncated adapter_model.safetensors": (["recover", "{r}/adapter-truncated", "--out", "OUT"], False, {},
                                                     False),
    "merge: --ignore-fingerprint onto fewer layers": (["merge", "{r}/recovered", "--base", "{r}/fewer-layers",
                                                       "--ignore-fingerprint", "--out", "OUT"], False, {}, False),
    "recover: --fill normall": (["recover", "{r}/adapter", "--fill", "normall", "--out", "OUT"], False, {}, False),
    "recover: not an adapter, --overwrite": (["recover", "{r}/pruned", "--out", "OUT", "--overwrite"], True, {},
                                             False),
    "merge: --dtype int4": (["merge", "{r}/recovered", "--dtype", "int4", "--out", "OUT"], False, {}, False),
    "plan: --kind semi": (["plan", "{r}/base", "--kind", "semi"], False, {}, False),
    "demo: --out is a file": (["demo", "--out", "{r}/a-file"], False, {}, False),
    "demo: --publish-to not a URL": (["demo", "--publish-to", "localhost", "--out", "OUT"], False, {}, False),
    "plan: the default --layers 4:-2 on 6 layers": (["plan", "{r}/base"], False, {}, False),
    "generate: prompt + --max-new-tokens past the positions": (["generate", "{r}/base", "--prompt", "hi",
                                                               "--max-new-tokens", "500"], False, {}, False),
    "merge: --max-shard-size -5GB": (["merge", "{r}/recovered", "--max-shard-size", "-5GB", "--out", "OUT"], False,
                                     {}, False),
    "eval: MODEL+ (no adapter)": (["eval", "{r}/base+", *EVAL], False, {}, False),
    "pull: --out is HF_HOME, --overwrite": (["pull", "org/name", "--out", "OUT", "--overwrite"], True,
                                           {"HF_HOME": "OUT"}, False),
    "publish push: --tag ''": (["publish", "push", "{r}/pruned", "--repo-id", "org/name", "--tag", ""], False, {},
                               False),
    "publish prune: --scores with a NaN": (["publish", "prune", "{r}/base", "--method", "l2", "--layers", "1:3",
                                            "--scores", "{r}/nan-scores.safetensors", "--out", "OUT"], False, {},
                                           False),
    "publish prune: calibration --seq-len past the positions": (["publish", "prune", "{r}/base", "--method", "wanda",
                                                                 "--sparsity", "0.5", "--calib", "{r}/text.txt",
                                                                 "--seq-len", "4096", "--out", "OUT"], False, {},
                                                                False),
    "train: --config with a numeric key": (["train", "{r}/pruned", "--data", "{r}/qa.jsonl", "--config",
                                            "{r}/intkey.yaml", "--out", "OUT"], False, {}, False),
    "eval: two models under one name": (["eval", "a={r}/base", "a={r}/base+{r}/recovered", *EVAL], False, {},
                                        False),
    "recover: --out . --overwrite in a folder with files": (["recover", "{r}/adapter", "--out", ".", "--overwrite"],
                                                            True, {}, False),
    "train: an unknown flag": (["train", "{r}/pruned", "--stepz", "3"], False, {}, False),
    "eval: an adapter on another pruned checkpoint of its shapes": (["eval", "{r}/pruned-other+{r}/adapter", *EVAL],
                                                                    False, {}, False),
    "publish prune: --ratio 0": (["publish", "prune", "{r}/base", "--method", "l2", "--ratio", "0", "--layers", "1:3",
                                  "--out", "OUT"], False, {}, False),
    "generate: a recovered adapter on the pruned checkpoint": (["generate", "{r}/pruned", "--adapter", "{r}/recovered",
                                                                *GEN], False, {}, False),
    "publish selfgen: a pruned checkpoint as MODEL": (["publish", "selfgen", "{r}/pruned", "--prompts", "{r}/asks.txt",
                                                       "--out", "{r}/never.jsonl"], False, {}, False),
    "plan: --device-memory 0": (["plan", "{r}/base", "--device-memory", "0GiB"], False, {}, False),
    "train --resume after a killed --overwrite run stopped before a checkpoint": (
        ["train", "{r}/pruned", "--data", "{r}/qa.jsonl", *TRAIN, "--out", "{r}/adapter-k", "--resume"], False, {},
        False),
}


def run_case(r: Path, name: str) -> dict:
    argv, exists, env, copy = CASES[name]
    work = Path(tempfile.mkdtemp(prefix="case-", dir=r))
    out = work / "out"
    if copy:
        shutil.copytree(r / copy, out)
    elif exists:
        out.mkdir()
        (out / "precious.txt").write_text("do not lose me")
    watched = {p: file_tree(p) for p in (out, r / "a-file") if p.is_dir()}
    before = sorted(p.name for p in work.iterdir())
    args = [str(out) if a == "OUT" else a.replace("{r}", str(r)) for a in argv]
    env = {k: str(out) if v == "OUT" else v for k, v in env.items()}
    started = time.time()
    proc = run_loram(*args, cwd=work, **env)
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "warning:"))]
    kept = all(file_tree(p) == tree for p, tree in watched.items()) and (
        proc.returncode == 0 or sorted(p.name for p in work.iterdir()) == before)
    return {"case": name, "command": "loram " + " ".join(a.replace(str(r), "R").replace(str(work), "W")
                                                          for a in args),
            "exit": proc.returncode, "line": (lines or proc.stderr.strip().splitlines()[-1:] or [""])[0]
            .replace(str(work), "W").replace(str(r), "R"), "error_lines": len(lines),
            "traceback": "Traceback" in proc.stderr, "kept": kept, "seconds": round(time.time() - started, 1)}


def table(rows: list[dict]) -> str:
    out = ["| # | case | exit | what it prints | nothing lost or left |", "|---|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        line = row["line"].replace("|", "\\|")
        out.append(f"| {i} | {row['case']} | {row['exit']} | `{line}` | "
                   f"{'yes' if row['kept'] and not row['traceback'] else 'NO'} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reliability_sweep.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = Path(tmp)
        fixtures(r)
        with ThreadPoolExecutor(args.workers) as pool:
            rows = list(pool.map(lambda name: run_case(r, name), CASES))
    bad = [row for row in rows if row["traceback"] or not row["kept"] or row["error_lines"] > 1
           or (row["exit"] != 0 and not row["line"].startswith("error:"))]
    text = (f"# Reliability sweep\n\n`python benchmarks/reliability_sweep.py`: {len(rows)} cases, "
            f"{sum(r['exit'] == 2 for r in rows)} refused with exit 2, {sum(r['exit'] == 0 for r in rows)} ran "
            f"(with a warning where one is due); {len(bad)} not one clean line or losing data. R = the fixture "
            "folder, W = the case's working folder.\n\n" + table(rows) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    summary = {"cases": len(rows), "refused": sum(r["exit"] == 2 for r in rows),
               "ran": sum(r["exit"] == 0 for r in rows), "bad": len(bad), "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text)
    if bad:
        print("cases that failed the rule:", ", ".join(r["case"] for r in bad), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
