"""Probes behind docs/kernels.md's GPU notes (run once on an H200; output in results/gpu_runs/*_probes/).

1. cuSPARSELt in isolation: 2:4 GEMMs with groups of fewer than 2 non-zeros and doubled K ([W | ΔW]) against dense.
2. Speed per configuration: dense ``F.linear``; the 2:4 layer (back to back, and replayed as a CUDA graph, which
   removes the host's per-call cost); the bare ``torch._cslt_sparse_mm`` with the default algorithm, with the one
   cuSPARSELt's search picks, with the fused transpose, and a small sweep of algorithm × split-k.
3. One SFT step of SmolLM2-135M's architecture (random weights), dense vs 2:4 SparseLoRA, under torch.profiler:
   device time by kernel and host time by op.

    OUT=DIR python benchmarks/sparse24_gpu_probes.py      # writes DIR/diag.json; tables to stdout
"""

# A straight-line probe script: each lambda is timed in the iteration that made it (B023/F821 are false alarms
# from the `del` at the end of each iteration), and its imports follow the part that needs them.
# ruff: noqa: B023, E402, F821

import copy
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

out = {}
dev = "cuda"


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------- 1. correctness bisect
from peft import get_peft_model
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

from prune_peft import SparseLoraConfig
from prune_peft.kernels import prune24
from prune_peft.kernels.semi_structured import SemiStructuredLinear

layers = []
# synthetic cuSPARSELt checks: fewer than 2 non-zeros per group, K=2*d_in
for m, k, t in [(256, 512, 128), (128, 512, 128), (512, 1024, 128), (256, 256, 128), (256, 512, 64)]:
    w = prune24(torch.randn(m, k, device=dev, dtype=torch.bfloat16))[0]
    w[:, k // 2 :] *= torch.rand(m, k // 2, device=dev) > 0.5  # some groups with 0/1 non-zeros
    x = torch.randn(t, k, device=dev, dtype=torch.bfloat16)
    res = {
        "m": m,
        "k": k,
        "t": t,
        "cslt": rel(F.linear(x, SparseSemiStructuredTensorCUSPARSELT.from_dense(w)), x.float() @ w.float().t()),
    }
    print("synthetic", res)
    out.setdefault("synthetic", []).append(res)


# ---------------------------------------------------------------- 2. kernel speed probes
def t_ms(fn, iters=30, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def graph_ms(fn, iters=30):
    fn()
    torch.cuda.synchronize()
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        fn()
    torch.cuda.current_stream().wait_stream(st)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    return t_ms(gr.replay, iters)


probes = []
for dt in (torch.bfloat16, torch.float16):
    for din, dout in [(4096, 11008), (4096, 14336)]:
        for tok in (2048, 16384):
            torch.manual_seed(0)
            w = prune24(torch.randn(dout, din, device=dev, dtype=dt))[0]
            x = torch.randn(tok, din, device=dev, dtype=dt)
            c = torch._cslt_compress(w)
            xt = x.t()
            r = {"dtype": str(dt), "d_in": din, "d_out": dout, "tokens": tok}
            r["dense_ms"] = t_ms(lambda: F.linear(x, w))
            plain = nn.Linear(din, dout, bias=False, device=dev, dtype=dt).requires_grad_(False)
            with torch.no_grad():
                plain.weight.copy_(w)
            lin = SemiStructuredLinear.from_linear(plain)
            with torch.no_grad():
                r["ours_ms"] = t_ms(lambda: lin(x))
                try:
                    r["ours_graph_ms"] = graph_ms(lambda: lin(x))
                except Exception as exc:
                    r["ours_graph_err"] = str(exc)[:200]
            r["raw_alg0_ms"] = t_ms(lambda: torch._cslt_sparse_mm(c, xt))
            r["raw_alg0_T_ms"] = t_ms(lambda: torch._cslt_sparse_mm(c, xt, transpose_result=True))
            try:
                found = torch._cslt_sparse_mm_search(c, xt)
                r["search"] = found if isinstance(found, int) else list(found)
                alg = found if isinstance(found, int) else found[0]
                r["raw_best_ms"] = t_ms(lambda: torch._cslt_sparse_mm(c, xt, alg_id=alg))
                r["raw_best_T_ms"] = t_ms(lambda: torch._cslt_sparse_mm(c, xt, transpose_result=True, alg_id=alg))
            except Exception as exc:
                r["search_err"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            # other alg ids / split_k
            best = None
            for alg in range(0, 4):
                for sk in (1, 2):
                    try:
                        ms = t_ms(lambda: torch._cslt_sparse_mm(c, xt, alg_id=alg, split_k=sk), iters=10, warm=2)
                    except Exception:
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, alg, sk)
            r["sweep_best"] = best
            # x-major: W @ x^T vs (x @ W^T) : try dense B = x (tokens, din) as contiguous transposed input
            xT_c = x.t().contiguous()
            r["raw_alg0_contigT_ms"] = t_ms(lambda: torch._cslt_sparse_mm(c, xT_c))
            for k, v in list(r.items()):
                if k.endswith("_ms") and k != "dense_ms":
                    r[k.replace("_ms", "_x")] = r["dense_ms"] / v
            if best:
                r["sweep_best_x"] = r["dense_ms"] / best[0]
            print(json.dumps(r), flush=True)
            probes.append(r)
            del lin, c
out["probes"] = probes
json.dump(out, open(os.path.join(os.environ["OUT"], "diag.json"), "w"), indent=1)
print("probes written", flush=True)

# ---------------------------------------------------------------- 3. SFT step breakdown (sparse arm)
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM

torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(
    AutoConfig.from_pretrained("benchmarks/configs/smollm2-135m"), dtype=torch.bfloat16
).to(dev)
with torch.no_grad():
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and "lm_head" not in name:
            mod.weight.mul_(prune24(mod.weight)[1])
ids = torch.randint(0, 49152, (8, 512), device=dev)
res = {}
for label, flag in (("dense", False), ("sparse", True)):
    pm = get_peft_model(
        copy.deepcopy(m),
        SparseLoraConfig(r=16, target_modules="all-linear", lora_dropout=0.0, use_semi_structured=flag),
    ).train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    ka = prof.key_averages(group_by_input_shape=True)
    print(f"=== {label}: by self device time")
    print(ka.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60, max_shapes_column_width=70))
    print(f"=== {label}: by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    del pm, opt
    torch.cuda.empty_cache()
