"""The demo's report: the result table, what it shows (docs/method.md §8 points 1-3), plots, report.md.

Point 1: PPL(original, no FT) > PPL(LoRAM) >= PPL(LoRA on the original), in-domain.
Point 2: PPL(pruned + its adapter, no recovery) >> PPL(LoRAM).
Point 3: alignment lowers LoRAM's PPL, on both sets.
Each is checked on the numbers of this run and stated plainly, holding or not.
"""

import json
from pathlib import Path

from loram.shared.outputs import atomic_file

ORIGINAL = "original, no fine-tuning"
LORAM = "LoRAM (aligned): recovered adapter on the original"
UNALIGNED = "LoRAM without alignment"
SMALL = "pruned + its adapter (train small, infer small)"
PRUNED = "pruned (aligned), no fine-tuning"
LORA = "LoRA on the original (upper bound)"
DATA = {"gsm8k-heldout": "GSM8K held-out (in-domain)", "news": "news (out-of-domain)"}


def pivot(report: dict) -> list[dict]:
    """One row per variant: perplexity on each evaluation set."""
    rows: dict[str, dict] = {}
    for r in report["results"]:
        rows.setdefault(r["variant"], {"variant": r["variant"]})[r["data"]] = r["perplexity"]
    return list(rows.values())


def perplexity_table(report: dict) -> dict[tuple[str, str], float]:
    """(variant, data) -> perplexity of every evaluated pair."""
    return {(r["variant"], r["data"]): r["perplexity"] for r in report["results"]}


def verdicts(report: dict) -> list[tuple[str, bool, str]]:
    ppl = perplexity_table(report)
    out = []
    for data in DATA:
        o, lm, lo = ppl[(ORIGINAL, data)], ppl[(LORAM, data)], ppl[(LORA, data)]
        out.append((f"1 ({data})", o > lm >= lo, f"original {o:.3f} {'>' if o > lm else '<='} LoRAM {lm:.3f} "
                                                 f"{'>=' if lm >= lo else '<'} LoRA on the original {lo:.3f}"))
    s, lm = ppl[(SMALL, "gsm8k-heldout")], ppl[(LORAM, "gsm8k-heldout")]
    out.append(("2", s > 2 * lm, f"train small, infer small {s:.3f} {'>>' if s > 2 * lm else 'is not >>'} LoRAM "
                                 f"{lm:.3f} ({s / lm:.1f}x)"))
    for data in DATA:
        a, u = ppl[(LORAM, data)], ppl[(UNALIGNED, data)]
        out.append((f"3 ({data})", a < u, f"LoRAM with alignment {a:.3f} {'<' if a < u else '>='} without {u:.3f}"))
    return out


def no_gap_left(report: dict, enough: float = 0.9) -> list[str]:
    """Why point 3 fails on a set where there was nothing for alignment to win: LoRAM without alignment already
    closes at least `enough` of the original -> LoRA gap there."""
    ppl = perplexity_table(report)
    out = []
    for data in DATA:
        unaligned = gap_closed(ppl, data, UNALIGNED)
        if ppl[(LORAM, data)] >= ppl[(UNALIGNED, data)] and unaligned >= enough:
            out.append(f"Point 3 ({data}): LoRAM without alignment already closes {unaligned:.0%} of the gap to LoRA "
                       f"on the original there (aligned: {gap_closed(ppl, data, LORAM):.0%}), so no gap is left for "
                       f"alignment to close (aligned minus unaligned: {ppl[(LORAM, data)] - ppl[(UNALIGNED, data)]:+.3f}).")
    return out


MORE = {"gsm8k-heldout": 100, "news": 50}  # records per set that separate alignment's effect in the grid
MORE_FLAGS = {"gsm8k-heldout": "--eval-limit", "news": "--news-limit"}
RECORDS = {"gsm8k-heldout": "GSM8K items", "news": "news documents"}


def evaluated(report: dict) -> dict[str, int | None]:
    """Records evaluated per set (None in a report written before the demo recorded them)."""
    return {"gsm8k-heldout": report.get("eval_items"), "news": report.get("news_docs")}


