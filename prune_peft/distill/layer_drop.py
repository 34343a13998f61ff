"""Depth pruning: drop the ``n`` contiguous decoder blocks whose removal changes the hidden state least.

Gromov et al., 2024, "The Unreasonable Ineffectiveness of the Deeper Layers" (arXiv 2403.17887): for every start
position ``l`` compare the residual stream entering block ``l`` with the one leaving block ``l + n − 1`` by the
angular distance

    d(x, y) = arccos( x·y / (‖x‖ ‖y‖) ) / π        ∈ [0, 1]

(0: same direction, 1: opposite), averaged over calibration tokens; remove the span with the smallest distance.
This is step (1) of the Cerebras self-data-distillation recipe (Thangarasa et al., MLSys 2025, arXiv 2410.09982).
Gromov et al. score the last token of each sequence; ``token="last"`` reproduces that, the default ``"all"``
averages over every token (more signal from few calibration windows).

The pure tensor part (:func:`angular_distance`, :func:`span_distances`) has no HF imports; :func:`drop_layers`
wires it to a transformers model and rewrites the config so the result saves and loads as a normal checkpoint.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._hf import find_decoder_blocks, text_config

__all__ = ["LayerDropReport", "angular_distance", "block_distances", "drop_layers", "remove_blocks", "span_distances"]

TOKEN_MODES = ("all", "last")
# config attributes that hold one entry per decoder block and must shrink with the model (any other top-level list
# whose name contains "layer" and whose length is the block count is treated the same way)
_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers", "mlp_only_layers_types", "activation_sparsity_pattern")
# config attributes that list block *indices*: renumbered, dropped blocks removed
_LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers", "full_attn_idxs", "swa_layers", "global_attn_layers")
# config attributes that count a prefix of blocks (Qwen2's max_window_layers, DeepSeek's first_k_dense_replace)
_LAYER_PREFIX_COUNTS = ("max_window_layers", "first_k_dense_replace")


def _shrink_config(cfg, num: int, keep: list[int]) -> None:
    """Rewrite every block-indexed field of ``cfg`` for the kept blocks ``keep`` (of ``num``)."""
    if getattr(cfg, "num_hidden_layers", None) != num:
        return
    cfg.num_hidden_layers = len(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    for key, value in list(vars(cfg).items()):
        if not isinstance(value, (list, tuple)):
            continue
        if key in _LAYER_INDEX_LISTS:
            setattr(cfg, key, type(value)(new_index[i] for i in value if isinstance(i, int) and i in new_index))
        elif len(value) == num and (key in _PER_LAYER_CONFIG_LISTS or "layer" in key):
            setattr(cfg, key, type(value)(value[i] for i in keep))
    for key in _LAYER_PREFIX_COUNTS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= num:
            setattr(cfg, key, sum(1 for i in keep if i < value))


def angular_distance(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-vector angular distance ``arccos(cos_sim(x, y)) / π`` along the last dim (shape = ``x.shape[:-1]``).

    Computed in float64: near-identical vectors (the interesting case) sit where arccos is steepest, and float32
    rounding of the cosine would dominate the result.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x64, y64 = x.double(), y.double()
    cos = (x64 * y64).sum(-1) / (x64.norm(dim=-1) * y64.norm(dim=-1)).clamp_min(eps)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def span_distances(
    hidden: list[torch.Tensor] | torch.Tensor, n: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Summed angular distances for every span of ``n`` blocks, and the number of tokens summed over.

    ``hidden[l]`` is the residual stream entering block ``l`` (``hidden[L]`` = output of the last block), each
    ``[..., D]``. Entry ``l`` of the result is ``Σ_tokens d(hidden[l], hidden[l + n])`` — removing blocks
    ``l … l+n−1`` — for ``l = 0 … L − n``. ``mask`` (same leading shape, bool) selects the tokens that count.
    Returning sums (not means) lets callers accumulate over calibration batches exactly.
    """
    num_states = len(hidden)
    if not isinstance(n, int) or not 1 <= n < num_states:
        raise ValueError(f"n must be an integer in [1, {num_states - 1}] for {num_states - 1} blocks, got {n!r}")
    sums = []
    for start in range(num_states - n):
        d = angular_distance(hidden[start], hidden[start + n])
        sums.append((d[mask] if mask is not None else d).sum())
    count = int(mask.sum()) if mask is not None else hidden[0][..., 0].numel()
    return torch.stack(sums), count


