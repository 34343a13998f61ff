"""Q-Tuning: joint sample and token pruning for supervised fine-tuning on the Error-Uncertainty plane.

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

The module has two halves: pure tensor functions (:func:`token_nll_entropy`, :func:`sample_ppl_entropy`,
:func:`eu_triage`, :func:`select_samples`, :func:`token_scores`, :func:`select_tokens`), and the Hugging Face
wiring (:class:`QTuningConfig`, :class:`QTuningCallback`). The callback patches the trainer it is passed to (the
axolotl precedent: a callback holding the trainer): a plain ``callbacks=[QTuningCallback(...)]`` is enough for
``transformers.Trainer`` and ``trl.SFTTrainer``; :meth:`QTuningCallback.attach` does the same explicitly.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from ._trainer import find_trainer

__all__ = [
    "QUADRANT_NAMES",
    "EUTriage",
    "QTuningCallback",
    "QTuningConfig",
    "eu_triage",
    "plot_eu_plane",
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
    """Per-token NLL and predictive entropy of a causal LM, aligned with the shifted labels.

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
    """Per-sample ``PPL = exp(mean NLL)`` and mean entropy over the response tokens (``mask``), float64.

    Rows without response tokens get NaN in both (they carry no learning signal and are never selected).
    """
    mask = mask.to(torch.float64)
    n = mask.sum(-1)
    mean_nll = (token_nll.double() * mask).sum(-1) / n
    mean_ent = (token_entropy.double() * mask).sum(-1) / n
    return mean_nll.exp(), mean_ent


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Integer rank of each value, 0 = smallest; ties are broken by position."""
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
    """Sample triage on the Error-Uncertainty plane with quantile thresholds found by bisection.

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
    _check_ratio("sample_ratio", sample_ratio)
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
    """Boolean keep mask over the batch and quadrant labels (1..4, 0 = no response tokens); see :func:`eu_triage`.

    >>> keep, quadrant = select_samples(ppl, entropy, sample_ratio=0.25)
    """
    t = eu_triage(ppl, entropy, sample_ratio)
    return t.keep, t.quadrant


