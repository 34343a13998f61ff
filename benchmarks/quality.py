"""Quality evidence (issue #18): does each method move quality in the direction its paper claims, with seeds and
95 % intervals?

Every comparison runs on SmolLM2-135M (the embedded model; S-STE on a tiny model) with the same data and steps for
every arm and at least 3 seeds. Quality is measured per held-out evaluation window (mean token NLL of one window of the held-out Shakespeare
split), so each arm gives an array [seeds, windows]; means and 95 % intervals come from the two-stage bootstrap of
``_stats.py`` (seeds, then windows within seeds), and arms measured on the same seeds and windows are compared by
their paired difference. The verdict is "reproduces the paper's direction" / "no significant difference" /
"contradicts", next to the claim it tests.

Comparisons (``--only NAME`` runs one; default: all implemented ones):

- ``oneshot`` (issue item 6): Wanda and SparseGPT at 50 % unstructured and 2:4 with calibration grids of
  nsamples × seqlen; the seed is the calibration draw. Verdict: the most calibration tokens of the grid vs the fewest.
- ``sste`` (item 5): a tiny llama (hidden 64, 4 layers, byte vocabulary; a tiny model makes the point and trains
  in minutes) trained from scratch on Shakespeare bytes, dense vs S-STE (``apply_sste``) vs hard STE with SR-STE's
  masked decay (the paper's baseline; forward W ⊙ top-2-of-4(|W|), straight-through backward, grad += 2e-4·(1−M)⊙W),
  same data order and steps per seed. Held-out NLL gap to dense and the mask flip rate per step.
- ``qtuning`` (item 3): LoRA SFT of SmolLM2-135M on generated arithmetic word problems (QTuningSFTTrainer), one
  epoch: full data; Q-Tuning 25 % × 50 % keeping the high-score tokens (this library's default) and the low ones
  (the opposite direction); sample-only (25 % × 100 %) and token-only (100 % × 50 %) ablations; random 25 % of the
  samples at the same steps. Metric: held-out response-token NLL per problem (the "windows" are held-out problems).
- ``owl`` (item 7): OWL layerwise sparsity (``sparsity_profile="owl"``, M = 5, λ = 0.08) vs uniform, Wanda and
  SparseGPT at 50 % and 70 % unstructured, paired on the same calibration draw.
- ``loraprune`` (item 1): LoRAPrune (``importance="lora"``) vs the same schedule with importance from the true
  base-weight gradients (``importance="grad"``, LLM-Pruner's first-order Taylor |∂L/∂W ⊙ W|) vs one-shot structured
  magnitude masks + LoRA (benchmarks/loraprune.py's ``_magnitude_masks``), 20 % and 50 % (heads + MLP channels), same
  Trainer steps; held-out NLL of the merged, compacted model, plus peak RSS of the two importance modes (one fresh
  process each: benchmarks/loraprune.py's memory worker).
- ``recovery`` (item 2): a 2:4 Wanda base per seed, then SparseLoRA (``grad_mode`` exact and lors), SPP, and plain
  LoRA merged then re-masked, trained on the same batches for the same steps with the same trainable-parameter
  budget (the LoRA-type rank whose r·Σ(d_in + d_out) is nearest SPP's Σ(R·d_in + d_out), R = 16: r = 8 on
  SmolLM2-135M); held-out NLL and the fraction of the dense→pruned gap recovered (``_stats.ratio_ci``).
- ``distill`` (item 4): ``prune_peft.distill.drop_layers`` (4 of 30 blocks by angular distance), the unpruned
  teacher rewrites the training responses (``self_distill``, math template), LoRA for the same steps on the
  rewritten vs the original responses (``distill.recipe.finetune_lora``); KL(teacher ‖ student) per held-out
  Shakespeare window (forgetting), held-out task NLL per problem (original-style references: favours SFT on the
  original responses) and the format-free exact match of the final integer of greedy answers.

Budget (2 CPU cores): the estimate is printed at the start (``estimate_seconds``): oneshot 29, owl 15, qtuning 12,
sste 2 min (≈ 58 min), plus loraprune ≈ 26, recovery ≈ 18, distill ≈ 27 min (≈ 71 min) — ≈ 2 h 9 min for
everything (``--only`` runs a part). That budget forces small calibration: the
oneshot grid is 8 × 512 and 32 × 512 (the library's default 128 × 512 and seqlen 2048 cost 4× / 4× per sample; add
them with ``--oneshot-grid 8x512,32x512,8x2048`` (+22 min) when time allows), OWL and the recovery base calibrate on
8 × 512, the fine-tuning comparisons train 16–24 steps of ≈ 512 tokens, and every model is evaluated on 8
held-out windows of 512 tokens. ``--quick`` runs one seed of each with tiny calibration, few windows and steps (a
smoke run, minutes) into results/quick/.

    python benchmarks/quality.py [--only oneshot|owl|qtuning|sste|loraprune|recovery|distill] [--quick]

Writes benchmarks/results/quality.json (stamped by ``_bench.write_results``). With ``--only``, the other comparisons
already in the results file are kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable
from functools import cached_property

import torch
from _bench import results_path, start_stamp, write_results
from _stats import bootstrap_ci, paired_diff_ci, verdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m"

# full settings (≈ 1 hour on 2 cores, see estimate()) and the quick smoke settings
FULL = {
    "seeds": 3,
    "eval_windows": 8,
    "eval_seqlen": 512,
    "oneshot_grid": [[8, 512], [32, 512]],
    "owl_calibration": [8, 512],
    "sste_steps": 300,
    "sste_batch": 8,
    "sste_seqlen": 128,
    "qtuning_train": 64,
    "qtuning_eval": 32,
    "qtuning_batch": 8,
    "qtuning_max_length": 128,
    "loraprune_steps": 24,
    "loraprune_batch": 2,
    "loraprune_seqlen": 256,
    "recovery_steps": 24,
    "recovery_batch": 2,
    "recovery_seqlen": 256,
    "recovery_calibration": [8, 512],
    "distill_drop": 4,
    "distill_train": 64,
    "distill_eval": 32,
    "distill_steps": 16,
    "distill_batch": 4,
    "distill_gen_tokens": 64,
    "distill_acc_eval": 128,
    "distill_acc_tokens": 48,
}
QUICK = {
    "seeds": 1,
    "eval_windows": 4,
    "eval_seqlen": 256,
    "oneshot_grid": [[4, 128], [8, 128]],
    "owl_calibration": [4, 128],
    "sste_steps": 20,
    "sste_batch": 4,
    "sste_seqlen": 64,
    "qtuning_train": 16,
    "qtuning_eval": 8,
    "qtuning_batch": 8,
    "qtuning_max_length": 96,
    "loraprune_steps": 4,
    "loraprune_batch": 2,
    "loraprune_seqlen": 128,
    "recovery_steps": 3,
    "recovery_batch": 2,
    "recovery_seqlen": 128,
    "recovery_calibration": [4, 128],
    "distill_drop": 4,
    "distill_train": 8,
    "distill_eval": 8,
    "distill_steps": 2,
    "distill_batch": 4,
    "distill_gen_tokens": 16,
    "distill_acc_eval": 8,
    "distill_acc_tokens": 16,
}

CLAIMS = {
    "oneshot": (
        "Wanda/SparseGPT: calibration statistics from more tokens give better pruned models; SparseGPT benefits more "
        "from additional samples than Wanda (paraphrase of the calibration-size ablation in the Wanda paper, "
        "arXiv 2306.11695)"
    ),
    "owl": (
        '"OWL exhibits a remarkable performance gain, surpassing the state-of-the-art Wanda and SparseGPT by 61.22 '
        'and 6.80 perplexity at a high sparsity level of 70%, respectively" (Yin et al. 2023, arXiv 2310.05175, '
        "abstract; LLaMA-7B, WikiText)"
    ),
    "qtuning": (
        "Q-Tuning's joint sample + token pruning beats other data-pruning choices at the same budget and can beat "
        "full-data SFT (project page / arXiv 2509.23873: SmolLM2-1.7B +38 % average over full-data SFT with 12.5 % of "
        "the data; 25 % × 50 % on LLaMA2-7B ≈ full data)"
    ),
    "sste": (
        "S-STE (continuous soft-threshold 2:4 projection + frozen per-tensor scale) avoids hard thresholding's mask "
        "oscillation and trains closer to the dense model than earlier 2:4 recipes such as SR-STE (paraphrase of Hu, "
        "Zhu, Chen, NeurIPS 2024, arXiv 2409.09099, abstract)"
    ),
    "loraprune": (
        "LoRA-guided importance (LoRA's weights and gradients instead of the pre-trained weights' gradients) prunes "
        "as well as or better than the gradient-based criterion of LLM-Pruner, with 52.6 % less memory on LLaMA-7B "
        "(paraphrase of Zhang et al., arXiv 2305.18403, abstract); 'matches' is reproduced by either 'no significant "
        "difference' or a lower perplexity"
    ),
    "recovery": (
        "sparsity-preserving adapters recover most of the dense→pruned gap while keeping every zero (SQFT, Muñoz et "
        "al., arXiv 2410.03750: SparsePEFT merges without losing sparsity; SPP, Lu et al., ICML 2024, arXiv "
        "2405.16057: restores the pruned model's performance), whereas plain LoRA densifies the weights and must be "
        "re-masked after merging, losing part of what it learned (paraphrase)"
    ),
    "distill": (
        "self-data distilled fine-tuning (the unpruned model rewrites the responses) mitigates catastrophic "
        "forgetting by keeping the pruned student aligned with the original model; Llama-3.1-8B with 6 of 32 blocks "
        "removed retains 91.2 % of the original accuracy vs 81.7 % with SFT on the original data (paraphrase of "
        "Thangarasa et al., MLSys 2025, arXiv 2410.09982, abstract)"
    ),
}


# --------------------------------------------------------------------------------------------- pure helpers


def window_nll(model, tokens, seqlen: int, windows: int) -> list[float]:
    """Mean token NLL of each of ``windows`` disjoint windows of ``seqlen`` tokens (what the bootstrap resamples);
    exp(mean over windows) is the perplexity of ``prune_peft.perplexity`` on the same windows."""
    ids = tokens.reshape(-1)[: windows * seqlen]
    if ids.numel() < windows * seqlen:
        raise ValueError(f"held-out text has {ids.numel()} tokens, fewer than {windows} windows × {seqlen}")
    batch = ids.reshape(windows, seqlen)
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, windows, 4):
                x = batch[i : i + 4]
                logits = model(input_ids=x, use_cache=False).logits.float()
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
                )
                out.extend(nll.reshape(x.shape[0], -1).mean(1).tolist())
    finally:
        model.train(was_training)
    return out


def summarize(arm: list[list[float]]) -> dict:
    """Mean NLL, its 95 % interval, and the same as perplexity (exp of the NLL interval's ends)."""
    ci = bootstrap_ci(arm)
    return {**ci, "ppl": math.exp(ci["mean"]), "ppl_lo": math.exp(ci["lo"]), "ppl_hi": math.exp(ci["hi"])}


def compare(method_arm: list[list[float]], baseline_arm: list[list[float]], expected: str) -> dict:
    """Paired difference method − baseline (NLL) with its interval and the verdict for the predicted sign."""
    d = paired_diff_ci(method_arm, baseline_arm)
    return {**d, "verdict": verdict(d, expected)}


def lora_rank_for_budget(shapes: list[tuple[int, int]], n_blocks: int) -> tuple[int, int, int]:
    """The recovery comparison's trainable-parameter budget: SPP trains ``R·d_in + d_out`` parameters per layer
    (``W_row`` and ``w_col``), LoRA-type adapters ``r·(d_in + d_out)``; the LoRA rank whose count is nearest SPP's
    on the same ``(d_in, d_out)`` layers. Returns (r, LoRA-type parameters, SPP parameters)."""
    if not shapes or any(din < 1 or dout < 1 for din, dout in shapes):
        raise ValueError(f"shapes must be a non-empty list of positive (d_in, d_out), got {shapes!r}")
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive integer (SPP's R), got {n_blocks!r}")
    spp = sum(n_blocks * din + dout for din, dout in shapes)
    per_rank = sum(din + dout for din, dout in shapes)
    r = max(1, round(spp / per_rank))
    return r, r * per_rank, spp


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) = Σ_v p_t(v) (log p_t(v) − log p_s(v)) in nats, one value per position."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits and student_logits must have the same shape, got {tuple(teacher_logits.shape)} and "
            f"{tuple(student_logits.shape)}"
        )
    lt = torch.log_softmax(teacher_logits.float(), -1)
    ls = torch.log_softmax(student_logits.float(), -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def window_kl(teacher, student, tokens, seqlen: int, windows: int) -> list[float]:
    """Mean per-token KL(teacher ‖ student) of each of ``windows`` disjoint held-out windows (forgetting measured
    against the unpruned model, one window at a time so two vocabulary-wide logit tensors fit in memory)."""
    ids = tokens.reshape(-1)[: windows * seqlen]
    if ids.numel() < windows * seqlen:
        raise ValueError(f"held-out text has {ids.numel()} tokens, fewer than {windows} windows × {seqlen}")
    out: list[float] = []
    modes = teacher.training, student.training
    teacher.eval()
    student.eval()
    try:
        with torch.no_grad():
            for x in ids.reshape(windows, 1, seqlen):
                t = teacher(input_ids=x, use_cache=False).logits
                s = student(input_ids=x, use_cache=False).logits
                out.append(token_kl(t, s).mean().item())
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    return out


def labelled_nll(model, features) -> list[float]:
    """Mean NLL of the labelled tokens (labels ≠ −100, shifted as in causal-LM training) of each row of
    ``input_ids`` / ``labels`` features (``prune_peft.distill.recipe.sft_features``): the task loss per problem."""
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for row in features:
                x = torch.tensor([row["input_ids"]])
                y = torch.tensor(row["labels"][1:])
                if not (y != -100).any():
                    raise ValueError("features has a row without labelled tokens (labels all -100)")
                logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
                out.append(torch.nn.functional.cross_entropy(logits, y, ignore_index=-100).item())
    finally:
        model.train(was_training)
    return out


def linear_masks(model) -> dict[str, torch.Tensor]:
    """Boolean ``W ≠ 0`` of every ``nn.Linear`` inside the decoder blocks (the pruned base's masks)."""
    return {
        n: m.weight != 0
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n and "lora_" not in n
    }


def remask_(model, masks: dict[str, torch.Tensor]) -> None:
    """Zero again what the pruned base had zeroed (plain LoRA merged then re-masked: ``W ← M ⊙ (W + s·BA)``)."""
    modules = dict(model.named_modules())
    missing = sorted(set(masks) - set(modules))
    if missing:
        raise ValueError(f"masks names modules the model does not have: {missing[:3]}")
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask.to(modules[name].weight.dtype))


