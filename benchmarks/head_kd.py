"""A candidate alignment objective, measured by the alignment grid and not (yet) in `loram publish align`.

Hidden-state matching for the pruned layers, logit distillation for the layers after them, each term training only
its own layers. The default objective matches the pruned layers' outputs; the layers after the pruned range (28
and 29 of SmolLM2) stay the original's and get no gradient. They then run on a residual stream that is close to
the original's but not equal, and the aligned model's predictions stay far from the original's (GSM8K response
perplexity 16.6 against 4.0 in the demo). A consumer's adapter learns from the error of those predictions: most of
what it learns on the pruned model repairs them (the pruned model with its own adapter: 11.2), and that repair does
not transfer. Here the layers after the pruned range learn to turn the pruned model's stream into the original's
output distribution, so the error a consumer's fine-tuning starts from is closer to the one it meets on the
original:

    loss = w_hidden * (hidden-state loss at the pruned layers) + w_kd * KL(teacher || student)

with the input of the first layer after the pruned range detached during training, so that the KL term trains only
that layer, the ones after it and the final norm (lm_head stays frozen, align's default), and the hidden-state term
only the layers up to the pruned range's end. Align's own flags set the weights (`--kd-weight 0.5 --hidden-weight
0.5`: the LM term's weight, 1 - both, is then 0). The extra cost is logit distillation's: both models project every
position onto the vocabulary.

    python benchmarks/head_kd.py -- publish align PRUNED --distill-from BASE --kd-weight 0.5 --hidden-weight 0.5 \\
        --hidden-layers pruned --data wiki-chat:1 --data math.jsonl:1 --steps 80 --batch 1 ... --out ALIGNED

The arguments after `--` are those of `loram publish align` (one process, a structured pruned model). The output is
an ordinary aligned checkpoint (its manifest records the KD and hidden weights; the detached boundary is this
script's).
"""

import sys

from _common import align_argv, before_first_loss, run_loram, structured_manifest


def detach_input(layer):
    """A forward pre-hook on `layer`: in training mode its input leaves the graph (nothing downstream trains what
    comes before it). Returns the hook's handle."""
    def hook(module, args):
        if module.training:
            return (args[0].detach(), *args[1:])
        return None
    return layer.register_forward_pre_hook(hook)


def main() -> None:
    argv = align_argv(sys.argv[1:], "head_kd.py -- publish align PRUNED --kd-weight W --hidden-weight W ... "
                                    "(see the docstring)")
    boundary = max(structured_manifest(argv, "head_kd.py").pruned_layers) + 1

    def cut(model) -> None:
        layers = model.model.layers
        if boundary >= len(layers):
            raise SystemExit(f"head_kd.py: no decoder layer after the pruned range (it ends at layer {boundary - 1})")
        detach_input(layers[boundary])
        print(f"head_kd: the KL term trains layers {boundary}..{len(layers) - 1} and the final norm; the "
              f"hidden-state term the layers before", file=sys.stderr)
    before_first_loss(cut)
    run_loram(argv)


if __name__ == "__main__":
    main()
