"""Q-Tuning selection math: EU-plane sample triage and context-aware token pruning (pure tensor code).

Wang et al., "Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token Pruning for Efficient
Supervised Fine-Tuning", arXiv 2509.23873. No official code exists; this follows the project page and fills the
gaps with documented, configurable choices (see ``docs/qtuning.md``).

Per batch, with the *current* model, every sample gets two coordinates over its response tokens T
(labels != -100)::

    PPL(x) = exp( (1/|T|) Σ_{i∈T} −log p(y_i | x, y_<i) )          (error)
    Ent(x) = (1/|T|) Σ_{i∈T} H(p(· | x, y_<i))                       (uncertainty)

Quadrants: Q1 harmful noise (high PPL, high Ent) and Q3 redundant knowledge (low PPL, low Ent) are dropped;
Q2 valuable misconceptions (high PPL, low Ent) are kept with their less salient tokens pruned; Q4 calibration data
(low PPL, high Ent) are kept whole. Inside Q2 samples each response token gets the context-aware score::

    s_i = (1−λ)·PPL_i + λ·(PPL_{i−1} + PPL_{i+1}),   PPL_i = exp(−log p(y_i | ·))

and ⌈token_ratio·|T|⌉ tokens are kept; pruned tokens get label −100 (they stay in the context).

No Hugging Face imports; the Trainer integration is :mod:`prune_peft.callbacks.qtuning`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "QUADRANT_NAMES",
    "EUTriage",
    "check_ratio",
    "eu_triage",
    "sample_ppl_entropy",
    "select_samples",
    "select_tokens",
    "token_nll_entropy",
    "token_scores",
]

IGNORE_INDEX = -100
QUADRANT_NAMES = {1: "noise", 2: "misconception", 3: "redundant", 4: "calibration"}
_MAX_NLL = 80.0  # exp(80) ≈ 5.5e34 still fits float32; beyond that PPL_i would overflow to inf


# ---------------------------------------------------------------------------------------------------------------
# Pure tensor functions
# ---------------------------------------------------------------------------------------------------------------


def token_nll_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token NLL and predictive entropy of a causal LM, aligned with the shifted labels (Q-Tuning, arXiv 2509.23873).

    ``nll_j = −log p(y_{j+1} | y_≤j)``, ``H_j = −Σ_v p(v | y_≤j)·log p(v | y_≤j)``, with ``p = softmax(logits[:, j])``.
    ``logits`` [B, L, V] and ``labels`` [B, L] → ``nll``, ``entropy``, ``mask``, each [B, L−1], where position j
    scores ``labels[:, j+1]`` from ``logits[:, j]``. ``mask`` marks response tokens (label != ignore_index); nll and
    entropy are 0 elsewhere. ``nll`` keeps the graph of ``logits``; ``entropy`` does too (detach it if unneeded).
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != ignore_index
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    zero = nll.new_zeros(())
    return torch.where(mask, nll, zero), torch.where(mask, entropy, zero), mask


def sample_ppl_entropy(
    token_nll: torch.Tensor, token_entropy: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample coordinates of the EU plane (Q-Tuning, arXiv 2509.23873), float64.

    ``PPL(x) = exp((1/|T|) Σ_{i∈T} nll_i)`` (error) and ``Ent(x) = (1/|T|) Σ_{i∈T} H_i`` (uncertainty), T the
    response tokens (``mask``).
    Rows without response tokens get NaN in both (they carry no learning signal and are never selected).
    """
    mask = mask.to(torch.float64)
    n = mask.sum(-1)
    mean_nll = (token_nll.double() * mask).sum(-1) / n
    mean_ent = (token_entropy.double() * mask).sum(-1) / n
    return mean_nll.exp(), mean_ent


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Integer rank of each value, 0 = smallest; ties are broken by position (rank coordinates of :func:`eu_triage`)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(x.numel(), device=x.device)
    return ranks


@dataclass
class EUTriage:
    """Result of :func:`eu_triage`.

    ``keep`` [n] bool; ``quadrant`` [n] long in 1..4 (0: no response tokens); ``level`` the quantile level t found by
    bisection; ``thresholds`` the value-space quantiles at t (``ppl_low = q_t(PPL)``, ``ppl_high = q_{1−t}(PPL)``,
    ``ent_low = q_t(Ent)``, ``ent_high = q_{1−t}(Ent)``); ``target`` the number of samples to keep.
    """

    keep: torch.Tensor
    quadrant: torch.Tensor
    level: float
    thresholds: dict[str, float]
    target: int


