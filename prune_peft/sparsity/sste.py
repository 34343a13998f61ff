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

Sharded weights (FSDP2 ``fully_shard``: a DTensor sharded on dim 0, the output rows): every group of 4 lies inside
one row, so ``S``, the mask and the flip counts are computed on each rank's local rows with no communication, and β's
two sums are summed over the shards (float64) before the division, so β is that of the whole weight.

Pure tensor code and the :class:`SSTELinear` layer; replacing a model's linears with it (and back) and the Trainer
callback are in :mod:`prune_peft.callbacks.sste`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._dist import is_sharded, local, local_rows, rowwise, sum_over_shards
from .masks import top2of4_mask
from .packing import pack_mask

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
    """The kept positions of S-STE: the 2 largest ``|w|`` per group of 4 (ties keep the lower index).

    A dim-0-sharded DTensor gives a DTensor mask of the same layout (computed on the local rows)."""
    return rowwise(w, lambda x: top2of4_mask(_groups(x).abs()).reshape(x.shape))


def soft_threshold24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S(w), mask)``: S-STE's soft-threshold 2:4 projection and the kept positions (2 per group of 4).

    ``S(w)`` is zero outside ``mask``; inside, ``|S| = |w| − t`` (which is 0 for a kept weight tied with t).
    A dim-0-sharded DTensor gives DTensors of the same layout (computed on the local rows).
    """
    if is_sharded(w):
        s, m = soft_threshold24(local(w))
        return rowwise(w, lambda _: s), rowwise(w, lambda _: m)
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
    """Frozen per-tensor scale ``β = ⟨W, S(W)⟩ / ⟨S(W), S(W)⟩`` (float32 scalar; 1 when ``S(W) = 0``).

    On a dim-0-sharded DTensor both sums are taken over the local rows in float64 and summed over the shards, so
    every rank gets the β of the whole weight (a plain tensor; equal to the one-process β up to the order of the
    float64 additions)."""
    if is_sharded(w):
        local_rows(w)  # ValueError unless row shards: a column shard could split a group of 4
    with torch.no_grad():
        wd = local(w.detach()).double()
        s, _ = soft_threshold24(wd)
        sums = sum_over_shards(torch.stack([(wd * s).sum(), (s * s).sum()]), w)
        num, den = sums[0], sums[1]
        beta = num / den if den > 0 else torch.ones((), dtype=torch.float64, device=wd.device)
    return beta.float()


class _SoftThresholdSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        # row-local, so a sharded weight (outside FSDP2's forward, e.g. when baking) stays on its own rows
        return rowwise(w, lambda x: soft_threshold24(x)[0] * beta.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None  # straight-through: dense gradient to the dense weight, no β, no mask


def sste_weight(w: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """``β · S(W)`` in forward, identity (straight-through) in backward."""
    beta_t = torch.as_tensor(beta, dtype=torch.float32, device=w.device)
    return _SoftThresholdSTE.apply(w, beta_t)


class SSTELinear(nn.Linear):
    """``nn.Linear`` trained with S-STE (arXiv 2409.09099): forward ``x·(β·S(W))ᵀ + b`` (2:4), the dense ``W`` gets
    straight-through gradients.

    Built from an ``nn.Linear`` by :meth:`from_linear`, which reuses its ``weight``/``bias`` Parameter objects, so an
    optimizer built before keeps training them and state-dict keys stay those of ``nn.Linear``; ``β`` is the
    non-persistent buffer ``sste_scale``, computed once from ``W`` (:func:`sste_scale`). :meth:`to_linear` goes back.
    :func:`prune_peft.callbacks.sste.apply_sste` puts these layers into a model.
    """

    sste_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("sste_scale", torch.ones((), dtype=torch.float32, device=device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SSTELinear:
        """An S-STE layer sharing ``linear``'s Parameters (same objects), with β computed from its weight."""
        if linear.in_features % 4:
            raise ValueError(f"S-STE 2:4 needs in_features divisible by 4, got in_features={linear.in_features}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.sste_scale = torch.ones((), dtype=torch.float32, device=linear.weight.device)
        layer.train(linear.training)
        layer.init_scale()
        return layer

    def to_linear(self) -> nn.Linear:
        """Bake ``W ← β·S(W)`` (exactly 2:4) into the weight, in place, and return an ``nn.Linear`` sharing it."""
        with torch.no_grad():
            self.weight.copy_(self.sparse_weight())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def init_scale(self) -> None:
        """(Re)compute the frozen β from the current weight."""
        self.sste_scale = sste_scale(self.weight)

    def sparse_weight(self) -> torch.Tensor:
        """The 2:4 weight the forward pass uses, ``β · S(W)`` (differentiable, straight-through)."""
        return sste_weight(self.weight, self.sste_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sparse_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", s_ste=2:4, beta={float(self.sste_scale):.4f}"


# ------------------------------------------------------------------------------------------------ mask-flip stats

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


class MaskFlipTracker:
    """Fraction of 2:4 positions whose kept/pruned status changed since the previous :meth:`update`.

    Previous masks are kept bit-packed on their device (1/8 byte per weight).
    """

    def __init__(self) -> None:
        self._prev: dict[str, torch.Tensor] = {}

    def update(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Record the current masks; return ``{"flips": count, "flip_fraction": …, "positions": …}`` (zeros the
        first time) plus ``per_module`` fractions.

        Sharded weights (dim-0 DTensors) are compared on their local rows; the per-module counts are then summed over
        the shards (one all-reduce per call), so every rank reports the whole model's counts."""
        counts: dict[str, int] = {}
        for name, w in weights.items():
            if is_sharded(w):
                local_rows(w)  # ValueError unless row shards
            packed = pack_mask(topk24_mask(local(w.detach())))
            prev = self._prev.get(name)
            if prev is not None and prev.shape == packed.shape:
                counts[name] = int(_POPCOUNT.to(packed.device)[(prev ^ packed).long()].sum().item())
            self._prev[name] = packed
        shards = [n for n in counts if is_sharded(weights[n])]
        if shards:  # every rank holds the same modules, so all reach this all-reduce
            summed = sum_over_shards(torch.tensor([counts[n] for n in shards]), weights[shards[0]])
            counts.update(zip(shards, (int(c) for c in summed.tolist())))
        flips = sum(counts.values())
        positions = sum(w.numel() for w in weights.values())  # global numel for DTensors
        per_module = {name: counts[name] / weights[name].numel() for name in counts}
        return {
            "flips": float(flips),
            "flip_fraction": flips / max(positions, 1),
            "positions": float(positions),
            "per_module": per_module,  # type: ignore[dict-item]
        }
