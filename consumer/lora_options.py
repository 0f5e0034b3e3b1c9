"""The LoRA options `loram train` and `loram plan` share: declared once, validated once.

    rank: int = rank_option()          # in a Config dataclass
    check_lora_options(rank=self.rank, dropout=self.dropout)
"""

import math

from loram.shared.architectures import LINEAR_NAMES
from loram.shared.configs import option
from loram.shared.errors import LoramError


def rank_option():
    return option(8, "LoRA rank r.")


def dropout_option():
    return option(0.05, "LoRA dropout, in [0, 1).")


def targets_option():
    return option(list(LINEAR_NAMES), "Modules to adapt: short (q,v) or full (q_proj,v_proj) names; repeat the "
                                      "flag or comma-separate.")


def lm_head_option():
    return option(False, "Also adapt lm_head.")


def check_lora_options(*, rank: int, dropout: float, alpha: float | None = None) -> None:
    """rank >= 1, dropout in [0, 1), alpha finite and > 0 (LoramError naming the flag otherwise)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoramError(f"--rank must be a whole number >= 1, got {rank!r}")
    if not 0 <= dropout < 1:
        raise LoramError(f"--dropout must lie in [0, 1), got {dropout}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise LoramError(f"--alpha must be a finite number > 0, got {alpha}")
