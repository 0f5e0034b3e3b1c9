"""The readable publisher section of `loram plan` (Taylor pruning, alignment with DDP and FSDP): tables and verdicts.

The numbers come from `loram.publisher_plan`; `--json` prints `PublisherPlan.to_dict()` instead.
"""

import typer

from loram.accounting import gib
from loram.publisher_plan import MAX_DEVICES, Estimate, PublisherPlan
from loram.shared.cli_support import print_table

TAYLOR_TERMS = (("weights", "weights"), ("gradients", "gradients (one layer)"), ("activations", "activations"),
                ("overhead", "runtime overhead"), ("slack", "allocator slack"))
ALIGN_TERMS = (("weights", "weights (fp32)"), ("gradients", "gradients (fp32)"), ("optimizer", "AdamW states"),
               ("buckets", "DDP gradient buckets"), ("working", "bf16 copies / gathered units"),
               ("checkpoint", "checkpoint save"), ("teacher", "teacher (the original)"), ("activations", "activations"),
               ("overlap", "freed by backward"), ("overhead", "runtime overhead"), ("slack", "allocator slack"))


def taylor_rows(e: Estimate) -> list[dict]:
    rows = [(label, e.terms[key]) for key, label in TAYLOR_TERMS] + [("total", e.total_bytes)]
    return [{"memory": name, "MiB": f"{v / 2**20:,.1f}", "GiB": f"{gib(v):.2f}",
             "share": f"{100 * v / e.total_bytes:.1f}%"} for name, v in rows]


def align_columns(pub: PublisherPlan) -> list[tuple[str, Estimate]]:
    """DDP on one device and on N >= 2 (one column: the same for every N >= 2), then FSDP for each N."""
    columns = []
    single = [e for e in pub.ddp if e.devices == 1]
    multi = [e for e in pub.ddp if e.devices > 1]
    if single:
        columns.append(("DDP 1", single[0]))
    if multi:
        columns.append((f"DDP {multi[0].devices}" + ("+" if len(multi) > 1 else ""), multi[0]))
    columns += [(f"FSDP {e.devices}", e) for e in pub.fsdp]
    return columns


def align_rows(pub: PublisherPlan) -> list[dict]:
    columns = align_columns(pub)
    used = [(k, label) for k, label in ALIGN_TERMS if any(e.terms[k] for _, e in columns)]
    rows = [{"GiB per device": label, **{name: f"{gib(e.terms[k]):.2f}" for name, e in columns}} for k, label in used]
    rows.append({"GiB per device": "total", **{name: f"{gib(e.total_bytes):.2f}" for name, e in columns}})
    if pub.budget_bytes is not None:
        rows.append({"GiB per device": "fits", **{name: "yes" if e.fits else "no" for name, e in columns}})
    return rows


def verdicts(pub: PublisherPlan, device_memory: str | None) -> list[str]:
    if pub.budget_bytes is None:
        return []
    size = f"{device_memory} ({gib(pub.budget_bytes):.2f} GiB)"
    lines = []
    if pub.taylor is not None:
        margin = gib(abs(pub.budget_bytes - pub.taylor.total_bytes))
        lines.append(f"Taylor pruning on one device of {size}: "
                     + (f"fits, {margin:.2f} GiB to spare" if pub.taylor.fits else f"does not fit, {margin:.2f} GiB over"))
    fit = [e.devices for e in pub.ddp if e.fits]
    if not fit:
        ddp = "does not fit at any N"
    elif len(fit) == len(pub.ddp):
        ddp = "fits at every N planned"
    else:
        ddp = (f"fits at N = {', '.join(map(str, fit))}; not at N = "
               + ", ".join(str(e.devices) for e in pub.ddp if not e.fits) + " (N >= 2 adds DDP's gradient buckets)")
    lines.append(f"DDP alignment on devices of {size}: {ddp}")
    n = pub.fsdp_min_devices
    if n is None:
        lines.append(f"FSDP alignment: does not fit on up to {MAX_DEVICES} devices of {size}")
    else:
        pow2 = pub.to_dict()["align"]["fsdp_min_devices_pow2"]
        lines.append(f"FSDP alignment: smallest N = {n} device{'s' if n > 1 else ''} of {size} (any whole N; as a "
                     f"power of two: {pow2})")
    return lines


def print_publisher(pub: PublisherPlan, device_memory: str | None) -> None:
    """The publisher section, after the consumer's memory section."""
    where = "GPU memory per device" if pub.device == "cuda" else "peak RSS per process"
    typer.echo(f"\npublisher memory ({pub.device}: {where}):")
    t = pub.taylor_options
    if pub.taylor is None:
        typer.echo("\nTaylor pruning: not estimated (a pruned checkpoint, or non-structured pruning)")
    else:
        typer.echo(f"\nTaylor pruning of the stock model ({t['dtype']} weights, layers [{t['layers'][0]}, "
                   f"{t['layers'][1]}); {t['samples']} x {t['seq_len']} calibration tokens, {t['calib_batch']} "
                   "rows per chunk, backpropagated layer by layer):\n")
        print_table(taylor_rows(pub.taylor))
    a, facts = pub.align_options, pub.extra
    typer.echo(f"\nalignment of the pruned model ({facts['params']:,} parameters, {facts['trained_params']:,} "
               f"trained, lm_head {a['lm_head']}; AdamW; {a['weights']}; batch {a['batch']} x {a['seq_len']} "
               f"tokens per device, {a['grad_accum']} per step; gradient checkpointing "
               f"{'on' if a['gradient_checkpointing'] else 'off'}):\n")
    print_table(align_rows(pub))
    lines = verdicts(pub, device_memory)
    if lines:
        typer.echo("")
        for line in lines:
            typer.echo(line)