def estimate_seconds(settings: dict, per_token_s: dict[str, float]) -> dict[str, float]:
    """Rough wall time of each comparison on 2 cores: prune cost from seconds per calibration token (Wanda: two
    block passes; SparseGPT adds the Hessian), plus one held-out evaluation (≈ half a Wanda pass per token) per
    pruned model — the budget printed before a run."""
    s = settings["seeds"]
    eval_s = settings["eval_windows"] * settings["eval_seqlen"] * per_token_s["wanda"] / 2
    grid = sum(n * L for n, L in settings["oneshot_grid"])
    owl_tokens = settings["owl_calibration"][0] * settings["owl_calibration"][1]
    both = per_token_s["wanda"] + per_token_s["sparsegpt"]
    steps = settings["sste_steps"] * settings["sste_batch"] * settings["sste_seqlen"]
    qt = settings["qtuning_train"] * settings["qtuning_max_length"]
    train = TRAIN_S_PER_TOKEN
    lp = settings["loraprune_steps"] * settings["loraprune_batch"] * settings["loraprune_seqlen"]
    rec = settings["recovery_steps"] * settings["recovery_batch"] * settings["recovery_seqlen"]
    rec_cal = settings["recovery_calibration"][0] * settings["recovery_calibration"][1]
    gen = settings["distill_train"] * settings["distill_gen_tokens"]
    dist = settings["distill_steps"] * settings["distill_batch"] * DISTILL_ROW_TOKENS
    task_eval = settings["distill_eval"] * DISTILL_ROW_TOKENS * per_token_s["wanda"] / 2
    acc_gen = settings["distill_acc_eval"] * settings["distill_acc_tokens"] * GEN_S_PER_TOKEN
    return {
        # 2 sparsities × 3 arms (pruning adds ≈ 10 % to a LoRA step), 6 evaluations; 2 memory processes (≈ 1 min)
        "loraprune": s * 2 * 3 * (lp * train * 1.1 + eval_s) + MEMORY_S,
        # a 2:4 Wanda base per seed, 4 adapters, 6 evaluations (dense is shared)
        "recovery": s * (rec_cal * per_token_s["wanda"] + 4 * rec * train * 1.1 + 6 * eval_s),
        # teacher generation, 2 fine-tunings, KL of 3 models (teacher + student forwards) and task loss of 3, greedy
        # exact-match answers of 3 models per seed and of the teacher once
        "distill": s * (gen * GEN_S_PER_TOKEN + 2 * dist * train + 3 * 2 * eval_s + 3 * task_eval + 3 * acc_gen)
        + acc_gen,
        "qtuning": s * 6 * qt * 5e-3,  # 6 arms of LoRA SFT on SmolLM2-135M (forward + backward + scoring)
        "sste": s * 3 * steps * 4e-5,  # 3 arms of a tiny model
        "oneshot": s * 2 * (grid * both + 2 * len(settings["oneshot_grid"]) * eval_s),  # 2 patterns
        # 2 sparsities × 2 profiles; OWL adds a dense statistics pass (≈ 1.3× a uniform prune)
        "owl": s * 2 * (owl_tokens * both * 2.3 + 4 * eval_s),
    }


