"""The last stage of ``make demo``: the LoRAPrune result exported as a stock, physically smaller checkpoint
(``prune_peft.hub.export(format="compacted")``) and reloaded with plain ``AutoModelForCausalLM.from_pretrained`` in a
fresh process that never imports prune_peft; the parameter count and perplexity printed are the reloaded model's."""

from __future__ import annotations

import os
import tempfile
import time

from ._context import DemoContext, log

__all__ = ["stage_export_compacted", "stock_perplexity"]

# The child: stock transformers only. Scores the windows exactly as prune_peft.evaluation.perplexity does with
# disjoint windows (stride = seqlen): every token after the first of each window, given the tokens before it.
_STOCK_PPL = """
import json, math, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
nll, count = 0.0, 0
with torch.no_grad():
    for ids in torch.load(sys.argv[2]):
        logits = model(input_ids=ids[None], use_cache=False).logits.float()[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += ids.numel() - 1
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "perplexity": math.exp(nll / count),
                  "tokens": count, "prune_peft_imported": "prune_peft" in sys.modules,
                  "config": {k: getattr(model.config, k) for k in
                             ("num_attention_heads", "num_key_value_heads", "intermediate_size")}}))
"""


def stock_perplexity(path: str | os.PathLike, windows: list, timeout: float = 600) -> dict:
    """Reload ``path`` with stock ``from_pretrained`` in a fresh process and score ``windows`` (1-D token id
    tensors) there. Returns ``{"params", "perplexity", "tokens", "config"}`` of the reloaded model.

    RuntimeError with the child's last lines when the stock loader fails, or when prune_peft got imported.
    """
    import torch

    from ..hub import run_stock_script

    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "windows.pt")
        torch.save([w.detach().cpu() for w in windows], ids_path)
        return run_stock_script(_STOCK_PPL, path, [ids_path], timeout=timeout)


def stage_export_compacted(ctx: DemoContext) -> dict:
    """Export the ``loraprune`` stage's adapter (uniform, structured) as ``format="compacted"`` and reload it stock."""
    from ..hub import export

    model = ctx.pruned.get("loraprune_peft")
    if model is None:
        raise ValueError("the export_compacted stage needs the loraprune stage: run it with stages=['loraprune', ...]")
    out = ctx.out / "loraprune_compacted"
    t0 = time.perf_counter()
    info = export(
        model, out, format="compacted", tokenizer=ctx.tokenizer, overwrite=True,
        data="Shakespeare (prune_peft.data.shakespeare_texts('train'))", perplexity=ctx.report["loraprune"]["ppl"],
    )  # fmt: skip
    export_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    reloaded = stock_perplexity(out, ctx.eval_token_windows())
    reload_seconds = time.perf_counter() - t0
    size_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    log(
        f"export: compacted checkpoint {out} ({size_mb:.0f} MB, {info['dtype']}); stock from_pretrained in a fresh "
        f"process (no prune_peft import): {reloaded['params'] / 1e6:.1f} M params, perplexity "
        f"{reloaded['perplexity']:.2f} (in memory {ctx.report['loraprune']['ppl']:.2f})"
    )
    return {
        "path": str(out),
        "dtype": info["dtype"],
        "safetensors_mb": size_mb,
        "params_reloaded": reloaded["params"],
        "ppl_reloaded": reloaded["perplexity"],
        "tokens_scored": reloaded["tokens"],
        "config_reloaded": reloaded["config"],
        "export_seconds": export_seconds,
        "reload_seconds": reload_seconds,
    }