def more_items(report: dict, checks: list) -> list[str]:
    """Where point 3 fails on a few records: how to re-evaluate this run's models on more, reusing every trained stage."""
    now = evaluated(report)
    failing = [point for point, holds, _ in checks if point.startswith("3") and not holds]
    fewer = [data for data, n in now.items() if n is not None and n < MORE[data] and f"3 ({data})" in failing]
    if not fewer:
        return []
    flags = " ".join(f"{MORE_FLAGS[data]} {MORE[data]}" for data in fewer)
    more = " and ".join(f"{MORE[data]} {RECORDS[data]}" for data in fewer)
    return [f"Point 3 compares small differences on {now['gsm8k-heldout']} GSM8K items and {now['news']} news "
            f"documents: the same `loram demo` command with `{flags}` re-evaluates these models on {more} and reuses "
            f"every other stage: only the evaluation runs again."]


def memory_lines(report: dict) -> list[str]:
    p, t = report["prune"], report["training"]
    mib = {k: (v.get("peak_memory_bytes") or 0) / 2**20 for k, v in t.items()}
    params = {k: v.get("trainable_params") for k, v in t.items()}
    return [
        f"parameters: original {p['original_params']:,}, pruned {p['pruned_params']:,}: {p['reduction']:.2f}x fewer "
        f"({p['reduction_4bit']:.2f}x counting 4-bit weights as 1/4, the paper's QLoRAM convention)",
        f"peak training memory ({report['quant']}, process peak RSS on CPU): LoRAM {mib['train-loram']:,.0f} MiB vs "
        f"LoRA on the original {mib['train-lora']:,.0f} MiB ({mib['train-loram'] / max(mib['train-lora'], 1):.2f}x); "
        f"trainable LoRA parameters {params['train-loram']:,} vs {params['train-lora']:,}",
    ]