def eu_triage(ppl: torch.Tensor, entropy: torch.Tensor, sample_ratio: float, iters: int = 60) -> EUTriage:
    """Sample triage on the Error-Uncertainty plane with quantile thresholds found by bisection (Q-Tuning,
    arXiv 2509.23873, "Error-Uncertainty plane" sample pruning).

    At quantile level t ∈ [0, 1] the thresholds are ``ppl_low = q_t(PPL)``, ``ppl_high = q_{1−t}(PPL)``,
    ``ent_low = q_t(Ent)``, ``ent_high = q_{1−t}(Ent)`` (quantiles over the batch), and a sample is kept when it is a

    - misconception (Q2): ``PPL ≥ ppl_high`` and ``Ent ≤ ent_low``, or a
    - calibration sample (Q4): ``PPL ≤ ppl_low`` and ``Ent ≥ ent_high``.

    The kept share grows monotonically with t; t is bisected so that exactly ``k = max(1, round(sample_ratio·n))``
    samples are kept (n = samples with response tokens). For t ≤ ½ the two regions are disjoint corners of the plane
    (the median split at t = ½); if the off-diagonal quadrants hold fewer than k samples, t passes ½ and the regions
    grow into Q1/Q3 starting with the samples closest to Q2/Q4, so the budget is always met. Samples tied at the
    final level are broken by distance from the diagonal (|rank PPL − rank Ent|, larger first), then by index.

    Labels: kept samples are Q2 or Q4 by the condition they met first (Q4 on a tie: kept whole); dropped samples are
    Q1 if they lie on the high side of the anti-diagonal (rank PPL + rank Ent ≥ 1), else Q3. Samples with NaN
    statistics (no response tokens) are never kept and get label 0.
    """
    if ppl.shape != entropy.shape or ppl.dim() != 1:
        raise ValueError(
            f"ppl and entropy must be 1-D of equal length, got {tuple(ppl.shape)}, {tuple(entropy.shape)}"
        )
    check_ratio("sample_ratio", sample_ratio)
    device = ppl.device
    valid = ~(torch.isnan(ppl) | torch.isnan(entropy))
    n = int(valid.sum())
    if n == 0:
        raise ValueError(
            "Q-Tuning: no sample in the batch has response tokens (every label is -100), so there is nothing to "
            "score or train on; check max_length (completions truncated away?) and the completion/assistant masks"
        )
    k = max(1, math.floor(sample_ratio * n + 0.5))
    idx = valid.nonzero().squeeze(1)
    p, e = ppl[idx].double(), entropy[idx].double()
    # Rank coordinates u = U/m, v = V/m in [0, 1]; u ≥ 1−t ⟺ PPL ≥ q_{1−t}(PPL) for linearly interpolated quantiles.
    m = max(n - 1, 1)
    U, V = _ranks(p), _ranks(e)
    # Entry level (×m, exact integers) of each sample: in Q2 at level t iff u ≥ 1−t and v ≤ t, i.e.
    # t ≥ max(1−u, v); in Q4 iff t ≥ max(u, 1−v).
    T2 = torch.maximum(m - U, V) if n > 1 else torch.zeros_like(U)
    T4 = torch.maximum(U, m - V) if n > 1 else torch.zeros_like(U)
    T = torch.minimum(T2, T4)
    lo, hi = 0.0, 1.0
    if int((T == 0).sum()) >= k:
        hi = lo
    else:
        for _ in range(iters):  # smallest level whose kept set reaches k
            mid = (lo + hi) / 2
            if int((T <= mid * m).sum()) >= k:
                hi = mid
            else:
                lo = mid
    kept = T <= hi * m
    level_int = int(T[kept].max())
    extra = int(kept.sum()) - k
    if extra > 0:  # several samples enter at the same level: keep the deepest (most off-diagonal) ones
        boundary = (kept & (T == level_int)).nonzero().squeeze(1)
        order = torch.argsort(-(U - V).abs()[boundary], stable=True)
        kept[boundary[order[len(order) - extra :]]] = False
    quad_local = torch.where(kept, torch.where(T2 < T4, 2, 4), torch.where(U + V >= m, 1, 3))
    keep = torch.zeros(ppl.shape, dtype=torch.bool, device=device)
    quadrant = torch.zeros(ppl.shape, dtype=torch.long, device=device)
    keep[idx] = kept
    quadrant[idx] = quad_local.long()
    level = level_int / m
    q = torch.tensor([level, 1 - level], dtype=torch.float64, device=device)
    pq, eq = torch.quantile(p, q), torch.quantile(e, q)
    thresholds = {
        "ppl_low": float(pq[0]),
        "ppl_high": float(pq[1]),
        "ent_low": float(eq[0]),
        "ent_high": float(eq[1]),
    }
    return EUTriage(keep=keep, quadrant=quadrant, level=level, thresholds=thresholds, target=k)


