"""Cross-attention regularisers on token attention maps (paper §3.3, Fig. 3b; appendix D.1).

A map is a token's cross-attention probability at each query pixel, averaged over
heads and summed over the token's sub-word pieces: ``A(p) = Σ_{t∈T} mean_h P_h(p, t)``
with ``P_h(p, ·)`` the softmax over text tokens; ``attn`` below is ``(HW, T)`` already
averaged over heads, and ``grid`` its ``(h, w)``. Region masks are given at the
latent resolution and area-averaged down to each layer's grid.

Unmix (Fig. 3b): "MSE on the non-corresponding regions": each subject's token map
should be 0 outside its region, ``L = mean_i mean_p [A_i(p)·(1 − M_i(p))]²``.

Subject (eq. 10): ``L = ‖A^V − sg(A^V ⊙ M)‖²`` with ``M`` the class token's map
thresholded at ``threshold`` × its maximum; the norm is taken as a mean over pixels
(a constant factor of the paper's sum, absorbed by the weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def find_subsequence(tokens: list[int], piece: list[int]) -> list[int]:
    """Positions of every occurrence of ``piece`` in ``tokens`` (flattened)."""
    if not piece:
        return []
    n = len(piece)
    return [i + j for i in range(len(tokens) - n + 1) if tokens[i : i + n] == piece for j in range(n)]


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention ``(B, heads, N, T)`` in float32 of projected ``q (B, N, H·d)``, ``k (B, T, H·d)``."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2).float()
    kh = k.reshape(b, -1, heads, d).transpose(1, 2).float()
    return torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``(B, N, H·d)`` in q's dtype and the head-averaged map ``(B, N, T)``."""
    probs = attention_probabilities(q, k, heads)
    b, n, inner = q.shape
    vh = v.reshape(b, -1, heads, inner // heads).transpose(1, 2).float()
    out = (probs @ vh).transpose(1, 2).reshape(b, n, inner).to(q.dtype)
    return out, probs.mean(dim=1)


def pooled(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A latent-resolution mask ``(H, W)`` area-averaged to ``grid``."""
    if tuple(mask.shape) == tuple(grid):
        return mask
    return F.adaptive_avg_pool2d(mask[None, None].float(), grid)[0, 0]


def token_map(attn: torch.Tensor, positions: list[int], grid: tuple[int, int]) -> torch.Tensor:
    return attn[:, positions].sum(dim=-1).reshape(grid)


def unmix_loss(attn: torch.Tensor, grid: tuple[int, int], regions: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Mean over subjects of the mean squared attention outside the subject's region."""
    terms = []
    for positions, mask in regions:
        outside = 1 - pooled(mask.to(attn.device), grid)
        terms.append((token_map(attn, positions, grid) * outside).square().mean())
    return torch.stack(terms).mean()


def subject_mask(attn: torch.Tensor, grid: tuple[int, int], class_positions: list[int], threshold: float) -> torch.Tensor:
    """Binary mask where the class token's attention reaches ``threshold`` × its peak."""
    with torch.no_grad():
        cls = token_map(attn, class_positions, grid)
        return (cls >= threshold * cls.max().clamp_min(1e-12)).float()


def subject_loss(
    attn: torch.Tensor, grid: tuple[int, int], special: list[int], class_positions: list[int], threshold: float
) -> torch.Tensor:
    """Eq. 10: ``mean_p (A^V − sg(A^V ⊙ M))²``."""
    mask = subject_mask(attn, grid, class_positions, threshold)
    special_map = token_map(attn, special, grid)
    return (special_map - (special_map * mask).detach()).square().mean()


def outside_mass(
    attn: torch.Tensor, grid: tuple[int, int], positions: list[int], mask: torch.Tensor, relative: bool = True
) -> torch.Tensor:
    """A token's attention mass outside its region (a report metric): as a fraction of
    its mass over the whole image, or (``relative=False``) per pixel of the image."""
    token = token_map(attn, positions, grid)
    outside = 1 - pooled(mask.to(attn.device), grid)
    mass = (token * outside).sum()
    return mass / token.sum().clamp_min(1e-12) if relative else mass / token.numel()
