"""A candidate alignment objective, measured by the alignment grid and not (yet) in `loram publish align`.

Gradient matching: the adapter a consumer trains is driven by the gradient of the fine-tuning loss with respect
to each adapted weight, and the grid's adapter-agreement measurement puts LoRAM's loss there (the pruned model's
gradient in the layers before the pruned range agrees with the original's at a cosine of 0.04). This objective
trains the pruned model so that, on the alignment text, its LM-loss gradient with respect to every decoder
linear weight (q, k, v, o, gate, up, down of every layer) points where the original's does, restricted to the
positions the pruned model keeps (the kept rows or columns of a pruned layer's matrix):

    loss = hidden-state loss (the default objective: MSE at the pruned layers' outputs)
           + WEIGHT * mean over the modules of (1 - cos(dL_pruned / dW, (dL_original / dW)[kept]))

Each step costs one forward and backward of the original (its gradient), and a forward, a backward with
`create_graph` and the backward of that (second order) through the pruned model: about 4.3x the default's
time per token on SmolLM2 and 2.2x its peak memory (10.07 s against 2.34 s per 512 tokens, 6,077 MiB against 2,792,
side by side in objective_cost.py). Attention runs the eager implementation (SDPA's CPU kernel has no double backward).

    python benchmarks/gradient_matching.py --weight 1 -- publish align PRUNED --data wiki-chat --steps 40 \\
        --distill-from base --kd-weight 0 --hidden-weight 1 --hidden-layers pruned ... --out ALIGNED

`--match residual` compares instead the gradient with respect to each layer's output, at every position
(ResidualGradientMatch; 29.6% on the demo's text, no better than none).

The arguments after `--` are those of `loram publish align` (one process; `--fsdp` is not supported here).
The output is an ordinary aligned checkpoint (its manifest record says the hidden-state objective; the
gradient term is this script's). The grid runs it for the objectives in `alignment_grid.PROTOTYPES`.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from _common import align_argv, run_loram

from loram.publisher import align_trainer
from loram.publisher.distill import hidden_sum
from loram.shared.architectures import PRUNED_MODULES
from loram.shared.manifest import Manifest


class GradientMatch:
    """The patched `AlignTrainer.compute_loss`: hidden-state loss + weight x gradient disagreement."""

    def __init__(self, weight: float, pruned: str):
        self.weight, self.pruned = weight, pruned
        self.pairs: list | None = None  # (student weight, teacher weight, kept rows, kept columns) per module
        self.plain = align_trainer.AlignTrainer.compute_loss

    def setup(self, trainer, model) -> None:
        if trainer.teacher is None or trainer._hidden is None:
            raise SystemExit("gradient_matching.py needs --distill-from and --hidden-weight > 0")
        for m in (model, trainer.teacher):
            m.config._attn_implementation = "eager"  # double backward through attention
        self.pairs = self.paired_weights(model, trainer.teacher)

    def paired_weights(self, model, teacher) -> list:
        """(student weight, teacher weight, kept rows, kept columns) of every decoder linear module."""
        manifest = Manifest.load(self.pruned)
        pruned = set(manifest.pruned_layers)
        pairs = []
        for i, (s_layer, t_layer) in enumerate(zip(model.model.layers, teacher.model.layers, strict=True)):
            for mod in PRUNED_MODULES:
                rows, cols = manifest.kept_indices(i, mod.path) if i in pruned else (None, None)
                pairs.append((s_layer.get_submodule(mod.path).weight, t_layer.get_submodule(mod.path).weight,
                              rows, cols))
        return pairs

    def teacher_gradients(self, teacher, ids: torch.Tensor) -> list[torch.Tensor]:
        """The original's LM-loss gradients, at the positions the pruned model keeps."""
        weights = [t for _, t, _, _ in self.pairs]
        for w in weights:
            w.requires_grad_(True)
        try:
            grads = torch.autograd.grad(teacher(input_ids=ids, labels=ids).loss, weights)
        finally:
            for w in weights:
                w.requires_grad_(False)
        return [g[r] if r is not None else g[:, c] if c is not None else g
                for g, (_, _, r, c) in zip(grads, self.pairs, strict=True)]

    def student_gradients(self, model, ids: torch.Tensor):
        """The pruned model's output and its LM-loss gradients, differentiable (second order)."""
        out = model(input_ids=ids, labels=ids)
        return out, torch.autograd.grad(out.loss, [s for s, _, _, _ in self.pairs], create_graph=True)

    def __call__(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the LM loss, as align reports it
            return self.plain(trainer, model, inputs, return_outputs, num_items_in_batch)
        if self.pairs is None:
            self.setup(trainer, model)
        ids = inputs["input_ids"]
        trainer._hidden[1].capturing = True
        try:
            with torch.enable_grad():
                target = self.teacher_gradients(trainer.teacher, ids)
        finally:
            trainer._hidden[1].capturing = False
        teacher_hidden = {k: v.detach() for k, v in trainer._hidden[1].take().items()}
        trainer._hidden[0].capturing = True
        try:
            out, grads = self.student_gradients(model, ids)
        finally:
            trainer._hidden[0].capturing = False
        disagreement = torch.stack([1 - F.cosine_similarity(g.flatten(), t.flatten(), dim=0, eps=1e-20)
                                    for g, t in zip(grads, target, strict=True)]).mean()
        b, t = ids.shape
        hidden = hidden_sum(trainer._hidden[0].take(), teacher_hidden, trainer.hidden_loss) / (b * (t - 1))
        trainer._parts["hidden_loss"].append(hidden.detach().float())
        trainer._parts["lm_loss"].append(out.loss.detach().float())
        # added to the Trainer's log lines (AlignTrainer.log); align_report.json keeps only shared.training.LOSS_KEYS
        trainer._parts.setdefault("gradient_loss", []).append(disagreement.detach().float())
        loss = hidden + self.weight * disagreement
        return (loss, out) if return_outputs else loss


class ResidualGradientMatch(GradientMatch):
    """`--match residual`: hidden-state loss + weight x the disagreement of the LM-loss gradient with respect to
    each decoder layer's output (the residual stream), over the layers but the last:

        1 - cos(dL_pruned/dH_l, dL_original/dH_l), H_l: layer l's outputs at every position, as one vector; mean over l

    The weight gradient a LoRA follows is, per token, a layer's input times the gradient at its output; the
    default objective matches the inputs, this term the gradients token by token (a cosine, so the pruned model
    cannot agree by merely shrinking them): on text the original sampled itself they do not cancel, as their sum
    over the batch, which `--match weights` compares, does."""

    def paired_weights(self, model, teacher) -> list:
        return []  # this objective pairs layer outputs, not weights

    @staticmethod
    def residual_gradients(m, ids: torch.Tensor, create_graph: bool):
        embeds = m.get_input_embeddings()(ids)
        if not embeds.requires_grad:  # a frozen model (the original): differentiate from its embeddings on
            embeds = embeds.detach().requires_grad_(True)
        out = m(inputs_embeds=embeds, labels=ids, output_hidden_states=True)
        states = out.hidden_states[1:-1]  # outputs of layers 0..N-2 (the last entry is after the final norm)
        return out, torch.autograd.grad(out.loss, states, create_graph=create_graph)

    def teacher_gradients(self, teacher, ids: torch.Tensor) -> list[torch.Tensor]:
        return list(self.residual_gradients(teacher, ids, create_graph=False)[1])

    def student_gradients(self, model, ids: torch.Tensor):
        return self.residual_gradients(model, ids, create_graph=True)


MATCHES = {"weights": GradientMatch, "residual": ResidualGradientMatch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weight", type=float, default=1.0, help="weight of the gradient-disagreement term")
    ap.add_argument("--match", choices=list(MATCHES), default="weights",
                    help="weights: per-module cosine of the batch's weight gradients; residual: per-token gradients "
                         "at every layer's output")
    ap.add_argument("align", nargs=argparse.REMAINDER, help="-- publish align PRUNED ... (loram's arguments)")
    args = ap.parse_args()
    argv = align_argv(args.align, "gradient_matching.py --weight W -- publish align PRUNED ... (see --help)")
    if "--fsdp" in argv or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("gradient_matching.py runs in one process, without --fsdp")
    patch = MATCHES[args.match](args.weight, argv[2])
    align_trainer.AlignTrainer.compute_loss = lambda self, *a, **k: patch(self, *a, **k)
    run_loram(argv)


if __name__ == "__main__":
    main()
