"""One-shot pruning of a causal LM, layer by layer over its decoder blocks.

The driver captures the inputs of the first decoder block once (running only the embeddings), then for each
block: hooks its linear layers to stream calibration statistics, runs the block, prunes its linears, and runs
it again so the *pruned* outputs become the next block's inputs (as in Wanda and SparseGPT). Peak memory is
one block's statistics plus the calibration activations — never the activations of the whole model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import functools
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._hf import find_decoder_blocks
from ..data import calibration_tokens
from ..sparsity import (
    InputStats,
    NMPattern,
    global_masks,
    magnitude_scores,
    nm_mask,
    nm_violations,
    parse_pattern,
    sparsegpt_prune,
    unstructured_mask,
    validate_sparsity,
    wanda_scores,
)
from ..sparsity.masks import keep_top, keep_top_per_row
from ..sparsity.owl import (
    OWL_DEFAULT_LAMBDA,
    OWL_DEFAULT_M,
    check_owl_args,
    largest_remainder,
    layer_outlier_ratio,
    owl_layer_sparsities,
    owl_prune_counts,
    spread_over_rows,
)

__all__ = ["METHODS", "SPARSITY_PROFILES", "PruneReport", "check_prune_args", "prune", "target_linears"]

METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSITY_PROFILES = ("uniform", "owl")
OWL_METHODS = ("wanda", "sparsegpt")
SCOPES = {"magnitude": ("layer", "row", "global"), "wanda": ("row", "layer"), "sparsegpt": ("block",)}
DEFAULT_SCOPE = {"magnitude": "layer", "wanda": "row", "sparsegpt": "block"}


@dataclass
class PruneReport:
    method: str
    pattern: str
    target_sparsity: float
    scope: str
    seconds: float = 0.0
    calibration_samples: int = 0
    calibration_seqlen: int = 0
    modules: dict[str, dict] = field(default_factory=dict)
    sparsity_profile: str = "uniform"
    # OWL only: per decoder layer (block name) its outlier ratio and target sparsity, and the hyperparameters
    owl: dict | None = None

    @property
    def sparsity(self) -> float:
        zeros = sum(m["zeros"] for m in self.modules.values())
        numel = sum(m["numel"] for m in self.modules.values())
        return zeros / max(numel, 1)

    @property
    def nm_valid(self) -> bool | None:
        if self.pattern == "unstructured":
            return None
        return all(m.get("nm_violations", 0) == 0 for m in self.modules.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        d["nm_valid"] = self.nm_valid
        return d


def target_linears(
    model: nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    inside_blocks_only: bool = True,
) -> dict[str, nn.Linear]:
    """Linear layers to prune. Default: every ``nn.Linear`` inside the decoder blocks (so embeddings and
    ``lm_head`` are skipped). ``include`` / ``exclude`` are fnmatch globs on module names; each must match."""
    blocks_name, _ = find_decoder_blocks(model)
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    in_blocks = {n: m for n, m in candidates.items() if n.startswith(blocks_name + ".")}
    for arg, patterns in (("include", include), ("exclude", exclude)):
        if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
            raise ValueError(f"{arg} must be a list of glob patterns on module names, got {patterns!r}")
    if include:
        pool = in_blocks if inside_blocks_only else candidates
        for pat in include:
            if not any(fnmatch.fnmatchcase(n, pat) for n in pool):
                where = "linear layers inside the decoder blocks" if inside_blocks_only else "linear layers"
                raise ValueError(f"include pattern {pat!r} matches no {where} (e.g. {next(iter(pool), None)!r})")
        chosen = {n: m for n, m in pool.items() if any(fnmatch.fnmatchcase(n, p) for p in include)}
    else:
        chosen = dict(in_blocks)
    for pat in exclude or []:
        if not any(fnmatch.fnmatchcase(n, pat) for n in chosen):
            raise ValueError(f"exclude pattern {pat!r} matches none of the {len(chosen)} target linear layers")
        chosen = {n: m for n, m in chosen.items() if not fnmatch.fnmatchcase(n, pat)}
    if not chosen and not include and not exclude:
        kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n.startswith(blocks_name + ".")})
        raise ValueError(
            f"model: no torch.nn.Linear layer inside the decoder blocks ({blocks_name}); found {kinds[:8]}. "
            "prune() handles float nn.Linear layers only: GPT-2-style Conv1D and quantized (e.g. dynamically "
            "quantized) layers are not supported; load the float model of a Linear-based architecture"
        )
    if not chosen:
        raise ValueError("include/exclude leave no linear layer to prune")
    for name, mod in chosen.items():
        quantized = getattr(mod.weight, "quant_state", None) is not None or type(mod).__module__.startswith(
            "bitsandbytes"
        )
        if quantized or not mod.weight.dtype.is_floating_point:
            raise ValueError(
                f"module {name!r} is quantized ({type(mod).__name__}, {mod.weight.dtype}); "
                "prune the float model, then quantize"
            )
    return chosen


class _StopForward(Exception):
    pass


@contextmanager
def _capture_block_inputs(block: nn.Module, store: list):
    def hook(_module, args, kwargs):
        store.append((args, kwargs) if not store else _share_with(store[0], (args, kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def _share_with(first: tuple, entry: tuple) -> tuple:
    """Reuse ``first``'s value for every block argument (except the hidden states) that is equal in ``entry`` —
    rotary cos/sin, position ids and masks of equal-length batches — so one copy, not one per batch, stays alive."""
    (first_args, first_kwargs), (args, kwargs) = first, entry
    if len(args) == len(first_args):
        args = (args[0], *(f if _same(f, a) else a for a, f in zip(args[1:], first_args[1:]))) if args else args
    kwargs = {
        k: first_kwargs[k] if k != "hidden_states" and k in first_kwargs and _same(first_kwargs[k], v) else v
        for k, v in kwargs.items()
    }
    return args, kwargs


def _release_freed_memory() -> None:
    """Hand memory that PyTorch has already freed back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Calibration passes free and re-allocate many MB-sized CPU tensors of varying size; glibc keeps those holes in
    its heap, and without trimming RSS creeps up block after block (measured on SmolLM2-135M with SparseGPT:
    +0.53× the model's size at the peak, +0.39× with trimming)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:  # not glibc (macOS, Windows, musl without the symbol)
        return None


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_block(block, args, kwargs) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _prune_weight(
    method: str,
    weight: torch.Tensor,
    stats: InputStats | None,
    sparsity: float,
    pattern: NMPattern | None,
    scope: str,
    blocksize: int,
    percdamp: float,
    n_prune: int | None = None,
):
    """Prune one weight; ``n_prune`` (OWL's integer count of this linear) replaces the per-group ``int(s · count)``."""
    if method == "sparsegpt":
        return sparsegpt_prune(
            weight, stats.H, sparsity, pattern, blocksize=blocksize, percdamp=percdamp, n_prune=n_prune
        )
    scores = magnitude_scores(weight) if method == "magnitude" else wanda_scores(weight, stats.sq_mean)
    if pattern:
        keep = nm_mask(scores, pattern.n, pattern.m)
    elif n_prune is None:
        keep = unstructured_mask(scores, sparsity, scope)
    elif scope == "row":  # the layer's count spread over its rows, per-row counts within one of each other
        rows, cols = scores.shape
        keep = keep_top_per_row(scores, cols - spread_over_rows(n_prune, rows, cols).to(scores.device))
    else:
        keep = keep_top(scores.reshape(1, -1), scores.numel() - n_prune).reshape(scores.shape)
    return weight * keep.to(weight.dtype), keep


def _module_stats(weight: torch.Tensor, pattern: NMPattern | None) -> dict:
    zeros = int((weight == 0).sum().item())
    d = {"shape": list(weight.shape), "numel": weight.numel(), "zeros": zeros, "sparsity": zeros / weight.numel()}
    if pattern is not None:
        d["nm_violations"] = nm_violations(weight, pattern.n, pattern.m)
    return d


def check_prune_args(
    method: str,
    sparsity: float | None,
    pattern: str | None,
    scope: str | None = None,
    sparsity_profile: str = "uniform",
    owl_m: float = OWL_DEFAULT_M,
    owl_lambda: float = OWL_DEFAULT_LAMBDA,
):
    """Validate the method/sparsity/pattern/scope/profile combination; returns ``(sparsity, NMPattern | None,
    scope)``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if sparsity_profile not in SPARSITY_PROFILES:
        raise ValueError(f"sparsity_profile must be one of {list(SPARSITY_PROFILES)}, got {sparsity_profile!r}")
    nm = parse_pattern(pattern)
    if sparsity_profile == "owl":
        if method not in OWL_METHODS:
            raise ValueError(
                f"sparsity_profile='owl' needs method in {list(OWL_METHODS)} (its outlier ratio uses calibration "
                f"activations), got method={method!r}"
            )
        if nm is not None:
            raise ValueError(
                f"sparsity_profile='owl' varies the sparsity per layer, which an N:M pattern fixes: got "
                f"pattern='{nm}'; use pattern='unstructured' (or None) with OWL, or sparsity_profile='uniform'"
            )
    if nm is not None:
        if sparsity is not None and abs(validate_sparsity(sparsity) - nm.sparsity) > 1e-9:
            raise ValueError(
                f"sparsity={sparsity} contradicts pattern='{nm}' (which implies {nm.sparsity:g}); "
                "pass one of them or make them agree"
            )
        sparsity = nm.sparsity
    elif sparsity is None:
        raise ValueError("sparsity is required for unstructured pruning (a fraction in [0, 1))")
    else:
        sparsity = validate_sparsity(sparsity)
    scope = scope or DEFAULT_SCOPE[method]
    if scope not in SCOPES[method]:
        raise ValueError(f"scope for method={method!r} must be one of {list(SCOPES[method])}, got {scope!r}")
    if sparsity_profile == "owl":
        check_owl_args(sparsity, owl_m, owl_lambda)
    return sparsity, nm, scope


@torch.no_grad()
def prune(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str | None = None,
    calibration=None,
    tokenizer=None,
    *,
    nsamples: int = 128,
    seqlen: int = 512,
    batch_size: int = 1,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    scope: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    seed: int = 0,
    text_column: str = "text",
    progress: bool = True,
    sparsity_profile: str = "uniform",
    owl_m: float = OWL_DEFAULT_M,
    owl_lambda: float = OWL_DEFAULT_LAMBDA,
) -> PruneReport:
    """Prune ``model`` in place and return a :class:`PruneReport`.

    Args:
        method: ``"magnitude"`` | ``"wanda"`` | ``"sparsegpt"``.
        sparsity: fraction removed, in [0, 1). Required for unstructured; for ``"N:M"`` it is implied
            (1 − N/M) and, if given, must agree.
        pattern: ``"unstructured"`` (default) or ``"N:M"`` (N kept of every M along the input dim).
        calibration: list of strings, ``datasets.Dataset`` with ``text_column``, or a LongTensor [n, seqlen].
            Required by Wanda and SparseGPT; magnitude needs none.
        nsamples, seqlen: calibration windows and their length. The default ``seqlen=512`` gives 128 × 512 tokens,
            4–8× fewer than the reference scripts (Wanda: 128 C4 windows of ``model.seqlen``, 4096 on LLaMA-2;
            SparseGPT: 128 × 2048), chosen so the embedded SmolLM2-135M prunes in minutes on a
            CPU without a GPU. To match the references pass ``seqlen=2048`` (SparseGPT, LLaMA-1 Wanda)
            or the model's context length (Wanda on LLaMA-2: 4096) with 128 C4 samples and ``seed=0``; see
            docs/oneshot.md.
        blocksize, percdamp: SparseGPT's lazy-update block (128) and Hessian damping (1 % of the mean diagonal),
            the reference's defaults.
        include / exclude: fnmatch globs on module names; default targets every linear inside the decoder
            blocks (embeddings and ``lm_head`` are never touched unless included, magnitude only).
        scope: comparison group for unstructured masks — magnitude: ``"layer"`` (default), ``"row"``,
            ``"global"``; Wanda: ``"row"`` (default) or ``"layer"``.
        sparsity_profile: ``"uniform"`` (default: every layer at ``sparsity``) or ``"owl"`` (Wanda and SparseGPT,
            unstructured only): OWL's outlier-weighed layerwise sparsity (Yin et al., 2023, arXiv 2310.05175). A
            first pass over the *dense* model measures each decoder layer's outlier ratio (the fraction of its Wanda
            scores above ``owl_m`` × their mean); layers with more outliers get lower sparsity, within a band of
            width 2·``owl_lambda`` around ``sparsity``, and the parameter-weighted mean of the layer sparsities is
            ``sparsity`` exactly; in whole weights ⌊s·N + ½⌋ of the N targets are pruned (largest-remainder
            integer counts per layer and linear, spread over rows within one of each other; see
            :mod:`prune_peft.sparsity.owl`). Costs one extra forward pass per block.
        owl_m, owl_lambda: OWL's M (default 5) and λ (default 0.08), the paper's values; λ must be below
            min(sparsity, 1 − sparsity)/2.

    Example::

        report = prune(model, method="wanda", sparsity=0.5, pattern="2:4", calibration=texts, tokenizer=tok)
    """
    # ---- validate everything before a single weight changes ----
    sparsity, nm, scope = check_prune_args(method, sparsity, pattern, scope, sparsity_profile, owl_m, owl_lambda)
    for arg, value in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    targets = target_linears(model, include, exclude, inside_blocks_only=(method != "magnitude"))
    if nm is not None:
        bad = {n: m.in_features for n, m in targets.items() if m.in_features % nm.m}
        if bad:
            name, width = next(iter(bad.items()))
            raise ValueError(
                f"pattern='{nm}' needs in_features divisible by {nm.m}; {len(bad)} module(s) are not, "
                f"e.g. {name!r} with in_features={width}"
            )
    tokens = None
    if method != "magnitude":
        if calibration is None:
            raise ValueError(f"method={method!r} needs calibration data (list of strings, datasets.Dataset or tokens)")
        if not hasattr(model, "config"):
            raise ValueError(
                f"model: method={method!r} runs the model's forward pass and needs a transformers model with a "
                f".config, got {type(model).__name__}; use method='magnitude' for a plain torch module"
            )
        if isinstance(calibration, torch.Tensor) and (
            calibration.dtype.is_floating_point or calibration.dtype.is_complex or calibration.dtype == torch.bool
        ):
            raise ValueError(
                f"calibration: token ids must be an integer tensor, got dtype {calibration.dtype}; pass "
                "tokenizer(...)['input_ids'] (int64), not embeddings or probabilities"
            )
        tokens = calibration_tokens(calibration, tokenizer, nsamples, seqlen, seed, text_column)
        _check_tokens(model, tokens, seqlen, isinstance(calibration, torch.Tensor))

    report = PruneReport(method, str(nm) if nm else "unstructured", sparsity, scope)
    report.sparsity_profile = sparsity_profile
    start = time.perf_counter()
    if method == "magnitude":
        _prune_magnitude(targets, sparsity, nm, scope, report, progress)
    else:
        report.calibration_samples, report.calibration_seqlen = tokens.shape
        owl = (owl_m, owl_lambda) if sparsity_profile == "owl" else None
        _prune_calibrated(
            model, method, targets, tokens, sparsity, nm, scope, batch_size, blocksize, percdamp, report, progress, owl
        )
    report.seconds = time.perf_counter() - start
    return report


def _check_tokens(model: nn.Module, tokens: torch.Tensor, seqlen: int, given: bool) -> None:
    """Calibration tokens must index the embedding and (for text) fill ``seqlen``: checked before any pass."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(
            f"calibration: token ids must be in [0, {vocab}) (the model's vocabulary), got ids in [{lo}, {hi}]; "
            "tokenize with the model's own tokenizer"
        )
    if not given and tokens.shape[1] < seqlen:
        raise ValueError(
            f"calibration: the texts give only {tokens.shape[1]} tokens, fewer than seqlen={seqlen}; pass more "
            f"calibration text (at least {seqlen} tokens) or a smaller seqlen"
        )