# seconds per calibration token of one prune of SmolLM2-135M on 2 cores, from benchmarks/results/oneshot.json
# (64 × 512 tokens: Wanda 140 s, SparseGPT 261 s) — only for the budget printed before a run, not a timing result
PER_TOKEN_S = {"wanda": 4.3e-3, "sparsegpt": 8.0e-3}
# LoRA training (forward + backward + AdamW) of SmolLM2-135M per token on 2 cores: benchmarks/results/loraprune.json,
# a LoRA step of 4 × 256 tokens takes 5.6 s; LoRAPrune's quality runs 24 steps of 2 × 256 in ≈ 70 s
TRAIN_S_PER_TOKEN = 5.5e-3
# teacher generation per generated token at batch 32 (benchmarks/results/distill.json: 96 × 64 tokens in 90 s)
GEN_S_PER_TOKEN = 1.5e-2
MEMORY_S = 60  # the two LoRAPrune memory processes (model load + 2 steps each), once per run
DISTILL_ROW_TOKENS = 128  # a chat-templated arithmetic problem + response, tokens (for the estimate only)


# ------------------------------------------------------------------------------------------------ the context


class Context:
    """The dense model, tokenizer, calibration texts and held-out tokens, loaded on first use and shared by the
    comparisons (the tiny-model comparison never loads SmolLM2)."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self._dense: list[float] | None = None

    @cached_property
    def _loaded(self):
        from prune_peft.data import shakespeare_texts
        from prune_peft.evaluation import tokenize_stream
        from prune_peft.models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(MODEL)
        model.eval()
        need = self.settings["eval_windows"] * self.settings["eval_seqlen"] + 1
        heldout = tokenize_stream(shakespeare_texts("heldout"), tok, max_tokens=need)
        return model, tok, shakespeare_texts("train"), heldout

    @property
    def model(self):
        return self._loaded[0]

    @property
    def tok(self):
        return self._loaded[1]

    @property
    def train_texts(self):
        return self._loaded[2]

    @property
    def heldout(self):
        return self._loaded[3]

    def nll(self, model) -> list[float]:
        return window_nll(model, self.heldout, self.settings["eval_seqlen"], self.settings["eval_windows"])

    def dense(self) -> list[float]:
        if self._dense is None:
            self._dense = self.nll(self.model)
        return self._dense

    def pruned(self, seed: int, nsamples: int, seqlen: int, **prune_kwargs) -> tuple[list[float], dict]:
        from prune_peft import prune

        model = copy.deepcopy(self.model)
        t0 = time.perf_counter()
        report = prune(
            model,
            calibration=self.train_texts,
            tokenizer=self.tok,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            progress=False,
            **prune_kwargs,
        )
        info = {"sparsity": report.sparsity, "seconds": time.perf_counter() - t0}
        if report.owl is not None:
            info["layer_sparsity"] = list(report.owl["layer_sparsity"].values())
        nll = self.nll(model)
        del model
        return nll, info


# ------------------------------------------------------------------------------------------------ comparisons


def cmp_oneshot(ctx: Context) -> dict:
    """Item 6: what the calibration defaults cost (Wanda, SparseGPT × 50 %, 2:4 × nsamples × seqlen)."""
    st = ctx.settings
    grid = [tuple(g) for g in st["oneshot_grid"]]
    default = min(grid, key=lambda g: g[0] * g[1])  # the baseline: the fewest calibration tokens
    biggest = max(grid, key=lambda g: g[0] * g[1])
    arms: dict[str, dict] = {}
    verdicts: dict[str, dict] = {}
    for method in ("wanda", "sparsegpt"):
        for label, kw in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"})):
            per_cal: dict[tuple, list] = {}
            for n, L in grid:
                rows, infos = [], []
                for seed in range(st["seeds"]):
                    nll, info = ctx.pruned(seed, n, L, method=method, **kw)
                    rows.append(nll)
                    infos.append(info)
                    print(f"oneshot {method} {label} {n}x{L} seed {seed}: ppl {math.exp(sum(nll) / len(nll)):.2f}")
                per_cal[(n, L)] = rows
                arms[f"{method} {label} {n}x{L}"] = {
                    "method": method,
                    "pattern": label,
                    "nsamples": n,
                    "seqlen": L,
                    **summarize(rows),
                    "seconds": [i["seconds"] for i in infos],
                    "nll_per_seed": [sum(r) / len(r) for r in rows],
                }
            if biggest != default:
                key = f"{method} {label}: {biggest[0]}x{biggest[1]} vs {default[0]}x{default[1]}"
                verdicts[key] = compare(per_cal[biggest], per_cal[default], "lower")
    return {
        "claim": CLAIMS["oneshot"],
        "metric": "held-out NLL per window (lower is better); ppl = exp(NLL)",
        "baseline_calibration": list(default),
        "dense": summarize([ctx.dense()]),
        "arms": arms,
        "comparisons": verdicts,
        "seed_meaning": "calibration draw (prune(seed=...)): which training windows calibrate",
    }


def cmp_owl(ctx: Context) -> dict:
    """Item 7: OWL vs uniform layer sparsity at 50 % and 70 % (Wanda, SparseGPT), paired by calibration draw."""
    st = ctx.settings
    n, L = st["owl_calibration"]
    arms: dict[str, dict] = {}
    verdicts: dict[str, dict] = {}
    for method in ("wanda", "sparsegpt"):
        for s in (0.5, 0.7):
            rows: dict[str, list] = {"uniform": [], "owl": []}
            layer_sparsity = []
            for seed in range(st["seeds"]):
                for profile in ("uniform", "owl"):
                    nll, info = ctx.pruned(seed, n, L, method=method, sparsity=s, sparsity_profile=profile)
                    rows[profile].append(nll)
                    if profile == "owl":
                        layer_sparsity.append(info["layer_sparsity"])
                    ppl = math.exp(sum(nll) / len(nll))
                    print(f"owl {method} {s:.0%} {profile} seed {seed}: ppl {ppl:.2f} sparsity {info['sparsity']:.4f}")
            for profile, r in rows.items():
                arms[f"{method} {s:.0%} {profile}"] = {
                    "method": method,
                    "sparsity": s,
                    "profile": profile,
                    **summarize(r),
                }
            arms[f"{method} {s:.0%} owl"]["layer_sparsity"] = layer_sparsity
            verdicts[f"{method} {s:.0%}: owl vs uniform"] = compare(rows["owl"], rows["uniform"], "lower")
    return {
        "claim": CLAIMS["owl"],
        "metric": "held-out NLL per window (lower is better); ppl = exp(NLL)",
        "owl": {"m": 5.0, "lambda": 0.08},
        "calibration": [n, L],
        "dense": summarize([ctx.dense()]),
        "arms": arms,
        "comparisons": verdicts,
        "seed_meaning": "calibration draw (prune(seed=...)); both profiles see the same draw",
    }


class _HardTop24(torch.autograd.Function):
    """Hard 2:4 (top-2 of every 4 by magnitude) forward, straight-through backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        from prune_peft.sparsity.sste import topk24_mask

        return w * topk24_mask(w).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class HardSTE(torch.nn.Module):
    """The baseline of S-STE's paper (hard thresholding + STE; SR-STE, Zhou et al. 2021, arXiv 2102.04010, adds the
    masked decay in the training loop), as a ``torch.nn.utils.parametrize`` parametrization of ``weight``."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _HardTop24.apply(w)


SR_STE_DECAY = 2e-4  # SR-STE's λ_W


def _byte_stream(split: str, n_tokens: int):
    from prune_peft.data import shakespeare_texts
    from prune_peft.evaluation import tokenize_stream
    from prune_peft.testing import byte_tokenizer

    return tokenize_stream(shakespeare_texts(split), byte_tokenizer(), max_tokens=n_tokens)


def _train_tiny(arm: str, seed: int, st: dict, train, heldout) -> tuple[list[float], list[float]]:
    """Train one arm of the S-STE comparison; its held-out window NLLs and per-step mask flip fractions."""
    from torch.nn.utils import parametrize

    from prune_peft.callbacks.sste import apply_sste
    from prune_peft.sparsity.sste import MaskFlipTracker, topk24_mask
    from prune_peft.testing import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=seed).train()
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and "lm_head" not in n}
    weights = {n: m.weight for n, m in linears.items()}
    if arm == "sste":
        apply_sste(model, lambda n: n in linears)
    elif arm in ("hard", "ste"):  # "hard" adds SR-STE's masked decay below; "ste" is plain hard STE
        for m in linears.values():
            parametrize.register_parametrization(m, "weight", HardSTE())
        weights = {n: m.parametrizations.weight.original for n, m in linears.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)  # same data order for every arm of a seed
    B, L = st["sste_batch"], st["sste_seqlen"]
    tracker, flips = MaskFlipTracker(), []
    tracker.update(weights)
    for _ in range(st["sste_steps"]):
        starts = torch.randint(0, train.numel() - L - 1, (B,), generator=g)
        x = torch.stack([train[i : i + L] for i in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        if arm == "hard":
            with torch.no_grad():
                for w in weights.values():
                    w.grad.add_(w * (~topk24_mask(w)).to(w.dtype), alpha=SR_STE_DECAY)
        opt.step()
        if arm != "dense":
            flips.append(tracker.update(weights)["flip_fraction"])
    return window_nll(model, heldout, L, st["eval_windows"]), flips


def cmp_sste(ctx: Context) -> dict:
    """Item 5: S-STE vs hard STE (SR-STE-style) vs dense on a tiny 2:4 training task."""
    st = ctx.settings
    train = _byte_stream("train", 400_000)
    heldout = _byte_stream("heldout", st["eval_windows"] * st["sste_seqlen"] + 1)
    rows: dict[str, list] = {"dense": [], "sste": [], "hard": [], "ste": []}
    flip: dict[str, list] = {"sste": [], "hard": [], "ste": []}
    for seed in range(st["seeds"]):
        for arm in rows:
            nll, flips = _train_tiny(arm, seed, st, train, heldout)
            rows[arm].append(nll)
            if arm in flip:
                flip[arm].append(flips)
            print(f"sste {arm} seed {seed}: held-out NLL {sum(nll) / len(nll):.4f}", flush=True)
    arms = {arm: summarize(r) for arm, r in rows.items()}
    for arm, f in flip.items():
        arms[arm]["mean_flip_fraction_per_step"] = bootstrap_ci(f)
    verdicts = {
        "S-STE vs hard STE (held-out NLL)": compare(rows["sste"], rows["hard"], "lower"),
        "S-STE vs dense (gap)": paired_diff_ci(rows["sste"], rows["dense"]),
        "hard STE vs dense (gap)": paired_diff_ci(rows["hard"], rows["dense"]),
        "S-STE vs hard STE (mask flip fraction per step)": compare(flip["sste"], flip["hard"], "lower"),
        # SR-STE's decay is ~1e-3 of the gradient on this tiny task, so also compare with plain hard STE
        "S-STE vs plain hard STE (held-out NLL)": compare(rows["sste"], rows["ste"], "lower"),
        "S-STE vs plain hard STE (mask flip fraction per step)": compare(flip["sste"], flip["ste"], "lower"),
    }
    for k in ("S-STE vs dense (gap)", "hard STE vs dense (gap)"):
        verdicts[k]["verdict"] = "gap to dense (no paper direction; lower is closer)"
    return {
        "claim": CLAIMS["sste"],
        "metric": "held-out byte NLL per window (lower is better); flip fraction = share of 2:4 positions whose "
        "kept/pruned status changed in one optimizer step (the flip rows are seeds × steps)",
        "task": f"tiny llama from scratch, {st['sste_steps']} AdamW steps (lr 3e-3) of {st['sste_batch']} × "
        f"{st['sste_seqlen']} bytes of Shakespeare; hard STE decay λ_W = {SR_STE_DECAY}",
        "arms": arms,
        "comparisons": verdicts,
        "seed_meaning": "model initialisation and data order (shared by the arms of a seed)",
        "windows_are": f"{st['eval_windows']} held-out windows of {st['sste_seqlen']} bytes",
    }


def response_nll(model, tok, data, max_length: int) -> list[float]:
    """Mean NLL of the completion tokens of each (prompt, completion) row, prompt tokens masked as trl's
    completion-only loss does (prompt tokenized alone; completion = the rest of prompt + completion)."""
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for row in data:
                ids = tok(row["prompt"] + row["completion"])["input_ids"][:max_length]
                n_prompt = len(tok(row["prompt"])["input_ids"])
                x = torch.tensor([ids])
                logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
                nll = -logp.gather(-1, x[0, 1:, None])[:, 0]
                out.append(nll[max(n_prompt - 1, 0) :].mean().item())
    finally:
        model.train(was_training)
    return out


def _sft_arm(ctx: Context, train, heldout, seed: int, batch: int, qt=None) -> list[float]:
    import tempfile

    from peft import LoraConfig
    from trl import SFTConfig

    from prune_peft import QTuningCallback, QTuningSFTTrainer

    st = ctx.settings
    with tempfile.TemporaryDirectory(prefix="quality-qtuning-") as out:
        trainer = QTuningSFTTrainer(
            copy.deepcopy(ctx.model),
            args=SFTConfig(
                output_dir=out,
                num_train_epochs=1,
                per_device_train_batch_size=batch,
                learning_rate=2e-4,
                lr_scheduler_type="constant",
                max_length=st["qtuning_max_length"],
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                bf16=False,
                disable_tqdm=True,
                seed=seed,
                dataloader_num_workers=0,
            ),
            train_dataset=train,
            processing_class=ctx.tok,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
            callbacks=[QTuningCallback(qt)] if qt is not None else [],
        )
        torch.manual_seed(seed)
        trainer.train()
        return response_nll(trainer.model, ctx.tok, heldout, st["qtuning_max_length"])


def cmp_qtuning(ctx: Context) -> dict:
    """Item 3: Q-Tuning vs random selection at the same steps vs full data; token direction; ablations."""
    from prune_peft import QTuningConfig
    from prune_peft.sft_data import arithmetic_problems

    st = ctx.settings
    B = st["qtuning_batch"]
    heldout = arithmetic_problems(st["qtuning_eval"], seed=10_000).remove_columns("answer")

    def q(sample: float, token: float, keep: str = "high"):
        return QTuningConfig(sample_ratio=sample, token_ratio=token, token_keep=keep, plot=False)

    rows: dict[str, list] = {}
    for seed in range(st["seeds"]):
        train = arithmetic_problems(st["qtuning_train"], seed=seed).remove_columns("answer")
        arms = {
            "full data": (train, B, None),
            "Q-Tuning 25%×50% keep high": (train, B, q(0.25, 0.5)),
            "Q-Tuning 25%×50% keep low": (train, B, q(0.25, 0.5, "low")),
            "sample-only 25%×100%": (train, B, q(0.25, 1.0)),
            "token-only 100%×50%": (train, B, q(1.0, 0.5)),
            # Q-Tuning's training shape (same steps, a quarter of the samples per step) with a random choice
            "random 25% same steps": (
                train.shuffle(seed=seed + 1).select(range(max(1, len(train) // 4))),
                max(1, B // 4),
                None,
            ),
        }
        for name, (data, batch, qt) in arms.items():
            nll = _sft_arm(ctx, data, heldout, seed, batch, qt)
            rows.setdefault(name, []).append(nll)
            print(f"qtuning {name} seed {seed}: held-out response NLL {sum(nll) / len(nll):.4f}", flush=True)
    base = response_nll(ctx.model, ctx.tok, heldout, st["qtuning_max_length"])
    qt_main = rows["Q-Tuning 25%×50% keep high"]
    verdicts = {
        "Q-Tuning (keep high) vs random 25% same steps": compare(qt_main, rows["random 25% same steps"], "lower"),
        "Q-Tuning (keep high) vs full data": compare(qt_main, rows["full data"], "lower"),
        "Q-Tuning keep low vs random 25% same steps": compare(
            rows["Q-Tuning 25%×50% keep low"], rows["random 25% same steps"], "lower"
        ),
        "sample-only vs random 25% same steps": compare(
            rows["sample-only 25%×100%"], rows["random 25% same steps"], "lower"
        ),
        "token-only vs full data": compare(rows["token-only 100%×50%"], rows["full data"], "lower"),
    }
    return {
        "claim": CLAIMS["qtuning"],
        "metric": "held-out response-token NLL per problem (lower is better)",
        "task": f"LoRA r=8 SFT, 1 epoch of {st['qtuning_train']} arithmetic problems, batch {B}, lr 2e-4 constant",
        "dense": summarize([base]),
        "arms": {name: summarize(r) for name, r in rows.items()},
        "comparisons": verdicts,
        "windows_are": f"{st['qtuning_eval']} held-out problems",
        "seed_meaning": "training problems, LoRA init and data order (shared by the arms of a seed); held-out "
        "problems fixed",
    }


# ------------------------------------------------------------------------------ LoRAPrune (item 1)


LORAPRUNE_ARMS = {  # arm → LoRAPruneConfig.importance (None: one-shot magnitude masks, then LoRA)
    "LoRAPrune (importance=lora)": "lora",
    "full-gradient importance (importance=grad)": "grad",
    "one-shot magnitude + LoRA": None,
}


def _loraprune_arm(ctx: Context, seed: int, sparsity: float, importance: str | None) -> tuple[list[float], dict]:
    """One arm: LoRAPrune with ``importance`` (PruneCallback, gradual schedule) or structured magnitude masks at
    once (benchmarks/loraprune.py's ``_magnitude_masks``) then LoRA; same data, steps and lr. Held-out NLL of the
    merged, compacted model."""
    import tempfile

    from loraprune import _collate, _magnitude_masks, _windows
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from prune_peft import LoRAPruneConfig, PruneCallback, compact

    st = ctx.settings
    B, L, steps = st["loraprune_batch"], st["loraprune_seqlen"], st["loraprune_steps"]
    torch.manual_seed(seed)
    cfg = LoRAPruneConfig(r=8, target_sparsity=sparsity, prune_every=2, importance=importance or "lora")
    model = get_peft_model(copy.deepcopy(ctx.model), cfg)
    callbacks = [PruneCallback()] if importance else []
    if importance is None:
        _magnitude_masks(model, sparsity)
    data = _windows(ctx.tok, L, B * steps)
    with tempfile.TemporaryDirectory(prefix="quality-loraprune-") as out:
        targs = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=B,
            learning_rate=5e-4,
            report_to=[],
            save_strategy="no",
            logging_steps=steps,
            disable_tqdm=True,
            use_cpu=True,
            dataloader_pin_memory=False,
            seed=seed,
        )
        Trainer(model=model, args=targs, train_dataset=data, data_collator=_collate, callbacks=callbacks).train()
    masks = model.base_model.get_masks()
    info = {
        "pruned_kv_units": sum(int((~m["units"]).sum()) for m in masks.values()),
        "pruned_channels": sum(int((~m["channels"]).sum()) for m in masks.values()),
    }
    small = compact(model.merge_and_unload())
    info["params"] = sum(p.numel() for p in small.parameters())
    nll = ctx.nll(small)
    del model, small
    return nll, info


def loraprune_memory(batch: int, seqlen: int, threads: int) -> dict:
    """Peak RSS of a 2-step LoRAPrune run with each importance mode, one fresh process each — benchmarks/loraprune.py's
    memory worker (``_bench.MEMORY_METHOD``), at the quality runs' batch shape."""
    import loraprune
    from _bench import MEMORY_METHOD, run_memory_worker

    out: dict = {"shape": [batch, seqlen], "method": MEMORY_METHOD}
    for config in ("loraprune", "grad"):
        argv = [loraprune.__file__, "--worker", config, "--batch", str(batch), "--seqlen", str(seqlen)]
        r = run_memory_worker(argv, threads)
        out[config] = {k: r[k] for k in (*loraprune.MEMORY_KEYS, *loraprune.PROBE_KEYS) if k in r}
        print(f"loraprune memory {config}: peak RSS {r['peak_rss_mb']:.0f} MB (training {r['training_mb']:.0f} MB)")
    out["ratios"] = {
        "peak_rss lora ÷ grad": out["loraprune"]["peak_rss_mb"] / out["grad"]["peak_rss_mb"],
        "training_mb lora ÷ grad": out["loraprune"]["training_mb"] / out["grad"]["training_mb"],
    }
    if out["grad"].get("importance_grad_mb"):  # the gradient state each importance mode reads (the paper's claim)
        out["ratios"]["importance_grad_mb lora ÷ grad"] = (
            out["loraprune"]["importance_grad_mb"] / out["grad"]["importance_grad_mb"]
        )
    return out


def cmp_loraprune(ctx: Context) -> dict:
    """Item 1: LoRAPrune vs full-gradient importance vs one-shot magnitude + LoRA at 20 % and 50 % structured."""
    st = ctx.settings
    arms: dict[str, dict] = {}
    verdicts: dict[str, dict] = {}
    for sparsity in (0.2, 0.5):
        rows: dict[str, list] = {name: [] for name in LORAPRUNE_ARMS}
        infos: dict[str, list] = {name: [] for name in LORAPRUNE_ARMS}
        for seed in range(st["seeds"]):
            for name, importance in LORAPRUNE_ARMS.items():
                nll, info = _loraprune_arm(ctx, seed, sparsity, importance)
                rows[name].append(nll)
                infos[name].append(info)
                print(f"loraprune {sparsity:.0%} {name} seed {seed}: ppl {math.exp(sum(nll) / len(nll)):.2f}")
        for name, r in rows.items():
            arms[f"{name} @ {sparsity:.0%}"] = {
                "sparsity": sparsity,
                **summarize(r),
                "params": infos[name][0]["params"],
                "pruned_kv_units": infos[name][0]["pruned_kv_units"],
                "pruned_channels": infos[name][0]["pruned_channels"],
            }
        lp, grad, mag = (rows[n] for n in LORAPRUNE_ARMS)
        verdicts[f"{sparsity:.0%}: LoRAPrune vs full-gradient importance"] = compare(lp, grad, "lower")
        verdicts[f"{sparsity:.0%}: LoRAPrune vs one-shot magnitude + LoRA"] = compare(lp, mag, "lower")
    B, L = st["loraprune_batch"], st["loraprune_seqlen"]
    try:  # a failed memory process must not discard the quality arms measured above
        memory = loraprune_memory(B, L, torch.get_num_threads())
    except RuntimeError as e:
        memory = {"error": str(e)[-2000:]}
        print(f"loraprune memory failed: {memory['error']}", flush=True)
    return {
        "claim": CLAIMS["loraprune"],
        "metric": "held-out NLL per window of the merged, compacted model (lower is better); ppl = exp(NLL)",
        "task": f"LoRAPrune r=8 on q/k/v/o/gate/up/down (heads + MLP channels, prune_every 2, default warmup/"
        f"cooldown), {st['loraprune_steps']} Trainer steps of {B} × {L} Shakespeare tokens, lr 5e-4; the magnitude "
        "arm gets its final masks before step 1 (|W| per unit/channel, LoRAPrune's grouping) and trains LoRA with the "
        "same steps",
        "dense": summarize([ctx.dense()]),
        "arms": arms,
        "comparisons": verdicts,
        "memory": memory,
        "seed_meaning": "LoRA initialisation and data order (shared by the arms of a seed)",
    }


# ------------------------------------------------------------------------------- recovery (item 2)


def recovery_configs(rank: int) -> dict[str, tuple[Callable[[], object], float]]:
    """The recovery arms' peft configs (all-linear, scale lora_alpha / r = 2 everywhere) and learning rates
    (benchmarks/adapters.py's: 5e-4 for the LoRA types, SPP's paper lr 4e-3)."""
    from peft import LoraConfig

    from prune_peft import SparseLoraConfig, SPPConfig

    lora = dict(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    return {
        "SparseLoRA exact": (lambda: SparseLoraConfig(**lora), 5e-4),
        "SparseLoRA lors": (lambda: SparseLoraConfig(**lora, grad_mode="lors"), 5e-4),
        "SPP": (lambda: SPPConfig(target_modules="all-linear", r=8, lora_alpha=16, n_blocks=SPP_BLOCKS), 4e-3),
        "LoRA merged + re-masked": (lambda: LoraConfig(**lora), 5e-4),
    }


SPP_BLOCKS = 16  # SPP's R (the paper's value); the LoRA-type rank is matched to its parameter count


def _recovery_arm(pruned, batches, seed: int, make_config, lr: float) -> tuple[object, int]:
    """Train one adapter on the pruned base with a plain loop (same batches, AdamW, constant lr); the merged model
    (for plain LoRA the caller re-masks it: its merge fills the zeros) and the trainable-parameter count."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(pruned), make_config()).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.merge_and_unload(), sum(p.numel() for p in params)


def cmp_recovery(ctx: Context) -> dict:
    """Item 2: SparseLoRA (exact, lors), SPP and plain LoRA merged then re-masked on a 2:4 Wanda base."""
    from _stats import ratio_ci
    from adapters import pruned_layer_sparsity

    from prune_peft import prune
    from prune_peft.data import calibration_tokens

    st = ctx.settings
    n, cal_L = st["recovery_calibration"]
    B, L, steps = st["recovery_batch"], st["recovery_seqlen"], st["recovery_steps"]
    shapes = [(m.shape[1], m.shape[0]) for m in linear_masks(ctx.model).values()]
    rank, lora_budget, spp_budget = lora_rank_for_budget(shapes, SPP_BLOCKS)
    configs = recovery_configs(rank)
    rows: dict[str, list] = {"2:4 Wanda base (no recovery)": [], **{k: [] for k in configs}}
    rows["LoRA merged, not re-masked (dense again)"] = []
    trainable: dict[str, int] = {}
    sparsity: dict[str, list] = {}
    for seed in range(st["seeds"]):
        pruned = copy.deepcopy(ctx.model)
        prune(pruned, method="wanda", pattern="2:4", calibration=ctx.train_texts, tokenizer=ctx.tok, nsamples=n,
              seqlen=cal_L, seed=seed, progress=False)  # fmt: skip
        masks = linear_masks(pruned)
        rows["2:4 Wanda base (no recovery)"].append(ctx.nll(pruned))
        sparsity.setdefault("2:4 Wanda base (no recovery)", []).append(pruned_layer_sparsity(pruned))
        windows = calibration_tokens(ctx.train_texts, ctx.tok, nsamples=steps * B, seqlen=L, seed=1000 + seed)
        batches = [windows[i * B : (i + 1) * B] for i in range(steps)]
        for name, (make_config, lr) in configs.items():
            merged, trainable[name] = _recovery_arm(pruned, batches, seed, make_config, lr)
            if name == "LoRA merged + re-masked":
                rows["LoRA merged, not re-masked (dense again)"].append(ctx.nll(merged))
                sparsity.setdefault("LoRA merged, not re-masked (dense again)", []).append(
                    pruned_layer_sparsity(merged)
                )
                remask_(merged, masks)
            rows[name].append(ctx.nll(merged))
            sparsity.setdefault(name, []).append(pruned_layer_sparsity(merged))
            nll = rows[name][-1]
            print(f"recovery {name} seed {seed}: ppl {math.exp(sum(nll) / len(nll)):.2f}", flush=True)
            del merged
        del pruned
    dense_rows = [ctx.dense()] * st["seeds"]
    base = rows["2:4 Wanda base (no recovery)"]
    gap = [[p - d for p, d in zip(pr, dr)] for pr, dr in zip(base, dense_rows)]
    arms: dict[str, dict] = {}
    for name, r in rows.items():
        arms[name] = {**summarize(r), "sparsity_after_merge": sum(sparsity[name]) / len(sparsity[name])}
        if name in trainable:
            arms[name]["trainable_params"] = trainable[name]
        if name != "2:4 Wanda base (no recovery)":
            recovered = [[p - a for p, a in zip(pr, ar)] for pr, ar in zip(base, r)]
            arms[name]["gap_recovered"] = ratio_ci(recovered, gap)
    remasked = rows["LoRA merged + re-masked"]
    lors = paired_diff_ci(rows["SparseLoRA lors"], rows["SparseLoRA exact"])
    lors["verdict"] = (
        "no significant difference (LoRS: same quality at lower cost; no paper direction)"
        if lors["lo"] <= 0 <= lors["hi"]
        else "differs (LoRS approximates the exact gradients; no paper direction)"
    )
    verdicts = {
        "SparseLoRA exact vs 2:4 base": compare(rows["SparseLoRA exact"], base, "lower"),
        "SPP vs 2:4 base": compare(rows["SPP"], base, "lower"),
        "SparseLoRA exact vs LoRA merged + re-masked": compare(rows["SparseLoRA exact"], remasked, "lower"),
        "SparseLoRA lors vs LoRA merged + re-masked": compare(rows["SparseLoRA lors"], remasked, "lower"),
        "SPP vs LoRA merged + re-masked": compare(rows["SPP"], remasked, "lower"),
        "SparseLoRA lors vs exact": lors,
    }
    return {
        "claim": CLAIMS["recovery"],
        "metric": "held-out NLL per window of the merged model (lower is better); ppl = exp(NLL); gap recovered = "
        "(NLL base − NLL arm) ÷ (NLL base − NLL dense), a ratio of means with its bootstrap interval",
        "task": f"2:4 Wanda base ({n} × {cal_L} calibration tokens), then {steps} AdamW steps (constant lr) of {B} × "
        f"{L} Shakespeare tokens, the same batches for every adapter; lr 5e-4 for the LoRA types, 4e-3 for SPP (its "
        "paper's; benchmarks/adapters.py uses the same), scale lora_alpha / r = 2 for all",
        "budget": f"equal trainable parameters: SPP with R = {SPP_BLOCKS} trains Σ(R·d_in + d_out) = {spp_budget:,}; "
        f"the LoRA types use the rank r = {rank} whose r·Σ(d_in + d_out) = {lora_budget:,} is nearest "
        f"({lora_budget / spp_budget:.2f}× SPP's), on the same all-linear layers",
        "dense": summarize([ctx.dense()]),
        "arms": arms,
        "comparisons": verdicts,
        "seed_meaning": "calibration draw of the 2:4 base, adapter initialisation and training windows (shared by "
        "the arms of a seed)",
    }


# -------------------------------------------------------------------- self-data distillation (item 4)


def cmp_distill(ctx: Context) -> dict:
    """Item 4: after dropping blocks by angular distance, LoRA on teacher-regenerated vs original responses at
    equal steps; KL to the unpruned teacher on held-out general text (forgetting) and held-out task loss."""
    import tempfile

    from prune_peft.distill import distill_stats, drop_layers, self_distill
    from prune_peft.distill.generation import generate_texts
    from prune_peft.distill.recipe import finetune_lora, render_prompt, sft_features
    from prune_peft.sft_data import arithmetic_problems, extract_final_answer

    st = ctx.settings
    teacher, tok = ctx.model, ctx.tok
    task_eval = sft_features(arithmetic_problems(st["distill_eval"], seed=10_000), tok)
    teacher_task = labelled_nll(teacher, task_eval)
    # format-free task measure: the final integer of a greedy answer (``#### n`` or the last number) vs the gold one,
    # so neither the original template nor the teacher's style is favoured; a separate, larger problem set
    acc_eval = arithmetic_problems(st["distill_acc_eval"], seed=20_000)
    chat = bool(getattr(tok, "chat_template", None))
    acc_ids = [tok(render_prompt(tok, p, chat), add_special_tokens=not chat)["input_ids"] for p in acc_eval["prompt"]]

    def exact_match(m) -> list[float]:
        texts = generate_texts(m, tok, acc_ids, batch_size=32, max_new_tokens=st["distill_acc_tokens"])
        return [float(extract_final_answer(t) == g) for t, g in zip(texts, acc_eval["answer"])]

    teacher_acc = exact_match(teacher)
    names = ("pruned, no fine-tuning", "SFT on original responses", "SFT on self-distilled responses")
    kl: dict[str, list] = {k: [] for k in names}
    task: dict[str, list] = {k: [] for k in names}
    acc: dict[str, list] = {k: [] for k in names}
    dropped, stats = [], []
    for seed in range(st["seeds"]):
        train = arithmetic_problems(st["distill_train"], seed=seed)
        calibration = [f"{p}\n{c}" for p, c in zip(train["prompt"], train["completion"])]
        student, report = drop_layers(teacher, n=st["distill_drop"], calibration=calibration, tokenizer=tok,
                                      nsamples=8, seqlen=128, seed=seed)  # fmt: skip
        dropped.append(report.to_dict())
        with tempfile.TemporaryDirectory(prefix="quality-distill-") as tmp:
            distilled = self_distill(teacher, tok, train, template="math", cache_dir=f"{tmp}/cache", batch_size=32,
                                     max_new_tokens=st["distill_gen_tokens"], progress=False)  # fmt: skip
            stats.append(distill_stats(distilled))
            models = {"pruned, no fine-tuning": student}
            for name, data in (("SFT on original responses", train), ("SFT on self-distilled responses", distilled)):
                models[name] = finetune_lora(student, sft_features(data, tok), tok, steps=st["distill_steps"],
                                             batch_size=st["distill_batch"], learning_rate=5e-4,
                                             output_dir=f"{tmp}/{name[7:10]}", seed=seed)  # fmt: skip
        for name, m in models.items():
            kl[name].append(window_kl(teacher, m, ctx.heldout, st["eval_seqlen"], st["eval_windows"]))
            task[name].append(labelled_nll(m, task_eval))
            acc[name].append(exact_match(m))
            print(
                f"distill {name} seed {seed}: KL {sum(kl[name][-1]) / len(kl[name][-1]):.4f}, task NLL "
                f"{sum(task[name][-1]) / len(task[name][-1]):.4f}",
                flush=True,
            )
        del models, student
    orig, dist = "SFT on original responses", "SFT on self-distilled responses"
    arms = {f"KL to teacher: {k}": bootstrap_ci(v) for k, v in kl.items()}
    arms["task NLL: unpruned teacher"] = bootstrap_ci([teacher_task])
    arms.update({f"task NLL: {k}": bootstrap_ci(v) for k, v in task.items()})
    arms["exact match: unpruned teacher"] = bootstrap_ci([teacher_acc])
    arms.update({f"exact match: {k}": bootstrap_ci(v) for k, v in acc.items()})
    verdicts = {
        "self-distilled vs original (KL to teacher, held-out text)": compare(kl[dist], kl[orig], "lower"),
        "self-distilled vs original (task NLL, original-style references: favours original)": compare(
            task[dist], task[orig], "lower"
        ),
        "self-distilled vs original (exact match of the final integer)": compare(acc[dist], acc[orig], "higher"),
        "SFT on original vs no fine-tuning (KL to teacher)": paired_diff_ci(kl[orig], kl["pruned, no fine-tuning"]),
    }
    verdicts["SFT on original vs no fine-tuning (KL to teacher)"]["verdict"] = (
        "forgetting measure of plain SFT (no paper direction; > 0: SFT drifts further from the teacher)"
    )
    return {
        "claim": CLAIMS["distill"],
        "metric": "KL(teacher ‖ student) in nats per token, mean per held-out Shakespeare window (general text: "
        "forgetting; lower is closer to the unpruned model); task NLL = mean NLL of the original held-out answers' "
        "tokens per problem (note: the held-out answers are in the original style, which favours SFT on original); "
        "exact match = 1 when the final integer of a greedy answer equals the gold one (format-free), per problem",
        "task": f"drop {st['distill_drop']} of {teacher.config.num_hidden_layers} blocks (angular distance, calibration: the seed's training "
        f"problems), teacher rewrites {st['distill_train']} arithmetic responses (math template, ≤ "
        f"{st['distill_gen_tokens']} new tokens, wrong answers keep the original), then LoRA r=8 for "
        f"{st['distill_steps']} steps of batch {st['distill_batch']}, lr 5e-4 cosine, on each data set",
        "arms": arms,
        "comparisons": verdicts,
        "layer_drop": dropped,
        "distill_stats": stats,
        "windows_are": f"KL: {st['eval_windows']} held-out windows of {st['eval_seqlen']} tokens; task: "
        f"{st['distill_eval']} held-out problems; exact match: {st['distill_acc_eval']} other held-out problems",
        "seed_meaning": "training problems (and so the calibration of the layer drop and the rewrites), LoRA "
        "initialisation and data order (shared by both fine-tunings of a seed)",
    }


COMPARISONS: dict[str, Callable[[Context], dict]] = {
    "oneshot": cmp_oneshot,
    "owl": cmp_owl,
    "sste": cmp_sste,
    "qtuning": cmp_qtuning,
    "loraprune": cmp_loraprune,
    "recovery": cmp_recovery,
    "distill": cmp_distill,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(COMPARISONS), action="append", help="run only this comparison")
    ap.add_argument("--quick", action="store_true", help="one seed, tiny calibration, few windows; results/quick/")
    ap.add_argument("--seeds", type=int, default=None, help="override the number of seeds (≥ 3 for a published run)")
    ap.add_argument(
        "--oneshot-grid",
        default=None,
        help="calibration grid of the oneshot comparison, e.g. 32x512,128x512,128x2048 (default: "
        + ",".join(f"{n}x{L}" for n, L in FULL["oneshot_grid"])
        + "; each 8 × 2048 adds ≈ 22 min for 3 seeds, 128 × 2048 ≈ 5.4 h, on 2 cores)",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None, help="results file (default: results/quality.json)")
    args = ap.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
        settings["seeds"] = args.seeds
    if args.oneshot_grid:
        try:
            settings["oneshot_grid"] = [[int(v) for v in g.split("x")] for g in args.oneshot_grid.split(",")]
        except ValueError:
            raise SystemExit(f"--oneshot-grid must look like 32x512,128x512, got {args.oneshot_grid!r}") from None
    names = args.only or list(COMPARISONS)
    torch.set_num_threads(args.threads)
    est = estimate_seconds(settings, PER_TOKEN_S)
    chosen = {k: round(v / 60, 1) for k, v in est.items() if k in names}
    print(f"estimated minutes on 2 idle cores: {chosen}, total {sum(chosen.values()):.0f}", flush=True)
    stamp = start_stamp(args.threads, args.quick)
    path = results_path("quality", args.quick, args.out)
    previous = json.loads(path.read_text()).get("comparisons", {}) if path.exists() else {}
    ctx = Context(settings)
    results = dict(previous)
    for name in names:
        t0 = time.perf_counter()
        measured = COMPARISONS[name](ctx)
        minutes = (time.perf_counter() - t0) / 60
        # comparisons accumulate across runs (--only): each keeps the commit and load it was measured at
        run = {k: stamp[k] for k in ("git_commit", "git_dirty", "load_1min_start")}
        results[name] = {**measured, "settings": settings, "minutes": minutes, "run": run}
        for key, c in results[name]["comparisons"].items():
            print(f"{name} | {key}: Δ {c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] → {c['verdict']}")
    payload = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF → fp32)",
        "data": "calibration: Shakespeare train split; evaluation: held-out Shakespeare windows",
        "statistics": "mean and 95 % interval by two-stage bootstrap over seeds × evaluation windows (4000 draws); "
        "comparisons: bootstrap of the paired difference (method − baseline) on the same seeds and windows",
        "comparisons": results,
    }
    write_results("quality", payload, stamp, quick=args.quick, out=args.out)


if __name__ == "__main__":
    main()