def _plots(report: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return []
    names = []
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = {"train-loram": "LoRAM (aligned pruned model)", "train-loram-unaligned": "LoRAM (unaligned)",
              "train-lora": "LoRA on the original"}
    for key, label in labels.items():
        losses = report["training"][key].get("losses") or []
        ax.plot([x["step"] for x in losses], [x["loss"] for x in losses], label=label)
    ax.set(xlabel="step", ylabel="training loss (response tokens)", title="LoRA training on GSM8K")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are whole (2 steps: no 1.2)
    ax.legend()
    fig.tight_layout()
    with atomic_file(out / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    names.append("loss.png")
    fig = _gap_plot(report, plt)
    with atomic_file(out / "gap.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    names.append("gap.png")
    return names


def gap_closed(ppl: dict[tuple[str, str], float], data: str, variant: str) -> float:
    """Fraction of the original -> LoRA-on-the-original perplexity gap that `variant` closes on `data`
    (`ppl`: `perplexity_table(report)`)."""
    o, lo = ppl[(ORIGINAL, data)], ppl[(LORA, data)]
    return (o - ppl[(variant, data)]) / (o - lo) if o != lo else float("nan")


FINE_TUNED = {LORAM: "#1f77b4", UNALIGNED: "#9ecae1", LORA: "#2ca02c"}


def _gap_plot(report: dict, plt):
    """Per evaluation set, each fine-tuned variant's perplexity change from the original (linear scale), labelled
    with the share of the original -> LoRA gap it closes: the differences that matter are a few percent."""
    ppl = perplexity_table(report)
    fig, axes = plt.subplots(1, len(DATA), figsize=(11, 3.2))
    for ax, (data, title) in zip(axes, DATA.items(), strict=True):
        o = ppl[(ORIGINAL, data)]
        deltas = [ppl[(v, data)] - o for v in FINE_TUNED]
        ax.barh(range(len(FINE_TUNED)), deltas, color=list(FINE_TUNED.values()))
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(FINE_TUNED)), list(FINE_TUNED) if data == "gsm8k-heldout" else [""] * len(FINE_TUNED),
                      fontsize=8)
        ax.invert_yaxis()
        ax.set(title=f"{title}: original {o:.3f}", xlabel="perplexity minus the original's (lower is better)")
        for i, (v, d) in enumerate(zip(FINE_TUNED, deltas, strict=True)):
            ax.text(d, i, f" {d:+.3f} ({gap_closed(ppl, data, v):.0%} of the gap)", va="center", fontsize=8,
                    ha="left" if d >= 0 else "right")
        lo = min(deltas + [0.0])
        ax.set_xlim(lo * 1.9 - 0.01, max(deltas + [0.0]) + abs(lo) * 0.4 + 0.01)
    fig.tight_layout()
    return fig


def _align_text(report: dict) -> str:
    """What the alignment read, in words."""
    generated = report.get("selfgen")
    if not generated:  # a report written before the demo aligned on self-generated text
        return "the Wikipedia sample in the chat template"
    return (f"the Wikipedia sample in the chat template and {generated['conversations']} worked math problems the "
            "original wrote itself (`loram publish selfgen --prompts math`), half and half")


def _reused(report: dict) -> str:
    """How much of the run an earlier run did: a re-run's wall time alone reads like the whole demo's."""
    stages = report["stages"].values()
    reused = [s for s in stages if s["reused"]]
    if not reused:
        return ""
    return (f" for this run, which reused {len(reused)} of {len(stages)} stages from an earlier one (they took "
            f"{sum(s['seconds'] for s in reused):.0f} s then; the stage table below)")


def _sizes(report: dict) -> str:
    """What was evaluated, with the record counts when the report has them."""
    items, docs = evaluated(report).values()
    if items is None or docs is None:
        return "held-out GSM8K and on news text"
    asked = report.get("eval_items_asked")
    of = f" (of the first {asked}: the others keep no response token within --seq-len)" if asked and asked > items else ""
    return f"{items} held-out GSM8K items{of} and {docs} news documents"


def render(report: dict, plots: list[str]) -> str:
    cfg = report["config"]
    lines = ["# LoRAM demo report", "",
             f"SmolLM2-135M-Instruct, structured Taylor pruning at ratio {cfg['ratio']}, aligned for "
             f"{report['align']['steps']} steps on {_align_text(report)}, {report['quant']} LoRA (r=8) on the GSM8K fine-tune "
             f"split; response-token perplexity on {_sizes(report)}. Wall time "
             f"{report['wall_time_s']:.0f} s{_reused(report)}"
             f"{' (--quick: a smoke run, numbers are not meaningful)' if cfg['quick'] else ''}.",
             "", "| variant | " + " | ".join(DATA.values()) + " |", "|---|" + "---|" * len(DATA)]
    for r in pivot(report):
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r.get(d, float('nan')):.3f}" for d in DATA) + " |")
    lines += ["", "Share of the gap from the original to LoRA on the original that each fine-tuned variant closes "
              "(0% = no better than the original, 100% = LoRA on the original):", "",
              "| variant | " + " | ".join(DATA.values()) + " |", "|---|" + "---|" * len(DATA)]
    ppl = perplexity_table(report)
    lines += [f"| {v} | " + " | ".join(f"{gap_closed(ppl, d, v):.0%}" for d in DATA) + " |" for v in (LORAM, UNALIGNED)]
    lines += ["", "## What it shows (docs/method.md §8)", ""]
    checks = verdicts(report)
    for point, holds, text in checks:
        lines.append(f"- Point {point}: {'holds' if holds else 'does NOT hold'}: {text}.")
    lines += [f"- {reason}" for reason in no_gap_left(report)]
    lines += [f"- {line}" for line in more_items(report, checks)]
    if not all(holds for _, holds, _ in checks):
        lines.append("- Why a point can fail at this scale and these settings, and longer runs where it holds: "
                     "docs/demo.md of the LoRAM repository.")
    lines += ["", "## Size and memory", "", *[f"- {line}" for line in memory_lines(report)]]
    perplexities = report["align"].get("perplexities") or []
    if perplexities:
        first, last = perplexities[0], perplexities[-1]
        lines.append(f"- alignment: held-out Wikipedia perplexity of the pruned model {first['perplexity']:.2f} "
                     f"(step {first['step']}) -> {last['perplexity']:.2f} (step {last['step']})")
    if plots:
        lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in plots]]
    lines += ["", "## Stages", "", "| stage | seconds | reused |", "|---|---|---|"]
    lines += [f"| {n} | {s['seconds']} | {'yes' if s['reused'] else 'no'} |" for n, s in report["stages"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path, cfg) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out)
    with atomic_file(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(render(report, plots))
    cfg.save(out / "demo_config.yaml")