def token_scores(
    token_nll: torch.Tensor, response_mask: torch.Tensor, lam: float = 0.5, neighbor_mean: bool = False
) -> torch.Tensor:
    """Context-aware token scores ``s_i = (1−λ)·PPL_i + λ·(PPL_{i−1} + PPL_{i+1})`` over response tokens.

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
    """Boolean keep mask [B, T] over tokens: per row, ⌈token_ratio·n⌉ of its n response tokens by :func:`token_scores`.

    ``keep="high"`` retains the top-scoring tokens (the project page: "only the top-r_token fraction are retained";
    the abstract: "trim less salient tokens" — the already-predicted, low-perplexity context of a misconception);
    ``keep="low"`` retains the lowest scores instead (drops high-perplexity spikes and their neighbourhoods, the
    choice of the unofficial slime re-implementation). Ties go to the earlier position. Non-response positions are
    never kept.
    """
    _check_ratio("token_ratio", token_ratio)
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


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < float(value) <= 1):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------------


def plot_eu_plane(ppl, entropy, quadrant, path, thresholds: dict[str, float] | None = None, title: str = "") -> str:
    """Scatter of samples on the EU plane (x = mean entropy, y = perplexity, log scale), coloured by quadrant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ppl, entropy, quadrant = (torch.as_tensor(x).cpu() for x in (ppl, entropy, quadrant))
    fig = Figure(figsize=(5.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {1: "tab:red", 2: "tab:orange", 3: "tab:gray", 4: "tab:blue"}
    for q, name in QUADRANT_NAMES.items():
        sel = quadrant == q
        if sel.any():
            kept = q in (2, 4)
            ax.scatter(
                entropy[sel].numpy(),
                ppl[sel].numpy(),
                s=12,
                c=colours[q],
                alpha=0.8 if kept else 0.4,
                label=f"Q{q} {name} ({int(sel.sum())}{', kept' if kept else ''})",
            )
    if thresholds:
        for key in ("ent_low", "ent_high"):
            ax.axvline(thresholds[key], color="k", lw=0.6, ls="--")
        for key in ("ppl_low", "ppl_high"):
            ax.axhline(thresholds[key], color="k", lw=0.6, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("mean predictive entropy (uncertainty)")
    ax.set_ylabel("perplexity (error)")
    ax.set_title(title or "Q-Tuning EU plane")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face wiring
# ---------------------------------------------------------------------------------------------------------------

MODES = ("two_pass", "single_pass")


@dataclass
class QTuningConfig:
    """Q-Tuning settings. Every ratio is a kept share in (0, 1]; ``sample_ratio=0.25, token_ratio=0.5`` is the
    paper's "25% × 50%" budget (12.5% of the samples' worth of data).

    >>> QTuningCallback(QTuningConfig(sample_ratio=0.25, token_ratio=0.5))
    """

    sample_ratio: float = field(
        default=0.5, metadata={"help": "share of each batch kept (misconception + calibration samples), in (0, 1]"}
    )
    token_ratio: float = field(
        default=0.7, metadata={"help": "share of response tokens kept inside misconception samples, in (0, 1]"}
    )
    lam: float = field(
        default=0.5, metadata={"help": "λ of the context-aware token score (weight of the neighbours), in [0, 1]"}
    )
    mode: str = field(
        default="two_pass",
        metadata={
            "help": "'two_pass': no-grad scoring forward, then forward/backward on the kept samples only (saves "
            "compute; exact loss normalisation under gradient accumulation). 'single_pass': score from the training "
            "forward and mask the loss (no extra forward, no compute saved)."
        },
    )
    token_keep: str = field(
        default="high",
        metadata={
            "help": "retain the 'high'est scoring tokens of misconception samples (the page's 'top-r_token fraction', "
            "trimming the less salient, well-predicted ones) or the 'low'est (the slime re-implementation)"
        },
    )
    neighbor_mean: bool = field(
        default=False,
        metadata={"help": "use ½(PPL_{i−1}+PPL_{i+1}) instead of the page formula's sum for the neighbour term"},
    )
    plot: bool = field(default=True, metadata={"help": "write EU-plane scatter plots (needs matplotlib)"})
    plot_steps: int = field(
        default=0,
        metadata={"help": "write a plot every N optimizer steps (0: only at the end of training)"},
    )
    plot_dir: str | None = field(
        default=None, metadata={"help": "folder for the plots (default: <output_dir>/qtuning)"}
    )

    def __post_init__(self) -> None:
        _check_ratio("sample_ratio", self.sample_ratio)
        _check_ratio("token_ratio", self.token_ratio)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0 <= self.lam <= 1:
            raise ValueError(f"lam must be a number in [0, 1], got {self.lam!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.token_keep not in ("low", "high"):
            raise ValueError(f"token_keep must be 'low' or 'high', got {self.token_keep!r}")
        if isinstance(self.plot_steps, bool) or not isinstance(self.plot_steps, int) or self.plot_steps < 0:
            raise ValueError(f"plot_steps must be an integer >= 0, got {self.plot_steps!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather a [n, d] tensor whose n may differ per rank → ([Σn, d] in rank order, offset of this rank)."""
    rank, world = _world()
    if world == 1:
        return x, 0
    n = torch.tensor([x.size(0)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.size(0)] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def _is_sft_trainer(trainer) -> bool:
    if not any(c.__name__ == "SFTTrainer" for c in type(trainer).__mro__):
        return False
    try:  # the fused LM head (per-token log-probs and entropy, no full logits) arrived with trl 1.x
        from trl.trainer.utils import add_fused_lm_head  # noqa: F401
    except ImportError:
        return False
    return True


_SKIP_KEY = "_qtuning_skip"  # marks a micro-batch whose samples were all dropped
_NON_MODEL_KEYS = {"labels", "shift_labels", "num_items_in_batch", "use_cache", _SKIP_KEY}


class QTuningCallback(TrainerCallback):
    """Q-Tuning for ``transformers.Trainer`` and ``trl.SFTTrainer``; one line::

        trainer = SFTTrainer(model, args=cfg, train_dataset=ds, peft_config=lora,
                             callbacks=[QTuningCallback(QTuningConfig(sample_ratio=0.25, token_ratio=0.5))])

    A callback cannot change the batch or the loss, so this one patches the trainer it is registered with
    (found at ``on_init_end``; or call :meth:`attach` yourself, e.g. after ``trainer.add_callback``):

    - two-pass mode wraps ``trainer.get_batch_samples``: every micro-batch of the optimizer step is scored with a
      no-grad forward, the whole step (all micro-batches, all ranks) is triaged at once, dropped samples are removed,
      pruned tokens get label −100, trailing columns no kept label needs are cut, and ``num_items_in_batch`` is
      recounted from the pruned labels — so the trainer's own loss (trl's NLL/DFT, ``compute_loss_func``, label
      smoothing) is the exact masked mean over the kept tokens, gradient accumulation included;
    - single-pass mode wraps ``trainer.compute_loss``: the training forward gives per-token NLL and entropy, the
      micro-batch is triaged and the loss is the masked mean over kept tokens (exact with one micro-batch per step;
      with gradient accumulation each micro-batch is normalised by its own kept-token count);
    - ``trainer.log`` is wrapped so per-step quadrant counts and kept shares land in ``log_history`` *and* the
      reporters (TensorBoard, W&B) — keys added in ``on_log`` would reach neither reliably.
    """

    def __init__(self, config: QTuningConfig | None = None, **overrides: Any) -> None:
        if config is not None and not isinstance(config, QTuningConfig):
            raise ValueError(f"config must be a QTuningConfig, got {type(config).__name__}")
        base = asdict(config) if config is not None else {}
        self.config = QTuningConfig(**{**base, **overrides})
        self.trainer = None
        self.records: deque[dict[str, Any]] = deque(maxlen=16)  # last triage results (debugging, tests)
        self._acc: dict[str, float] = {}
        self._points: deque[tuple[float, float, int]] = deque(maxlen=4096)  # (ppl, ent, quadrant) for the plot
        self._last_thresholds: dict[str, float] | None = None
        self._warned_empty = False

    # ------------------------------------------------------------------ attaching
    def attach(self, trainer) -> QTuningCallback:
        """Patch ``trainer`` (idempotent) and register this callback with it if needed; returns ``self``."""
        if self.trainer is trainer:
            return self
        if self.trainer is not None:
            raise ValueError("this QTuningCallback is already attached to another trainer; make a new one")
        other = getattr(trainer, "_qtuning_callback", None)
        if other is not None and other is not self:
            raise ValueError("the trainer already has a QTuningCallback; use only one")
        self._validate(trainer)
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self.trainer = trainer
        trainer._qtuning_callback = self
        self._orig_compute_loss = trainer.compute_loss
        self._orig_get_batch_samples = trainer.get_batch_samples
        self._orig_log = trainer.log
        trainer.compute_loss = self._compute_loss
        trainer.log = self._log
        if self.config.mode == "two_pass":
            trainer.get_batch_samples = self._get_batch_samples
        return self

    def _validate(self, trainer) -> None:
        cfg, args = self.config, trainer.args
        for flag in ("packing", "padding_free"):
            if getattr(args, flag, False):
                raise ValueError(
                    f"Q-Tuning scores and selects whole samples, one per row; {flag}=True mixes samples in a row. "
                    f"Set {flag}=False."
                )
        world = max(1, int(getattr(args, "world_size", 1)))
        pool = args.per_device_train_batch_size * world
        if cfg.mode == "two_pass":
            pool *= args.gradient_accumulation_steps
        if cfg.sample_ratio < 1 and pool < 2:
            hint = (
                "use per_device_train_batch_size >= 2 (or mode='two_pass' with gradient_accumulation_steps >= 2)"
                if cfg.mode == "single_pass"
                else "use per_device_train_batch_size >= 2 or gradient_accumulation_steps >= 2"
            )
            raise ValueError(
                f"Q-Tuning selects samples within each optimizer step's batch, but with mode={cfg.mode!r}, "
                f"per_device_train_batch_size={args.per_device_train_batch_size}, gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps} and {world} process(es) the batch holds {pool} sample: no "
                f"selection is possible; {hint}, or sample_ratio=1.0 for token pruning only"
            )
        if cfg.mode == "single_pass":
            if getattr(trainer, "compute_loss_func", None) is not None or getattr(args, "label_smoothing_factor", 0):
                raise ValueError(
                    "mode='single_pass' computes the (masked NLL) loss itself and cannot apply compute_loss_func or "
                    "label smoothing; use mode='two_pass', which keeps the trainer's own loss"
                )
            loss_type = getattr(args, "loss_type", None)
            if _is_sft_trainer(trainer) and loss_type not in (None, "nll", "chunked_nll", "dft"):
                raise ValueError(f"mode='single_pass' supports loss_type 'nll' and 'dft', got {loss_type!r}")
        if cfg.sample_ratio == 1 and cfg.token_ratio == 1:
            warnings.warn(
                "QTuningConfig(sample_ratio=1, token_ratio=1) keeps every sample and token: training is plain SFT "
                "plus the scoring cost",
                stacklevel=3,
            )
        if cfg.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                warnings.warn(
                    "QTuningConfig(plot=True) but matplotlib is not installed: no EU-plane plots", stacklevel=3
                )
                cfg.plot = False

    # ------------------------------------------------------------------ callback events
    def on_init_end(self, args, state, control, **kwargs):
        if self.trainer is None:
            trainer = find_trainer(self)
            if trainer is not None:
                self.attach(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            trainer = find_trainer(self)
            if trainer is None:
                raise RuntimeError(
                    "QTuningCallback could not find its Trainer; call QTuningCallback(...).attach(trainer) before "
                    "trainer.train()"
                )
            self.attach(trainer)
        self._acc = {}

    def on_step_end(self, args, state, control, **kwargs):
        self._acc["steps"] = self._acc.get("steps", 0) + 1
        cfg = self.config
        if cfg.plot and cfg.plot_steps and state.global_step % cfg.plot_steps == 0 and state.is_world_process_zero:
            self._plot(args, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.config.plot and state.is_world_process_zero and self._points:
            self._plot(args, state.global_step)

    def _plot(self, args, step: int) -> None:
        if not self._points:
            return
        folder = self.config.plot_dir or os.path.join(args.output_dir, "qtuning")
        pts = torch.tensor(list(self._points), dtype=torch.float64)
        plot_eu_plane(
            pts[:, 0],
            pts[:, 1],
            pts[:, 2].long(),
            os.path.join(folder, f"eu_plane_step{step:06d}.png"),
            thresholds=self._last_thresholds,
            title=f"Q-Tuning EU plane, step {step} ({len(pts)} recent samples)",
        )

    # ------------------------------------------------------------------ logging
    def _log(self, logs: dict[str, float], *args: Any, **kwargs: Any):
        if "loss" in logs and self._acc.get("steps"):
            logs.update(self._flush_metrics())
        return self._orig_log(logs, *args, **kwargs)

    def _flush_metrics(self) -> dict[str, float]:
        acc, steps = self._acc, self._acc.get("steps", 0)
        out: dict[str, float] = {}
        if acc.get("samples"):
            for q, name in QUADRANT_NAMES.items():
                out[f"qtuning/q{q}_{name}"] = acc.get(f"q{q}", 0.0) / steps
            out["qtuning/empty_samples"] = acc.get("q0", 0.0) / steps
            out["qtuning/kept_sample_share"] = acc.get("kept_samples", 0.0) / acc["samples"]
            out["qtuning/kept_token_share"] = acc.get("kept_tokens", 0.0) / max(acc.get("tokens", 0.0), 1.0)
            out["qtuning/misconception_token_share"] = acc.get("q2_kept_tokens", 0.0) / max(
                acc.get("q2_tokens", 0.0), 1.0
            )
            out["qtuning/level"] = acc.get("level", 0.0) / max(acc.get("triages", 1.0), 1.0)
            if "scoring_seconds" in acc:  # two-pass: wall time of the scoring forwards
                out["qtuning/scoring_seconds"] = acc["scoring_seconds"] / steps
        self._acc = {}
        return out

    # ------------------------------------------------------------------ triage of one pool
    def _triage(self, nll: list[torch.Tensor], ent: list[torch.Tensor], mask: list[torch.Tensor]):
        """Triage the samples of several micro-batches (and of all ranks) with one rule.

        Returns per micro-batch (row keep [B] bool, token keep [B, T] bool) for this rank.
        """
        cfg = self.config
        ppl_l, ent_l = zip(*(sample_ppl_entropy(a, b, m) for a, b, m in zip(nll, ent, mask)))
        local = torch.stack([torch.cat(ppl_l).log(), torch.cat(ent_l)], 1)  # log PPL = mean NLL: no overflow
        stats, offset = _gather_rows(local)
        tri = eu_triage(stats[:, 0].exp(), stats[:, 1], cfg.sample_ratio)
        n_local = local.size(0)
        keep = tri.keep[offset : offset + n_local]
        quad = tri.quadrant[offset : offset + n_local]
        out, start = [], 0
        n_tok = torch.zeros(4, dtype=torch.float64, device=local.device)  # tokens, kept, q2 tokens, q2 kept
        for a, m in zip(nll, mask):
            b = a.size(0)
            k, q = keep[start : start + b], quad[start : start + b]
            start += b
            tok = m & k.unsqueeze(1)
            mis = q == 2
            if mis.any():
                sel = select_tokens(
                    a[mis], m[mis], cfg.token_ratio, cfg.lam, keep=cfg.token_keep, neighbor_mean=cfg.neighbor_mean
                )
                tok[mis] = sel
                n_tok[2] += m[mis].sum()
                n_tok[3] += sel.sum()
            n_tok[0] += m.sum()
            n_tok[1] += tok.sum()
            out.append((k, tok))
        n_tok = _all_sum(n_tok)
        self._record(stats, tri, offset, n_local, n_tok)
        return out

    def _record(self, stats, tri: EUTriage, offset: int, n_local: int, n_tok: torch.Tensor) -> None:
        acc = self._acc
        counts = torch.bincount(tri.quadrant.cpu(), minlength=5)
        for q in range(5):
            acc[f"q{q}"] = acc.get(f"q{q}", 0.0) + float(counts[q])
        acc["samples"] = acc.get("samples", 0.0) + float(tri.quadrant.numel() - counts[0])
        acc["kept_samples"] = acc.get("kept_samples", 0.0) + float(tri.keep.sum())
        for i, key in enumerate(("tokens", "kept_tokens", "q2_tokens", "q2_kept_tokens")):
            acc[key] = acc.get(key, 0.0) + float(n_tok[i])
        acc["level"] = acc.get("level", 0.0) + tri.level
        acc["triages"] = acc.get("triages", 0.0) + 1
        if counts[0] and not self._warned_empty:
            self._warned_empty = True
            warnings.warn(
                f"Q-Tuning: {int(counts[0])} sample(s) in a batch have no response tokens (all labels -100); they "
                "are dropped and counted as qtuning/empty_samples (check max_length and the completion masks)",
                stacklevel=2,
            )
        self._last_thresholds = tri.thresholds
        ppl = stats[:, 0].exp().cpu()
        for p, e, q in zip(ppl.tolist(), stats[:, 1].cpu().tolist(), tri.quadrant.cpu().tolist()):
            if q:
                self._points.append((p, e, q))
        self.records.append(
            {
                "level": tri.level,
                "thresholds": dict(tri.thresholds),
                "target": tri.target,
                "log_ppl": stats[:, 0].cpu().tolist(),
                "entropy": stats[:, 1].cpu().tolist(),
                "keep": tri.keep.cpu().tolist(),
                "quadrant": tri.quadrant.cpu().tolist(),
                "offset": offset,
                "n_local": n_local,
            }
        )

    # ------------------------------------------------------------------ scoring forward (two-pass)
    def _scoring_model(self):
        model = self.trainer.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @torch.no_grad()
    def _score(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """No-grad per-token NLL and entropy [B, L−1] of a micro-batch, projecting only response positions."""
        model = self._scoring_model()
        labels = batch["labels"]
        mask = labels[:, 1:] != IGNORE_INDEX
        inputs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        was_training = model.training
        model.eval()  # deterministic scores: no dropout (LoRA dropout included)
        try:
            with self.trainer.accelerator.autocast():
                backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
                head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
                cfg = getattr(model, "config", None)
                text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
                scaled = any(
                    getattr(text_cfg, a, None) not in (None, 1, 1.0)
                    for a in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier")
                ) or getattr(text_cfg, "logits_scaling", None) not in (None, 1, 1.0)
                if backbone is not None and head is not None and not scaled and backbone is not model:
                    # only the response positions go through the LM head (a large share of a small model's FLOPs)
                    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1]
                    h = hidden[mask]
                    tgt = labels[:, 1:][mask]
                    nll_v, ent_v = [], []
                    for i in range(0, h.size(0), 1024):
                        logp = head(h[i : i + 1024]).float().log_softmax(-1)
                        nll_v.append(-logp.gather(-1, tgt[i : i + 1024, None]).squeeze(-1))
                        ent_v.append(-(logp.exp() * logp).sum(-1))
                    nll = torch.zeros(mask.shape, dtype=torch.float32, device=labels.device)
                    ent = torch.zeros_like(nll)
                    if h.size(0):
                        nll[mask] = torch.cat(nll_v).to(nll.device)
                        ent[mask] = torch.cat(ent_v).to(ent.device)
                else:
                    logits = model(**inputs, use_cache=False).logits
                    nll, ent, mask = token_nll_entropy(logits, labels)
        finally:
            model.train(was_training)
        return nll, ent, mask

    # ------------------------------------------------------------------ two-pass: prune the step's micro-batches
    def _get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = self._orig_get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, num_items
        batches = [self._to_device(b, device) for b in batches]
        t0 = time.perf_counter()
        scored = [self._score(b) for b in batches]
        self._acc["scoring_seconds"] = self._acc.get("scoring_seconds", 0.0) + time.perf_counter() - t0
        plan = self._triage(*zip(*scored))
        pruned = [self._prune_batch(b, k, t) for b, (k, t) in zip(batches, plan)]
        if num_items is not None:  # recount from the pruned labels, with the trainer's own rules (shift, ranks)
            _, num_items = self._orig_get_batch_samples(iter(pruned), len(pruned), device)
        return pruned, num_items

    @staticmethod
    def _to_device(batch, device):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @staticmethod
    def _prune_batch(batch: dict[str, Any], keep_rows: torch.Tensor, keep_tokens: torch.Tensor) -> dict[str, Any]:
        """Keep the selected rows, label −100 on pruned tokens, and cut the trailing columns no kept label needs."""
        labels = batch["labels"]
        bsz, length = labels.shape
        new_labels = labels.clone()
        new_labels[:, 1:] = torch.where(keep_tokens, labels[:, 1:], IGNORE_INDEX)
        rows = keep_rows.nonzero().squeeze(1)
        if rows.numel() == 0:
            # Nothing kept: a 1-row, 2-column stand-in the loss turns into a zero (runs a tiny forward only under
            # DDP, where every rank must reach backward)
            out = {k: _slice(v, bsz, length, torch.arange(1, device=labels.device), 2) for k, v in batch.items()}
            out["labels"] = torch.full_like(out["labels"], IGNORE_INDEX)
            out[_SKIP_KEY] = True
            return out
        sub = new_labels[rows]
        has = (sub != IGNORE_INDEX).any(0)
        cut = int(has.nonzero().max()) + 1 if has.any() else 2
        out = {k: _slice(v, bsz, length, rows, cut) for k, v in batch.items()}
        out["labels"] = sub[:, :cut]
        return out

    # ------------------------------------------------------------------ compute_loss
    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if inputs.pop(_SKIP_KEY, False):
            return self._zero_loss(model, inputs, return_outputs)
        if self.config.mode == "single_pass" and model.training and "labels" in inputs:
            return self._single_pass_loss(model, inputs, return_outputs, num_items_in_batch)
        return self._orig_compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
        )

    def _zero_loss(self, model, inputs, return_outputs):
        if _world()[1] > 1:  # every DDP rank must run forward/backward so the gradient all-reduce lines up
            fwd = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            outputs = model(**fwd, use_cache=False)
            loss = outputs.logits.sum() * 0.0
        else:
            outputs = None
            loss = torch.zeros((), device=inputs["input_ids"].device, requires_grad=True)
        return (loss, outputs) if return_outputs else loss

    def _trainer_divides_by_ga(self, num_items_in_batch) -> bool:
        t = self.trainer
        flag = getattr(t, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return not flag
        scaled = (getattr(t, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or getattr(
            t, "compute_loss_func", None
        ) is not None
        return not scaled

    def _single_pass_loss(self, model, inputs, return_outputs, num_items_in_batch):
        trainer = self.trainer
        labels = inputs["labels"]
        dft = getattr(trainer.args, "loss_type", None) == "dft"
        if _is_sft_trainer(trainer):
            outputs = model(**{**inputs, "use_cache": False, "fused_lm_head": True})
            logp = outputs.log_probs  # [B, L−1], zero on ignored positions
            mask = labels[:, 1:] != IGNORE_INDEX
            nll, ent = -logp, outputs.entropy.detach()
        else:
            fwd = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            outputs = model(**fwd, use_cache=False)
            nll, ent, mask = token_nll_entropy(outputs.logits, labels)
            ent = ent.detach()
        ((_, keep_tok),) = self._triage([nll.detach()], [ent], [mask])
        per_token = nll * (-nll.detach()).exp() if dft else nll  # DFT: NLL weighted by sg(p)
        kept = _all_sum(keep_tok.sum().to(torch.float64))
        # Masked mean over the kept tokens of all ranks (×world: DDP averages gradients over ranks)
        loss = (per_token * keep_tok).sum() / kept.clamp(min=1).to(per_token.dtype) * _world()[1]
        if not self._trainer_divides_by_ga(num_items_in_batch):
            loss = loss / trainer.current_gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss


def _slice(v: Any, bsz: int, length: int, rows: torch.Tensor, cut: int) -> Any:
    """Rows (dim 0) of per-sample tensors, then the first ``cut`` columns of per-token ones."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.size(0) != bsz:
        return v
    v = v[rows]
    if v.dim() >= 2 and v.size(1) == length:
        v = v[:, :cut]
    return v
