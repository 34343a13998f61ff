"""S-STE: continuous 2:4 pruning with a soft-threshold projection (Hu, Zhu, Chen, NeurIPS 2024, arXiv 2409.09099).

For every group ``a = (a1..a4)`` of 4 consecutive weights along the input dimension, with ``t`` the second-smallest
``|a_k|``:

    S(a)_k = sign(a_k) · max(|a_k| − t, 0)           (the two largest shrink by t, the two smallest become 0)

``S`` is continuous in ``a`` (no jump when two magnitudes cross), unlike hard top-2 pruning. The forward weight is
``W_sp = β · S(W)`` with one per-tensor scale computed once and then frozen (least-squares fit of ``W`` by ``S(W)``):

    β = ⟨W, S(W)⟩ / ⟨S(W), S(W)⟩

Backward is a straight-through estimator: ``∂L/∂W := ∂L/∂W_sp`` (no β, no mask), so pruned weights keep learning
and the 2:4 mask can change during training (S-STE is a dynamic-mask method). On an already 2:4-pruned weight
``t = 0``, ``S`` is the identity and ``β = 1``.

Pure tensor code; the module swap and the Trainer callback are in :mod:`prune_peft.callbacks.sste`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "MaskFlipTracker",
    "SSTELinear",
    "soft_threshold24",
    "sste_scale",
    "sste_weight",
    "topk24_mask",
]


def _groups(w: torch.Tensor) -> torch.Tensor:
    if w.shape[-1] % 4:
        raise ValueError(f"S-STE 2:4 needs the last dimension divisible by 4, got shape {tuple(w.shape)}")
    return w.reshape(-1, 4)


def topk24_mask(w: torch.Tensor) -> torch.Tensor:
    """The kept positions of S-STE: the 2 largest ``|w|`` per group of 4 (ties keep the lower index)."""
    a = _groups(w).abs()
    a0, a1, a2, a3 = a.unbind(-1)
    r0 = (a1 > a0).int() + (a2 > a0).int() + (a3 > a0).int()
    r1 = (a0 >= a1).int() + (a2 > a1).int() + (a3 > a1).int()
    r2 = (a0 >= a2).int() + (a1 >= a2).int() + (a3 > a2).int()
    r3 = (a0 >= a3).int() + (a1 >= a3).int() + (a2 >= a3).int()
    return (torch.stack((r0, r1, r2, r3), -1) < 2).reshape(w.shape)


def soft_threshold24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S(w), mask)``: S-STE's soft-threshold 2:4 projection and the kept positions (2 per group of 4).

    ``S(w)`` is zero outside ``mask``; inside, ``|S| = |w| − t`` (which is 0 for a kept weight tied with t).
    """
    g = _groups(w)
    a = g.abs()
    a0, a1, a2, a3 = a.unbind(-1)
    # second-smallest of four (the formula of the paper's Triton kernel)
    t = torch.minimum(
        torch.maximum(torch.minimum(a0, a1), torch.minimum(a2, a3)),
        torch.minimum(torch.maximum(a0, a1), torch.maximum(a2, a3)),
    )
    s = torch.sign(g) * torch.clamp_min(a - t.unsqueeze(-1), 0)
    return s.reshape(w.shape), topk24_mask(w)


def sste_scale(w: torch.Tensor) -> torch.Tensor:
    """Frozen per-tensor scale ``β = ⟨W, S(W)⟩ / ⟨S(W), S(W)⟩`` (float32 scalar; 1 when ``S(W) = 0``)."""
    with torch.no_grad():
        wd = w.detach().double()
        s, _ = soft_threshold24(wd)
        den = (s * s).sum()
        beta = (wd * s).sum() / den if den > 0 else torch.ones((), dtype=torch.float64, device=w.device)
    return beta.float()


class _SoftThresholdSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        s, _ = soft_threshold24(w)
        return s * beta.to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None  # straight-through: dense gradient to the dense weight, no β, no mask


def sste_weight(w: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """``β · S(W)`` in forward, identity (straight-through) in backward."""
    beta_t = torch.as_tensor(beta, dtype=torch.float32, device=w.device)
    return _SoftThresholdSTE.apply(w, beta_t)


class SSTELinear(nn.Linear):
    """``nn.Linear`` trained with S-STE: forward uses ``β · S(W)`` (2:4), the dense ``W`` gets STE gradients.

    Swapped in place (``__class__``) by :func:`prune_peft.callbacks.sste.apply_sste`, so parameters and state-dict keys
    stay those of ``nn.Linear``; ``β`` is the non-persistent buffer ``sste_scale``, computed once at the swap.
    """

    sste_scale: torch.Tensor

    def init_scale(self) -> None:
        """(Re)compute the frozen β from the current weight."""
        beta = sste_scale(self.weight)
        if "sste_scale" in self._buffers:
            self.sste_scale = beta
        else:
            self.register_buffer("sste_scale", beta, persistent=False)

    def sparse_weight(self) -> torch.Tensor:
        """The 2:4 weight the forward pass uses, ``β · S(W)`` (differentiable, straight-through)."""
        return sste_weight(self.weight, self.sste_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sparse_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", s_ste=2:4, beta={float(self.sste_scale):.4f}"


# ------------------------------------------------------------------------------------------------ mask-flip stats

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.reshape(-1, 8).to(torch.uint8) * _BITS.to(flat.device)).sum(-1, dtype=torch.uint8)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


class MaskFlipTracker:
    """Fraction of 2:4 positions whose kept/pruned status changed since the previous :meth:`update`.

    Previous masks are kept bit-packed on their device (1/8 byte per weight).
    """

    def __init__(self) -> None:
        self._prev: dict[str, torch.Tensor] = {}

    def update(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Record the current masks; return ``{"flips": count, "flip_fraction": …, "positions": …}`` (zeros the
        first time) plus ``per_module`` fractions."""
        flips = positions = 0
        per_module: dict[str, float] = {}
        for name, w in weights.items():
            packed = _pack(topk24_mask(w.detach()))
            prev = self._prev.get(name)
            n = w.numel()
            if prev is not None and prev.shape == packed.shape:
                changed = int(_POPCOUNT.to(packed.device)[(prev ^ packed).long()].sum().item())
                flips += changed
                per_module[name] = changed / n
            positions += n
            self._prev[name] = packed
        return {
            "flips": float(flips),
            "flip_fraction": flips / max(positions, 1),
            "positions": float(positions),
            "per_module": per_module,  # type: ignore[dict-item]
        }