def select_samples(ppl: torch.Tensor, entropy: torch.Tensor, sample_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean keep mask over the batch and quadrant labels (1..4, 0 = no response tokens) (Q-Tuning, arXiv 2509.23873).

    Keep ``x`` iff it is in Q2 (``PPL ≥ q_{1−t}(PPL)``, ``Ent ≤ q_t(Ent)``) or Q4 (``PPL ≤ q_t(PPL)``,
    ``Ent ≥ q_{1−t}(Ent)``) at the level t that keeps ``round(sample_ratio·n)`` samples; see :func:`eu_triage`.

    >>> keep, quadrant = select_samples(ppl, entropy, sample_ratio=0.25)
    """
    t = eu_triage(ppl, entropy, sample_ratio)
    return t.keep, t.quadrant


def token_scores(
    token_nll: torch.Tensor, response_mask: torch.Tensor, lam: float = 0.5, neighbor_mean: bool = False
) -> torch.Tensor:
    """Context-aware token scores ``s_i = (1−λ)·PPL_i + λ·(PPL_{i−1} + PPL_{i+1})`` over response tokens
    (Q-Tuning, arXiv 2509.23873, token pruning inside misconception samples).

    ``PPL_i = exp(nll_i)`` (nll clamped at 80 against overflow). Neighbours are the adjacent positions when they are
    response tokens too; a missing neighbour (response boundary) is replaced by the token's own PPL, so boundary
    tokens are on the same scale. ``neighbor_mean=True`` uses ½(PPL_{i−1} + PPL_{i+1}) (the slime re-implementation)
    instead of the sum (the project page's formula). Non-response positions get NaN. Shape [B, T], float64.
    """
    m = response_mask.bool()
    ppl = token_nll.detach().double().clamp(max=_MAX_NLL).exp()
    false = torch.zeros_like(m[:, :1])
    prev_ok = torch.cat([false, m[:, :-1]], 1) & m
    next_ok = torch.cat([m[:, 1:], false], 1) & m
    prev = torch.where(prev_ok, torch.cat([ppl[:, :1], ppl[:, :-1]], 1), ppl)
    nxt = torch.where(next_ok, torch.cat([ppl[:, 1:], ppl[:, -1:]], 1), ppl)
    neighbours = (prev + nxt) / 2 if neighbor_mean else prev + nxt
    s = (1 - lam) * ppl + lam * neighbours
    return torch.where(m, s, torch.full_like(s, float("nan")))


def select_tokens(
    token_nll: torch.Tensor,
    response_mask: torch.Tensor,
    token_ratio: float,
    lam: float = 0.5,
    *,
    keep: str = "high",
    neighbor_mean: bool = False,
) -> torch.Tensor:
    """Boolean keep mask [B, T] over tokens: per row, ⌈token_ratio·n⌉ of its n response tokens by :func:`token_scores`
    (Q-Tuning, arXiv 2509.23873): ``keep_i ⟺ rank(s_i) < ⌈r_token·n⌉`` (descending for ``keep="high"``).

    ``keep="high"`` retains the top-scoring tokens (the project page: "only the top-r_token fraction are retained";
    the abstract: "trim less salient tokens" — the already-predicted, low-perplexity context of a misconception);
    ``keep="low"`` retains the lowest scores instead (drops high-perplexity spikes and their neighbourhoods, the
    choice of the unofficial slime re-implementation). Ties go to the earlier position. Non-response positions are
    never kept.
    """
    check_ratio("token_ratio", token_ratio)
    if keep not in ("low", "high"):
        raise ValueError(f"keep must be 'low' or 'high', got {keep!r}")
    m = response_mask.bool()
    s = token_scores(token_nll, m, lam, neighbor_mean)
    key = s if keep == "low" else -s
    key = torch.where(m, key, torch.full_like(key, float("inf")))
    n = m.sum(-1)
    k = torch.ceil(n.double() * token_ratio - 1e-9).long()  # the epsilon keeps 0.7·10 from rounding up to 8
    order = torch.argsort(key, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.size(-1), device=order.device).expand_as(order).contiguous())
    return (rank < k.unsqueeze(-1)) & m


def check_ratio(name: str, value: Any) -> None:
    """ValueError unless ``value`` is a kept share ``r ∈ (0, 1]`` (Q-Tuning's r_sample / r_token, arXiv 2509.23873)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < float(value) <= 1):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
