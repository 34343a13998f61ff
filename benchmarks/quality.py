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

Budget (2 CPU cores): the default settings were chosen for about an hour (estimate ≈ 58 min: oneshot 29, owl 15,
qtuning 12, sste 2; printed at the start, see ``estimate_seconds``). That budget forces small calibration: the
oneshot grid is 8 × 512 and 32 × 512 (the library's default 128 × 512 and seqlen 2048 cost 4× / 4× per sample; add
them with ``--oneshot-grid 8x512,32x512,8x2048`` (+22 min) when time allows), OWL calibrates on 8 × 512, and every
pruned model is evaluated on 8 held-out windows of 512 tokens. ``--quick`` runs one seed of each with tiny
calibration, few windows and steps (a smoke run, minutes) into results/quick/.

    python benchmarks/quality.py [--only oneshot|owl|qtuning|sste] [--quick]

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
    return {
        "qtuning": s * 6 * qt * 5e-3,  # 6 arms of LoRA SFT on SmolLM2-135M (forward + backward + scoring)
        "sste": s * 3 * steps * 4e-5,  # 3 arms of a tiny model
        "oneshot": s * 2 * (grid * both + 2 * len(settings["oneshot_grid"]) * eval_s),  # 2 patterns
        # 2 sparsities × 2 profiles; OWL adds a dense statistics pass (≈ 1.3× a uniform prune)
        "owl": s * 2 * (owl_tokens * both * 2.3 + 4 * eval_s),
    }


# seconds per calibration token of one prune of SmolLM2-135M on 2 cores, from benchmarks/results/oneshot.json
# (64 × 512 tokens: Wanda 140 s, SparseGPT 261 s) — only for the budget printed before a run, not a timing result
PER_TOKEN_S = {"wanda": 4.3e-3, "sparsegpt": 8.0e-3}


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
    elif arm == "hard":
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
    rows: dict[str, list] = {"dense": [], "sste": [], "hard": []}
    flip: dict[str, list] = {"sste": [], "hard": []}
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


COMPARISONS: dict[str, Callable[[Context], dict]] = {
    "oneshot": cmp_oneshot,
    "owl": cmp_owl,
    "sste": cmp_sste,
    "qtuning": cmp_qtuning,
}
NOT_IMPLEMENTED = {
    "loraprune": "item 1 (LoRAPrune vs full-gradient importance vs magnitude + LoRA)",
    "recovery": "item 2 (SparseLoRA / SPP / LoRA-remask recovery of a 2:4 base)",
    "distill": "item 4 (self-data distillation vs original responses)",
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
    print(
        "estimated minutes on 2 idle cores:", {k: round(v / 60, 1) for k, v in est.items() if k in names}, flush=True
    )
    stamp = start_stamp(args.threads, args.quick)
    path = results_path("quality", args.quick, args.out)
    previous = json.loads(path.read_text()).get("comparisons", {}) if path.exists() else {}
    ctx = Context(settings)
    results = dict(previous)
    for name in names:
        t0 = time.perf_counter()
        results[name] = {**COMPARISONS[name](ctx), "settings": settings, "minutes": (time.perf_counter() - t0) / 60}
        for key, c in results[name]["comparisons"].items():
            print(f"{name} | {key}: Δ {c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] → {c['verdict']}")
    payload = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF → fp32)",
        "data": "calibration: Shakespeare train split; evaluation: held-out Shakespeare windows",
        "statistics": "mean and 95 % interval by two-stage bootstrap over seeds × evaluation windows (4000 draws); "
        "comparisons: bootstrap of the paired difference (method − baseline) on the same seeds and windows",
        "not_implemented": NOT_IMPLEMENTED,
        "comparisons": results,
    }
    write_results("quality", payload, stamp, quick=args.quick, out=args.out)


if __name__ == "__main__":
    main()