def _prune_magnitude(targets, sparsity, nm, scope, report, progress):
    from tqdm.auto import tqdm

    if scope == "global" and nm is None:
        masks = global_masks({n: magnitude_scores(m.weight) for n, m in targets.items()}, sparsity)
        for name, mod in targets.items():
            mod.weight.mul_(masks[name].to(mod.weight.dtype))
            report.modules[name] = _module_stats(mod.weight, nm)
        return
    for name, mod in tqdm(targets.items(), desc="magnitude", disable=not progress):
        new_w, _ = _prune_weight("magnitude", mod.weight, None, sparsity, nm, scope, 0, 0.0)
        mod.weight.copy_(new_w)
        report.modules[name] = _module_stats(mod.weight, nm)


def _capture_inputs(model, blocks, tokens, batch_size, device):
    """Inputs of block 0 for every calibration batch (embeddings only; the forward stops at block 0): the hidden
    states in one list, the other call arguments (hidden states removed) in another."""
    captured: list = []
    with _capture_block_inputs(blocks[0], captured):
        for i in range(0, tokens.shape[0], batch_size):
            try:
                model(input_ids=tokens[i : i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    hidden = [_hidden(a, k) for a, k in captured]
    return hidden, [_with_hidden(a, k, None) for a, k in captured]


def _block_stats(block, layer_targets, hidden, captured, hessian: bool) -> dict[str, InputStats]:
    """Run the block over every calibration batch with its target linears hooked; their input statistics."""
    stats = {n: InputStats(m.in_features, hessian=hessian, device=m.weight.device) for n, m in layer_targets.items()}
    handles = [
        m.register_forward_hook(lambda _m, inp, _o, s=stats[n]: s.add(inp[0])) for n, m in layer_targets.items()
    ]
    try:
        for h, (args, kwargs) in zip(hidden, captured):
            _run_block(block, *_with_hidden(args, kwargs, h))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _advance(block, hidden, captured) -> None:
    """The block's outputs become the next block's inputs, replaced in place so only one copy is alive."""
    for i, (args, kwargs) in enumerate(captured):
        hidden[i] = _run_block(block, *_with_hidden(args, kwargs, hidden[i]))
    _release_freed_memory()


def _owl_sparsities(model, blocks, blocks_name, targets, tokens, batch_size, device, sparsity, owl) -> dict:
    """OWL's first pass over the dense model: each decoder layer's outlier ratio of its pooled Wanda scores, then
    the per-layer sparsities (weighted by the layer's pruned parameters) and their integer prune counts: per layer
    (summing to ⌊s·N + ½⌋ exactly) and per linear (a layer's count split by size, largest remainder)."""
    owl_m, owl_lambda = owl
    hidden, captured = _capture_inputs(model, blocks, tokens, batch_size, device)
    ratios: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for b, block in enumerate(blocks):
        prefix = f"{blocks_name}.{b}."
        layer_targets = {n: m for n, m in targets.items() if n.startswith(prefix)}
        if layer_targets:
            stats = _block_stats(block, layer_targets, hidden, captured, hessian=False)
            scores = [wanda_scores(m.weight, stats[n].sq_mean) for n, m in layer_targets.items()]
            ratios[prefix[:-1]] = layer_outlier_ratio(scores, owl_m)
            sizes[prefix[:-1]] = sum(m.weight.numel() for m in layer_targets.values())
            del stats, scores
        if b + 1 < len(blocks):
            _advance(block, hidden, captured)
    del hidden, captured
    alloc = owl_layer_sparsities(list(ratios.values()), sparsity, owl_lambda, list(sizes.values()))
    counts = dict(zip(ratios, owl_prune_counts(alloc, list(sizes.values()), sparsity)))
    module_prune: dict[str, int] = {}
    for layer, count in counts.items():
        names = [n for n in targets if n.startswith(layer + ".")]
        module_prune.update(zip(names, largest_remainder([targets[n].weight.numel() for n in names], count)))
    return {
        "m": owl_m,
        "lambda": owl_lambda,
        "outlier_ratio": ratios,
        "layer_sparsity": dict(zip(ratios, alloc)),
        "layer_params": sizes,
        "layer_prune_count": counts,
        "module_prune_count": module_prune,
    }


def _prune_calibrated(
    model, method, targets, tokens, sparsity, nm, scope, batch_size, blocksize, percdamp, report, progress, owl=None
):
    from tqdm.auto import tqdm

    blocks_name, blocks = find_decoder_blocks(model)
    device = next(blocks[0].parameters()).device
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    was_training = model.training
    model.eval()
    try:
        layer_sparsity: dict[str, float] = {}
        module_prune: dict[str, int] = {}  # OWL: each linear's integer prune count
        if owl is not None:
            report.owl = _owl_sparsities(
                model, blocks, blocks_name, targets, tokens, batch_size, device, sparsity, owl
            )
            layer_sparsity = report.owl["layer_sparsity"]
            module_prune = report.owl["module_prune_count"]
        # 1. inputs of block 0 for every calibration batch
        hidden, captured = _capture_inputs(model, blocks, tokens, batch_size, device)
        # 2. block by block
        for b, block in enumerate(tqdm(blocks, desc=f"{method} blocks", disable=not progress)):
            prefix = f"{blocks_name}.{b}."
            layer_targets = {n: m for n, m in targets.items() if n.startswith(prefix)}
            if layer_targets:
                stats = _block_stats(block, layer_targets, hidden, captured, hessian=method == "sparsegpt")
                block_sparsity = layer_sparsity.get(prefix[:-1], sparsity)
                for name, mod in layer_targets.items():
                    st = stats.pop(name)  # each Hessian is freed as soon as its layer is pruned
                    new_w, _ = _prune_weight(
                        method, mod.weight, st, block_sparsity, nm, scope, blocksize, percdamp, module_prune.get(name)
                    )
                    mod.weight.copy_(new_w)
                    del st, new_w
                    report.modules[name] = _module_stats(mod.weight, nm)
                    _release_freed_memory()
            # the pruned block's outputs feed the next block
            _advance(block, hidden, captured)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
