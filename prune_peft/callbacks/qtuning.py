"""Q-Tuning in the Trainer: :class:`QTuningCallback` + :class:`QTuningTrainerMixin`.

Q-Tuning (Wang et al., arXiv 2509.23873) keeps, per optimizer step, the misconception and calibration samples of the
Error-Uncertainty plane and prunes the less salient tokens of the misconception samples; the selection math is the
pure tensor code of :mod:`prune_peft.sparsity.qtuning`.

Selecting samples and tokens changes the batch and the loss, which a ``TrainerCallback`` cannot do. So the work is
split along the Trainer's documented extension points:

- :class:`QTuningCallback` (a :class:`~prune_peft.callbacks._trainer.MetricsCallback`) holds the configuration,
  triages each pool of samples (:meth:`QTuningCallback.triage`), keeps the per-step metrics and writes the EU-plane
  plots;
- :class:`QTuningTrainerMixin` overrides the public ``Trainer.get_batch_samples`` (two-pass: score, triage and prune
  the step's micro-batches, recount ``num_items_in_batch``), ``Trainer.compute_loss`` (single-pass masked loss; a zero
  loss for an emptied micro-batch) and, through :class:`~prune_peft.callbacks._trainer.PruneTrainerMixin`,
  ``Trainer.log`` (metrics reach every reporter). :class:`QTuningTrainer` and :class:`QTuningSFTTrainer` are the
  mixin on ``transformers.Trainer`` and ``trl.SFTTrainer``::

    trainer = QTuningSFTTrainer(model, args=cfg, train_dataset=ds, peft_config=lora,
                                callbacks=[QTuningCallback(QTuningConfig(sample_ratio=0.25, token_ratio=0.5))])

A ``QTuningCallback`` in a Trainer without the mixin raises a ``ValueError`` at ``on_train_begin`` naming the fix.

Distributed (docs/distributed.md): every rank scores its own samples; the per-sample statistics of all ranks are
all-gathered, so the quantile thresholds and the keep decisions are those of one process seeing the whole step's batch
(DDP and FSDP2 alike). Under FSDP2 the two-pass scoring forward runs through the sharded root model (FSDP2 gathers the
embedding and LM head only in the root's forward) under ``no_grad``. DeepSpeed ZeRO-3 and bitsandbytes layers in an
FSDP2 model are refused (:func:`prune_peft._dist.refuse_sharded_bnb` says why).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import Trainer

from .._dist import refuse_sharded_bnb, refuse_zero3, sharding_kind
from ..sparsity.qtuning import (
    IGNORE_INDEX,
    QUADRANT_NAMES,
    EUTriage,
    check_ratio,
    eu_triage,
    sample_ppl_entropy,
    select_tokens,
    token_nll_entropy,
)
from ._trainer import MetricsCallback, PruneTrainerMixin, lazy_trainer

__all__ = [
    "QTuningCallback",
    "QTuningConfig",
    "QTuningTrainerMixin",
    "eu_plane_figure",
    "plot_eu_plane",
]


# ---------------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------------


def _log_ticks(ax, lo: float, hi: float) -> None:
    """Readable log-scale y ticks: plain numbers at 1-2-5 steps (matplotlib's default labels only powers of ten, so a
    range like 3…40 would carry a single label)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    lo, hi = max(lo, 1e-300), max(hi, lo * 1.0001)
    ticks = [
        m * 10.0**e
        for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
        for m in (1, 2, 5)
        if lo / 1.5 <= m * 10.0**e <= hi * 1.5
    ]
    if len(ticks) > 9:  # wide range: powers of ten only
        ticks = [t for t in ticks if math.isclose(10 ** round(math.log10(t)), t)]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def eu_plane_figure(
    ppl,
    entropy,
    quadrant,
    thresholds: dict | None = None,
    title: str = "",
    step=None,
    panel_titles: dict[int, str] | None = None,
    max_panels: int = 4,
):
    """The EU-plane figure: one panel per step (the last ``max_panels``), each step's samples against that step's
    own thresholds (Q-Tuning's quantile thresholds are recomputed on every step's batch).

    ``step`` [n] assigns each sample to its step (triage); then ``thresholds`` maps step → ``{"ppl_low", "ppl_high",
    "ent_low", "ent_high"}``. Without ``step`` all samples are one step and ``thresholds`` is that step's dict.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ppl, entropy, quadrant = (torch.as_tensor(x).cpu() for x in (ppl, entropy, quadrant))
    if step is None:
        if thresholds is not None and not {"ppl_low", "ppl_high", "ent_low", "ent_high"} <= set(thresholds):
            raise ValueError(f"thresholds must hold ppl_low, ppl_high, ent_low, ent_high, got {sorted(thresholds)}")
        step = torch.zeros(ppl.numel(), dtype=torch.long)
        per_step = {0: thresholds} if thresholds else {}
    else:
        step = torch.as_tensor(step).cpu().long()
        per_step = dict(thresholds or {})
        if any(not isinstance(v, dict) for v in per_step.values()):
            raise ValueError("with step given, thresholds must map each step to its own thresholds dict")
    if not (ppl.shape == entropy.shape == quadrant.shape == step.shape) or ppl.dim() != 1:
        raise ValueError(
            f"ppl, entropy, quadrant and step must be 1-D of equal length, got {[tuple(x.shape) for x in (ppl, entropy, quadrant, step)]}"
        )
    groups = sorted(set(step.tolist()))[-max_panels:] or [0]
    fig = Figure(figsize=(4.2 * len(groups) + 0.6, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    colours = {1: "tab:red", 2: "tab:orange", 3: "tab:gray", 4: "tab:blue"}
    shown = torch.isin(step, torch.tensor(groups)) & (ppl > 0)
    values = [float(v) for v in ppl[shown].tolist()] + [
        per_step[g][k] for g in groups if per_step.get(g) for k in ("ppl_low", "ppl_high")
    ]
    for ax, g in zip(axes, groups):
        in_step = step == g
        for q, name in QUADRANT_NAMES.items():
            sel = in_step & (quadrant == q)
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
        thr = per_step.get(g)
        if thr:
            for key in ("ent_low", "ent_high"):
                ax.axvline(thr[key], color="k", lw=0.6, ls="--")
            for key in ("ppl_low", "ppl_high"):
                ax.axhline(thr[key], color="k", lw=0.6, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("mean predictive entropy (uncertainty)")
        ax.set_title((panel_titles or {}).get(g, f"step {g}" if len(groups) > 1 else ""), fontsize=9)
        if ax.collections:
            ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("perplexity (error)")
    if values:
        _log_ticks(axes[0], min(values), max(values))
    fig.suptitle(title or "Q-Tuning EU plane", fontsize=10)
    fig.tight_layout()
    return fig


def plot_eu_plane(
    ppl,
    entropy,
    quadrant,
    path,
    thresholds: dict | None = None,
    title: str = "",
    step=None,
    panel_titles: dict[int, str] | None = None,
) -> str:
    """Write :func:`eu_plane_figure` (x = mean entropy, y = perplexity on a log scale, colours = quadrants) as PNG."""
    fig = eu_plane_figure(ppl, entropy, quadrant, thresholds, title, step, panel_titles)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face wiring
# ---------------------------------------------------------------------------------------------------------------

MODES = ("two_pass", "single_pass")
SCORE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QTuningConfig:
    """Q-Tuning settings. Every ratio is a kept share in (0, 1]; ``sample_ratio=0.25, token_ratio=0.5`` is the
    paper's "25% × 50%" budget (12.5% of the samples' worth of data).

    >>> QTuningCallback(QTuningConfig(sample_ratio=0.25, token_ratio=0.5))  # in a QTuningTrainer/QTuningSFTTrainer
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
    score_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "two-pass: score the step's samples (all micro-batches of the accumulation window) in chunks of "
            "this many rows, e.g. larger than per_device_train_batch_size; None: one scoring forward per micro-batch"
        },
    )
    score_dtype: str | None = field(
        default=None,
        metadata={
            "help": "two-pass: autocast the scoring forward to 'bfloat16' or 'float16' (log-softmax stays float32), "
            "or 'float32'; None: the trainer's own precision (bf16/fp16 args)"
        },
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
        check_ratio("sample_ratio", self.sample_ratio)
        check_ratio("token_ratio", self.token_ratio)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0 <= self.lam <= 1:
            raise ValueError(f"lam must be a number in [0, 1], got {self.lam!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.token_keep not in ("low", "high"):
            raise ValueError(f"token_keep must be 'low' or 'high', got {self.token_keep!r}")
        sbs = self.score_batch_size
        if sbs is not None and (isinstance(sbs, bool) or not isinstance(sbs, int) or sbs < 1):
            raise ValueError(f"score_batch_size must be None or an integer >= 1, got {sbs!r}")
        if self.score_dtype is not None and self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be None or one of {list(SCORE_DTYPES)}, got {self.score_dtype!r}")
        if self.mode != "two_pass" and (sbs is not None or self.score_dtype is not None):
            raise ValueError(
                "score_batch_size and score_dtype set the two-pass scoring forward; mode='single_pass' scores from "
                f"the training forward: leave them None (got score_batch_size={sbs!r}, score_dtype={self.score_dtype!r})"
            )
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
    from trl import SFTTrainer  # here, not at import: `import prune_peft` loads no trl

    if not isinstance(trainer, SFTTrainer):
        return False
    try:  # the fused LM head (per-token log-probs and entropy, no full logits) arrived with trl 1.x
        from trl.trainer.utils import add_fused_lm_head  # noqa: F401
    except ImportError:
        return False
    return True


_SKIP_KEY = "_qtuning_skip"  # marks a micro-batch whose samples were all dropped
_NON_MODEL_KEYS = {"labels", "shift_labels", "num_items_in_batch", "use_cache", _SKIP_KEY}
_NEEDS_MIXIN = (
    "QTuningCallback selects samples and tokens, which changes the batches and the loss, and a TrainerCallback cannot "
    "do that: train with a Trainer that has QTuningTrainerMixin, i.e. prune_peft.QTuningTrainer (for "
    "transformers.Trainer), prune_peft.QTuningSFTTrainer (for trl.SFTTrainer), or your own "
    "`class MyTrainer(QTuningTrainerMixin, SomeTrainer)`, with callbacks=[QTuningCallback(...)]"
)


class QTuningCallback(MetricsCallback):
    """Q-Tuning settings, triage bookkeeping, ``qtuning/*`` metrics and EU-plane plots.

    Use it with a Trainer that has :class:`QTuningTrainerMixin` (``QTuningTrainer``, ``QTuningSFTTrainer``)::

        trainer = QTuningSFTTrainer(model, args=cfg, train_dataset=ds, peft_config=lora,
                                    callbacks=[QTuningCallback(QTuningConfig(sample_ratio=0.25, token_ratio=0.5))])

    - two-pass mode: every micro-batch of the optimizer step is scored with a no-grad forward, the whole step (all
      micro-batches, all ranks) is triaged at once, dropped samples are removed, pruned tokens get label −100,
      trailing columns no kept label needs are cut, and ``num_items_in_batch`` is recounted from the pruned labels —
      so the trainer's own loss (trl's NLL/DFT, ``compute_loss_func``, label smoothing) is the exact masked mean over
      the kept tokens, gradient accumulation included;
    - single-pass mode: the training forward gives per-token NLL and entropy, the micro-batch is triaged and the loss
      is the masked mean over kept tokens (exact with one micro-batch per step; with gradient accumulation each
      micro-batch is normalised by its own kept-token count);
    - per-step quadrant counts and kept shares are returned by :meth:`log_metrics`, so they reach ``log_history``
      and (with the mixin's ``log``) the reporters (TensorBoard, W&B).

    The mixin calls :meth:`bind` when the trainer is built or ``train()`` starts; that is where the Trainer's
    settings are checked. Without the mixin, :meth:`on_train_begin` raises a ``ValueError``.
    """

    def __init__(self, config: QTuningConfig | None = None, **overrides: Any) -> None:
        if config is not None and not isinstance(config, QTuningConfig):
            raise ValueError(f"config must be a QTuningConfig, got {type(config).__name__}")
        base = asdict(config) if config is not None else {}
        self.config = QTuningConfig(**{**base, **overrides})
        self.trainer: Trainer | None = None  # the QTuningTrainerMixin trainer this callback serves (set by bind)
        self.records: deque[dict[str, Any]] = deque(maxlen=16)  # last triage results (debugging, tests)
        self._acc: dict[str, float] = {}
        # (ppl, ent, quadrant, triage) for the plot, and each triage's own thresholds and optimizer step
        self._points: deque[tuple[float, float, int, int]] = deque(maxlen=4096)
        self._thresholds: dict[int, dict[str, float]] = {}
        self._triage_step: dict[int, int] = {}
        self._triages = 0
        self._warned_empty = False

    # ------------------------------------------------------------------ binding (called by QTuningTrainerMixin)
    def bind(self, trainer: Trainer) -> None:
        """Check ``trainer``'s settings and serve it; called by :class:`QTuningTrainerMixin` (idempotent)."""
        if self.trainer is trainer:
            return
        if self.trainer is not None:
            raise ValueError("this QTuningCallback already serves another trainer; make a new QTuningCallback")
        if not isinstance(trainer, QTuningTrainerMixin):
            raise ValueError(_NEEDS_MIXIN)
        self._validate(trainer)
        self.trainer = trainer

    def _validate(self, trainer: Trainer) -> None:
        cfg, args = self.config, trainer.args
        refuse_zero3(trainer.model, "QTuningCallback")
        refuse_sharded_bnb(trainer.model, "QTuningCallback")
        teacher = getattr(trainer.compute_loss_func, "teacher", None)
        if cfg.mode == "two_pass" and isinstance(teacher, torch.nn.Module) and sharding_kind(teacher) == "fsdp2":
            raise ValueError(
                "Q-Tuning two-pass with an FSDP2-sharded KD teacher (compute_loss_func=LogitDistillation(...)): a rank "
                "whose micro-batch keeps no sample skips the loss function, so its teacher forward (an FSDP2 "
                "all-gather) would be missing on that rank and the others would wait forever. Use a replicated "
                "teacher, precomputed top-k teacher logits (LogitDistillation(topk=...)), or sample_ratio=1.0"
            )
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
            if trainer.compute_loss_func is not None or getattr(args, "label_smoothing_factor", 0):
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
    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer passes its own `args` to every event: a bound trainer with other args is another trainer.
        if self.trainer is None or self.trainer.args is not args:
            raise ValueError(_NEEDS_MIXIN)
        if kwargs.get("model") is not None:  # the model as wrapped by accelerate (DeepSpeed init happens in train())
            refuse_zero3(kwargs["model"], "QTuningCallback")
            refuse_sharded_bnb(kwargs["model"], "QTuningCallback")
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
        triage = pts[:, 3].long()
        ids = sorted(set(triage.tolist()))
        titles = {t: f"step {self._triage_step.get(t, '?')} (triage {t})" for t in ids}
        plot_eu_plane(
            pts[:, 0],
            pts[:, 1],
            pts[:, 2].long(),
            os.path.join(folder, f"eu_plane_step{step:06d}.png"),
            thresholds={t: self._thresholds[t] for t in ids if t in self._thresholds},
            title=f"Q-Tuning EU plane up to step {step}: each step's samples against its own thresholds",
            step=triage,
            panel_titles=titles,
        )

    # ------------------------------------------------------------------ metrics
    def log_metrics(self) -> dict[str, float]:
        """Per-step means since the last log (empty when no step ran); resets the accumulators."""
        acc, steps = self._acc, self._acc.get("steps", 0)
        if not steps:
            return {}
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
            for key in ("scoring_seconds", "select_seconds"):  # two-pass: scoring forwards; triage + pruning
                if key in acc:
                    out[f"qtuning/{key}"] = acc[key] / steps
        self._acc = {}
        return out

    def add_scoring_time(self, seconds: float, key: str = "scoring_seconds") -> None:
        """Two-pass: wall time of one step's scoring forwards (``qtuning/scoring_seconds``) or of its triage,
        pruning and recount between scoring and training (``key="select_seconds"``)."""
        if key not in ("scoring_seconds", "select_seconds"):
            raise ValueError(f"key must be 'scoring_seconds' or 'select_seconds', got {key!r}")
        self._acc[key] = self._acc.get(key, 0.0) + seconds

    # ------------------------------------------------------------------ triage of one pool
    def triage(
        self, nll: list[torch.Tensor], ent: list[torch.Tensor], mask: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Triage the samples of several micro-batches (and of all ranks) with one rule.

        Per micro-batch, ``nll``/``ent``/``mask`` are [B, L−1] (:func:`~prune_peft.sparsity.qtuning.token_nll_entropy`).
        Returns per micro-batch (row keep [B] bool, token keep [B, L−1] bool) for this rank.
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
        self._triages += 1
        tid = self._triages
        self._thresholds[tid] = dict(tri.thresholds)
        state = getattr(self.trainer, "state", None)
        self._triage_step[tid] = int(getattr(state, "global_step", 0)) + 1  # the step this triage prepares
        for old in [t for t in self._thresholds if t <= tid - 64]:  # bounded, like the points
            self._thresholds.pop(old, None)
            self._triage_step.pop(old, None)
        ppl = stats[:, 0].exp().cpu()
        for p, e, q in zip(ppl.tolist(), stats[:, 1].cpu().tolist(), tri.quadrant.cpu().tolist()):
            if q:
                self._points.append((p, e, q, tid))
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


class QTuningTrainerMixin(PruneTrainerMixin):
    """Mixin for ``transformers.Trainer`` or trl's trainers that applies the Trainer's :class:`QTuningCallback`.

    Overrides only public, documented Trainer methods: ``get_batch_samples`` (two-pass pruning of the step's
    micro-batches), ``compute_loss`` (single-pass loss, zero loss for an emptied micro-batch), ``train`` (binds a
    callback added with ``add_callback`` after construction) and, from :class:`PruneTrainerMixin`, ``log``. Without
    a ``QTuningCallback`` among its callbacks the trainer behaves exactly like its base class::

        class QTuningSFTTrainer(QTuningTrainerMixin, SFTTrainer): ...
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bind_qtuning()  # bad settings fail at construction, before any work

    @property
    def qtuning_callback(self) -> QTuningCallback | None:
        """The trainer's :class:`QTuningCallback`, or ``None``."""
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, QTuningCallback)]  # type: ignore[attr-defined]
        if len(found) > 1:
            raise ValueError(f"the trainer has {len(found)} QTuningCallbacks; use only one")
        return found[0] if found else None

    def _bind_qtuning(self) -> QTuningCallback | None:
        cb = self.qtuning_callback
        if cb is not None:
            cb.bind(self)  # type: ignore[arg-type]
        return cb

    def train(self, *args: Any, **kwargs: Any):
        self._bind_qtuning()
        return super().train(*args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------ two-pass: prune the step's micro-batches
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        cb = self._bind_qtuning()
        if cb is None or cb.config.mode != "two_pass" or not batches:
            return batches, num_items
        batches = [_to_device(b, device) for b in batches]
        t0 = time.perf_counter()
        scored = self.qtuning_score_batches(batches)
        cb.add_scoring_time(time.perf_counter() - t0)
        t1 = time.perf_counter()
        plan = cb.triage(*zip(*scored))
        pruned = [_prune_batch(b, k, t) for b, (k, t) in zip(batches, plan)]
        if num_items is not None:  # recount from the pruned labels, with the trainer's own rules (shift, ranks)
            _, num_items = super().get_batch_samples(iter(pruned), len(pruned), device)  # type: ignore[misc]
        cb.add_scoring_time(time.perf_counter() - t1, key="select_seconds")
        return pruned, num_items

    def qtuning_score_batches(
        self, batches: list[dict[str, Any]]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Two-pass scoring of one optimizer step's micro-batches: per micro-batch (nll, entropy, mask), [B, L−1].

        Runs in ``torch.inference_mode`` with the adapter's current weights and dropout off; with
        ``score_batch_size`` the rows of all micro-batches are scored in chunks of that size (right-padded to a
        common length: under causal attention later columns do not change earlier positions' scores).

        Under FSDP2 the forward goes through the root module (only its forward gathers the root's own shards: the
        embedding, final norm and LM head) and under ``no_grad`` (FSDP2 keeps the unsharded parameters it allocates;
        allocated under inference mode they could not be used for training afterwards).
        """
        cfg = self.qtuning_callback.config  # type: ignore[union-attr]
        root = self.model  # type: ignore[attr-defined]
        fsdp2 = sharding_kind(root) == "fsdp2"
        model = root.get_base_model() if hasattr(root, "get_base_model") else root
        was_training = model.training
        model.eval()  # deterministic scores: no dropout (LoRA dropout included)
        if fsdp2:
            model = root
        grad_off = torch.no_grad() if fsdp2 else torch.inference_mode()
        try:
            with grad_off, self._qtuning_autocast(cfg.score_dtype):
                if cfg.score_batch_size is None or not _can_merge(batches):
                    return [self._qtuning_score(model, b, fsdp2) for b in batches]
                merged, sizes, lengths = _merge_rows(batches)
                n, step = merged["labels"].size(0), cfg.score_batch_size
                parts = [
                    self._qtuning_score(model, _rows(merged, i, min(n, i + step)), fsdp2) for i in range(0, n, step)
                ]
                nll, ent, mask = (torch.cat(x) for x in zip(*parts))
                out, start = [], 0
                for b, length in zip(sizes, lengths):
                    rows = slice(start, start + b)
                    out.append((nll[rows, : length - 1], ent[rows, : length - 1], mask[rows, : length - 1]))
                    start += b
                return out
        finally:
            model.train(was_training)

    def _qtuning_autocast(self, score_dtype: str | None):
        if score_dtype is None:
            return self.accelerator.autocast()  # type: ignore[attr-defined]  # the trainer's own precision
        device = next(self.model.parameters()).device  # type: ignore[attr-defined]
        dtype = getattr(torch, score_dtype)
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _qtuning_score(
        self, model, batch: dict[str, Any], full: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token NLL and entropy [B, L−1] of one batch (no graph), projecting only response positions (``full``:
        the whole forward of ``model``, for an FSDP2 root whose own shards are gathered only by its forward)."""
        labels = batch["labels"]
        mask = labels[:, 1:] != IGNORE_INDEX
        inputs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        if full:
            return token_nll_entropy(model(**inputs, use_cache=False).logits, labels)
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
            return nll, ent, mask
        logits = model(**inputs, use_cache=False).logits
        return token_nll_entropy(logits, labels)

    # ------------------------------------------------------------------ compute_loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        cb = self.qtuning_callback
        if cb is None:
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
            )
        cb.bind(self)  # type: ignore[arg-type]
        if inputs.pop(_SKIP_KEY, False):
            return self._qtuning_zero_loss(model, inputs, return_outputs)
        if cb.config.mode == "single_pass" and model.training and "labels" in inputs:
            return self._qtuning_single_pass_loss(cb, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
        )

    def _qtuning_zero_loss(self, model, inputs, return_outputs):
        if _world()[1] > 1:  # every DDP rank must run forward/backward so the gradient all-reduce lines up
            fwd = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            outputs = model(**fwd, use_cache=False)
            loss = outputs.logits.sum() * 0.0
        else:
            outputs = None
            loss = torch.zeros((), device=inputs["input_ids"].device, requires_grad=True)
        return (loss, outputs) if return_outputs else loss

    def _qtuning_trainer_divides_by_ga(self, num_items_in_batch) -> bool:
        # Trainer.training_step divides the loss by the accumulation steps unless it is "scaled for GA"
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return not flag
        scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or getattr(
            self, "compute_loss_func", None
        ) is not None
        return not scaled

    def _qtuning_single_pass_loss(self, cb: QTuningCallback, model, inputs, return_outputs, num_items_in_batch):
        labels = inputs["labels"]
        dft = getattr(self.args, "loss_type", None) == "dft"  # type: ignore[attr-defined]
        if _is_sft_trainer(self):
            outputs = model(**{**inputs, "use_cache": False, "fused_lm_head": True})
            logp = outputs.log_probs  # [B, L−1], zero on ignored positions
            mask = labels[:, 1:] != IGNORE_INDEX
            nll, ent = -logp, outputs.entropy.detach()
        else:
            fwd = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            outputs = model(**fwd, use_cache=False)
            nll, ent, mask = token_nll_entropy(outputs.logits, labels)
            ent = ent.detach()
        ((_, keep_tok),) = cb.triage([nll.detach()], [ent], [mask])
        per_token = nll * (-nll.detach()).exp() if dft else nll  # DFT: NLL weighted by sg(p)
        kept = _all_sum(keep_tok.sum().to(torch.float64))
        # Masked mean over the kept tokens of all ranks (×world: DDP averages gradients over ranks)
        loss = (per_token * keep_tok).sum() / kept.clamp(min=1).to(per_token.dtype) * _world()[1]
        if not self._qtuning_trainer_divides_by_ga(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps  # type: ignore[attr-defined]
        return (loss, outputs) if return_outputs else loss


def __getattr__(name: str) -> Any:
    return lazy_trainer(__name__, name)


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


_PAD_VALUES = {"labels": IGNORE_INDEX}  # right-padding value per key (0 for input_ids, attention_mask, …)


def _can_merge(batches: list[dict[str, Any]]) -> bool:
    """Every micro-batch holds only per-row tensors [B] / [B, L] (no scalars, packed position ids …)."""
    for b in batches:
        bsz, length = b["labels"].shape
        for k, v in b.items():
            if k in ("num_items_in_batch", _SKIP_KEY):
                continue
            if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or v.size(0) != bsz:
                return False
            if v.dim() == 2 and v.size(1) != length:
                return False
    return len({tuple(sorted(k for k in b if k != "num_items_in_batch")) for b in batches}) == 1


def _merge_rows(batches: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
    """Rows of all micro-batches in one batch, right-padded to the longest (labels −100, other keys 0)."""
    lengths = [b["labels"].size(1) for b in batches]
    width = max(lengths)
    merged = {}
    for k in batches[0]:
        if k == "num_items_in_batch":
            continue
        parts = []
        for b in batches:
            v = b[k]
            if v.dim() == 2 and v.size(1) < width:
                v = torch.nn.functional.pad(v, (0, width - v.size(1)), value=_PAD_VALUES.get(k, 0))
            parts.append(v)
        merged[k] = torch.cat(parts)
    return merged, [b["labels"].size(0) for b in batches], lengths


def _rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in batch.items()}


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


def _slice(v: Any, bsz: int, length: int, rows: torch.Tensor, cut: int) -> Any:
    """Rows (dim 0) of per-sample tensors, then the first ``cut`` columns of per-token ones."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.size(0) != bsz:
        return v
    v = v[rows]
    if v.dim() >= 2 and v.size(1) == length:
        v = v[:, :cut]
    return v
