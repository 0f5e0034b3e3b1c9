"""Non-structured pruning of one linear layer: which weights to zero, and SparseGPT's update.

`W` is `[out, in]` (y = x W^T). A mask is a bool tensor of W's shape, True = weight kept.

- `magnitude`: score |W_ij|.
- `wanda`: score |W_ij| * ||X_j||_2, X_j being input feature j over all calibration tokens; the
  scores are compared within each output row, and no weight changes.
- `sparsegpt`: the Optimal Brain Surgeon update of SparseGPT (docs/method.md §3): with the damped
  Hessian H = 2/n X^T X and U the upper Cholesky factor of H^-1, columns are visited left to right in
  blocks; a weight is pruned when w^2 / U_jj^2 is among the smallest, and the error it leaves is
  spread over the columns not yet visited, so the surviving weights change.

Unstructured selection prunes `floor(in * sparsity)` weights of every row (magnitude, Wanda) or of
every block of 128 columns (SparseGPT, whose scores are only comparable within a block). N:M prunes
the N lowest-scoring weights of every group of M consecutive inputs in every row.
"""

from dataclasses import dataclass

import torch

from loram.shared.errors import LoramError

BLOCK = 128  # SparseGPT's column block
DAMPING = 0.01  # SparseGPT's diagonal damping, a fraction of mean(diag(H))


@dataclass(frozen=True)
class Target:
    """What to prune: a fraction of every row (`sparsity`) or N of every M consecutive inputs (`nm`)."""

    sparsity: float | None = None
    nm: tuple[int, int] | None = None

    def __post_init__(self):
        if (self.sparsity is None) == (self.nm is None):
            raise LoramError("give exactly one of --sparsity S or --nm N:M")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise LoramError(f"--sparsity must lie in (0, 1), got {self.sparsity}")
        if self.nm is not None:
            n, m = self.nm
            if not 0 < n < m:
                raise LoramError(f"--nm {n}:{m}: need 0 < N < M (N of every M weights are pruned), e.g. 2:4")

    @property
    def fraction(self) -> float:
        return self.sparsity if self.sparsity is not None else self.nm[0] / self.nm[1]

    def check_width(self, width: int, name: str) -> None:
        if self.nm is not None and width % self.nm[1]:
            raise LoramError(f"--nm {self.nm[0]}:{self.nm[1]}: M={self.nm[1]} does not divide the input width "
                             f"{width} of {name}; choose an M that divides every projection's input width")


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise LoramError(f"--nm {text!r} must look like N:M, e.g. 2:4") from None
    Target(nm=(n, m))
    return n, m


def lowest_mask(scores: torch.Tensor, target: Target) -> torch.Tensor:
    """Keep-mask that prunes the lowest scores: per row (unstructured) or per row and M-group (N:M)."""
    out, width = scores.shape
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if target.nm is not None:
        n, m = target.nm
        groups = scores.reshape(out, width // m, m)
        idx = torch.topk(groups, n, dim=2, largest=False, sorted=False).indices
        pruned.view(out, width // m, m).scatter_(2, idx, True)
    else:
        k = int(width * target.sparsity)
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
            pruned.scatter_(1, idx, True)
    return ~pruned


def magnitude_mask(weight: torch.Tensor, target: Target) -> torch.Tensor:
    return lowest_mask(weight.float().abs(), target)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, target: Target) -> torch.Tensor:
    """`input_norm[j]` = ||X_j||_2 over the calibration tokens."""
    return lowest_mask(weight.float().abs() * input_norm.float().unsqueeze(0), target)


def damped_inverse_factor(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, float32. Inputs never seen (H_jj = 0) get H_jj = 1 and
    their weights are zeroed in `weight` (float32, in place), as they cannot be reconstructed."""
    h = hessian.clone().float()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    damp = DAMPING * torch.diagonal(h).mean()
    h.diagonal().add_(damp)
    for _ in range(3):  # rare ill-conditioning: damp harder rather than fail
        factor, info = torch.linalg.cholesky_ex(h)
        if not int(info):
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True)
        h.diagonal().add_(damp * 10)
    raise LoramError("the calibration Hessian is not positive definite even after extra damping; "
                     "use more calibration samples")


@torch.no_grad()
def sparsegpt_(weight: torch.Tensor, hessian: torch.Tensor, target: Target, block: int = BLOCK) -> torch.Tensor:
    """Prune `weight` [out, in] in place with SparseGPT; returns the keep-mask.

    `hessian` is 2/n X^T X [in, in] of the layer's calibration inputs. Computed in float32 and
    written back in the weight's dtype."""
    w = weight.detach().float().clone()
    out, width = w.shape
    u = damped_inverse_factor(hessian, w)
    if target.nm is not None:
        m = target.nm[1]
        block = max(m, block // m * m)  # groups never straddle blocks
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, width, block):
        stop = min(start + block, width)
        w1 = w[:, start:stop].clone()
        u1 = u[start:stop, start:stop]
        d = torch.diagonal(u1)
        err = torch.zeros_like(w1)
        if target.nm is None:
            block_pruned = ~lowest_mask_flat(w1 ** 2 / d.unsqueeze(0) ** 2, target.sparsity)
        else:
            block_pruned = torch.zeros_like(w1, dtype=torch.bool)
        for j in range(stop - start):
            if target.nm is not None and j % target.nm[1] == 0:
                m = target.nm[1]
                group = w1[:, j:j + m] ** 2 / d[j:j + m].unsqueeze(0) ** 2
                idx = torch.topk(group, target.nm[0], dim=1, largest=False, sorted=False).indices
                block_pruned[:, j:j + m].scatter_(1, idx, True)
            col = w1[:, j]
            kept = torch.where(block_pruned[:, j], torch.zeros_like(col), col)
            e = (col - kept) / d[j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = kept
            err[:, j] = e
        w[:, start:stop] = w1
        w[:, stop:] -= err @ u[start:stop, stop:]
        pruned[:, start:stop] = block_pruned
    w[pruned] = 0
    weight.copy_(w.to(weight.dtype))
    return ~pruned


def lowest_mask_flat(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the `floor(numel * sparsity)` lowest scores of the whole tensor."""
    k = int(scores.numel() * sparsity)
    pruned = torch.zeros(scores.numel(), dtype=torch.bool)
    if k:
        pruned[torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices] = True
    return ~pruned.view_as(scores)
