"""LoRA on the original vs LoRAM on the pruned model (SmolLM2-135M), and `loram train`'s own overhead.

Side by side in one run, each configuration in a fresh process (peak memory is that process's):
original / pruned at 0.5 / pruned at 0.75, each in fp32 and nf4, trained by `loram train` on the
GSM8K fine-tune split (batch 4 x 256 tokens, r = 8, seven projections). Step time is the median
over steps 2..N (step 1 includes warm-up). Then `loram train` against a plain peft + Trainer script
with the same model, data, settings and checkpointing on the ratio-0.5 model.
Usage: python benchmarks/train_loram.py [--steps 5]
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _common import machine, run_measured, write

TRAIN = """
import json, loram
from loram.train import train
r = train(model={model!r}, data='gsm8k-train', columns='prompt=question,response=answer', out={out!r},
          quant={quant!r}, steps={steps}, batch=4, seq_len=256, save_every=1000, seed=0)
result = dict(steps=r.report['step_seconds'], tokens_per_second=r.tokens_per_second,
              peak=r.peak_memory_bytes, trainable=r.trainable_params, loss=r.losses[-1], losses=r.losses)
"""

PLAIN = """
import time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, TrainerCallback
import loram
from loram.shared.records import load_records
from loram.sft_format import SFTCollator, parse_columns, tokenize_sft
from loram.shared.runtime import configure_threads
loram.register()
configure_threads()
tok = AutoTokenizer.from_pretrained({model!r})
data = tokenize_sft(load_records('gsm8k-train'), tok, 256, parse_columns('prompt=question,response=answer'))
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32),
    LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type='CAUSAL_LM',
               target_modules=['q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj']))
times = []
class T(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.time()
    def on_step_end(self, *a, **k): times.append(time.time() - self.t)
args = TrainingArguments(output_dir={out!r}, max_steps={steps}, per_device_train_batch_size=4, learning_rate=2e-4,
    lr_scheduler_type='cosine', logging_steps=1, save_steps=1000, seed=0, data_seed=0, report_to=[], use_cpu=True,
    remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=data, data_collator=SFTCollator.for_tokenizer(tok), callbacks=[T()]).train()
result = dict(steps=times)
"""

PRUNE = """
import loram
from loram.publisher.prune import prune
prune(base={base!r}, out={out!r}, method='taylor', ratio={ratio})
result = dict()
"""


def median_step(r: dict) -> float:
    return statistics.median(r["steps"][1:] or r["steps"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from loram.shared import assets

    base = str(assets.model_dir())
    rows, data = [], {"machine": machine(), "steps": args.steps, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"original": base}
        for ratio in (0.5, 0.75):
            out = str(Path(tmp) / f"p{ratio}")
            run_measured(PRUNE.format(base=base, out=out, ratio=ratio))
            models[f"LoRAM {ratio}"] = out
        for quant in ("none", "nf4"):
            for name, path in models.items():
                out = str(Path(tmp) / f"{name}-{quant}".replace(" ", "_"))
                r = run_measured(TRAIN.format(model=path, out=out, quant=quant, steps=args.steps))
                data["runs"][f"{name} / {quant}"] = r
                rows.append((name, quant, r))
                print(name, quant, round(median_step(r), 2), r["peak_rss_mib"], flush=True)
        pruned = models["LoRAM 0.5"]
        ours = run_measured(TRAIN.format(model=pruned, out=str(Path(tmp) / "ours"), quant="none", steps=args.steps))
        plain = run_measured(PLAIN.format(model=pruned, out=str(Path(tmp) / "plain"), steps=args.steps))
        data["overhead"] = {"loram_train": ours, "plain_peft_trainer": plain,
                            "ratio": round(median_step(ours) / median_step(plain), 3)}
    table = [f"# LoRA vs LoRAM training on SmolLM2-135M (batch 4 x 256, r = 8, {args.steps} steps, CPU)", "",
             "| model | base precision | trainable params | step time (s) | tokens/s | peak RSS (MiB) | "
             "step time vs LoRA | peak vs LoRA |", "|---|---|---|---|---|---|---|---|"]
    for name, quant, r in rows:
        ref = data["runs"][f"original / {quant}"]
        table.append(f"| {name} | {quant} | {r['trainable']:,} | {median_step(r):.2f} | {r['tokens_per_second']:.0f} | "
                     f"{r['peak_rss_mib']:,.0f} | {median_step(r) / median_step(ref):.2f}x | "
                     f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x |")
    o = data["overhead"]
    table += ["", f"`loram train` vs a plain peft + Trainer script (LoRAM 0.5, fp32): median step "
              f"{median_step(o['loram_train']):.2f} s vs {median_step(o['plain_peft_trainer']):.2f} s, "
              f"ratio **{o['ratio']:.3f}** (target <= 1.05)."]
    write("train_loram", json.loads(json.dumps(data)), table)


if __name__ == "__main__":
    main()