@torch.no_grad()
def block_distances(
    model: nn.Module,
    tokens: torch.Tensor,
    n: int,
    *,
    batch_size: int = 8,
    token: str = "all",
    attention_mask: torch.Tensor | None = None,
) -> list[float]:
    """Mean angular distance for each span of ``n`` contiguous blocks of ``model`` over ``tokens`` [N, T].

    Forward hooks collect the input of block 0 and the output of every block, so this works for any
    Llama/Qwen2/Mistral-style model (``hidden_states`` returned by HF models end with the *normed* state, which
    is not the residual stream leaving the last block).
    """
    if token not in TOKEN_MODES:
        raise ValueError(f"token must be one of {list(TOKEN_MODES)}, got {token!r}")
    _, blocks = find_decoder_blocks(model)
    if not isinstance(n, int) or not 1 <= n < len(blocks):
        raise ValueError(
            f"n must be an integer in [1, {len(blocks) - 1}] (the model has {len(blocks)} blocks), got {n!r}"
        )
    device = next(model.parameters()).device
    states: list[torch.Tensor] = []

    def pre_hook(_m, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach())

    def post_hook(_m, _args, out):
        states.append((out[0] if isinstance(out, (tuple, list)) else out).detach())

    handles = [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [b.register_forward_hook(post_hook) for b in blocks]
    totals = torch.zeros(len(blocks) - n + 1, dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, tokens.shape[0], batch_size):
            ids = tokens[i : i + batch_size].to(device)
            am = attention_mask[i : i + batch_size].to(device) if attention_mask is not None else torch.ones_like(ids)
            states.clear()
            model(input_ids=ids, attention_mask=am, use_cache=False)
            if token == "last":  # last real token of each row (right padding assumed)
                last = am.long().sum(1) - 1
                rows = torch.arange(ids.shape[0], device=device)
                hidden = [h[rows, last] for h in states]
                mask = None
            else:
                hidden, mask = states, am.bool()
            sums, c = span_distances(hidden, n, mask)
            totals += sums.cpu()
            count += c
    finally:
        for h in handles:
            h.remove()
        states.clear()
        model.train(was_training)
    return (totals / max(count, 1)).tolist()


def remove_blocks(model: nn.Module, indices: list[int]) -> nn.Module:
    """Remove decoder blocks ``indices`` from ``model`` in place and rewrite what depends on the block count.

    Fixes ``config.num_hidden_layers``, per-layer config lists (``layer_types``, ``no_rope_layers`` …), lists of
    block indices (``mlp_only_layers``, ``moe_layers`` …: renumbered), prefix counts (``max_window_layers``) and
    each kept block's ``layer_idx`` attributes, so ``save_pretrained`` writes a stock checkpoint that plain
    ``from_pretrained`` rebuilds with the same attention type per block. The ``layer_idx`` attributes matter for
    the KV cache, which is indexed by them: stale values would write into the wrong (or a missing) cache slot.
    """
    blocks_name, blocks = find_decoder_blocks(model)
    num = len(blocks)
    drop = sorted(set(indices))
    if not drop or drop[0] < 0 or drop[-1] >= num:
        raise ValueError(f"block indices must be in [0, {num - 1}], got {indices!r}")
    if len(drop) >= num:
        raise ValueError(f"cannot remove all {num} decoder blocks")
    config = text_config(model)
    if getattr(config, "is_heterogeneous", False):
        raise ValueError("models with a heterogeneous per_layer_config are not supported by remove_blocks")
    keep = [i for i in range(num) if i not in set(drop)]
    new_blocks = nn.ModuleList([blocks[i] for i in keep])
    for new_idx, block in enumerate(new_blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    parent_name, _, attr = blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new_blocks)
    configs = {id(config): config, id(model.config): model.config}
    for cfg in configs.values():
        _shrink_config(cfg, num, keep)
    return model


@dataclass
class LayerDropReport:
    """What :func:`drop_layers` measured and removed."""

    n: int
    start: int
    removed: list[int]
    num_blocks_before: int
    num_blocks_after: int
    params_before: int
    params_after: int
    token: str = "all"
    calibration_samples: int = 0
    calibration_seqlen: int = 0
    distances: list[float] = field(default_factory=list)  # distances[l]: removing blocks l … l+n−1

    def to_dict(self) -> dict:
        return asdict(self)


def drop_layers(
    model: nn.Module,
    n: int,
    calibration=None,
    tokenizer=None,
    *,
    start: int | None = None,
    nsamples: int = 32,
    seqlen: int = 256,
    batch_size: int = 8,
    token: str = "all",
    skip_first: bool = False,
    seed: int = 0,
    text_column: str = "text",
    inplace: bool = False,
) -> tuple[nn.Module, LayerDropReport]:
    """Remove the ``n`` contiguous decoder blocks with the smallest angular distance; return ``(student, report)``.

    ``d(l) = mean_tokens arccos(cos(h_l, h_{l+n})) / π`` with ``h_l`` the residual stream entering block ``l``
    (Gromov et al., 2024, arXiv 2403.17887); blocks ``l* … l*+n−1`` with ``l* = argmin d`` are removed.

    Args:
        n: number of blocks to remove, ``1 ≤ n < num_blocks``.
        calibration: list of strings, ``datasets.Dataset`` with ``text_column``, or a LongTensor [N, T].
            Not needed when ``start`` is given.
        start: remove blocks ``start … start+n−1`` without measuring.
        token: ``"all"`` (mean over tokens, default) or ``"last"`` (last token only, as in Gromov et al.).
        skip_first: never remove block 0 (its input is the raw embedding; some recipes keep it).
        inplace: modify ``model`` itself. Default ``False`` returns a deep copy, so ``model`` stays available as
            the unpruned teacher for :func:`~prune_peft.distill.self_distill`.

    Example::

        student, report = drop_layers(model, n=6, calibration=texts, tokenizer=tok)
        student.save_pretrained("student")      # loads back with AutoModelForCausalLM.from_pretrained
    """
    _, blocks = find_decoder_blocks(model)
    num = len(blocks)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < num:
        raise ValueError(f"n must be an integer in [1, {num - 1}] (the model has {num} decoder blocks), got {n!r}")
    if token not in TOKEN_MODES:
        raise ValueError(f"token must be one of {list(TOKEN_MODES)}, got {token!r}")
    lowest = 1 if skip_first else 0
    if start is not None:
        if not isinstance(start, int) or not lowest <= start <= num - n:
            raise ValueError(f"start must be an integer in [{lowest}, {num - n}] for n={n}, got {start!r}")
    elif calibration is None:
        raise ValueError(
            "drop_layers needs calibration data (texts, a Dataset or a token tensor) or an explicit start="
        )
    elif skip_first and num - n < 1:
        raise ValueError(f"skip_first=True leaves no span of {n} blocks in a {num}-block model")

    report = LayerDropReport(
        n=n,
        start=-1,
        removed=[],
        num_blocks_before=num,
        num_blocks_after=num - n,
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=0,
        token=token,
    )
    if start is None:
        from ..data import calibration_tokens

        tokens = calibration_tokens(calibration, tokenizer, nsamples, seqlen, seed, text_column)
        report.calibration_samples, report.calibration_seqlen = tokens.shape
        report.distances = block_distances(model, tokens, n, batch_size=batch_size, token=token)
        candidates = range(lowest, num - n + 1)
        start = min(candidates, key=lambda s: report.distances[s])  # ties → the earliest span
    report.start = start
    report.removed = list(range(start, start + n))
    student = model if inplace else copy.deepcopy(model)
    remove_blocks(student, report.removed)
    report.params_after = sum(p.numel() for p in student.parameters())
    return student, report
