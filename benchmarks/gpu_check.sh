#!/usr/bin/env bash
# The GPU check (issue #16): the CUDA test subset with Triton compiled for real, then the 2:4 speed grid.
#
#   benchmarks/gpu_check.sh OUTDIR [WHEELDIR]
#
# Run from the repository root on a machine with an sm80+ NVIDIA GPU and a CUDA build of PyTorch. Wheels in
# WHEELDIR (default .whl; pure-Python peft/transformers/trl/datasets matching this repo's CI versions, fetched with
# `pip download --no-deps`) are installed into a private target first, for machines that lack them or have other
# versions and no network. Everything lands in OUTDIR: env.txt, pytest.log, pytest.xml, bench.log,
# sparse24_gpu.json. Without a GPU both steps skip and say so (that is the CPU dry run of the plumbing; the
# benchmark's own `--dry-run` exercises its code paths on the CPU).
#
# Budget: pytest ≤ 4 min, benchmark ≤ 6 min (each under `timeout`), so one run fits a 10-minute device call.
# Stamp: export PRUNE_PEFT_GIT_COMMIT=<the commit sent> (and PRUNE_PEFT_GIT_DIRTY=1 if the tree was dirty); a copied
# tree's .git can be missing or stale, and the results stamp takes the variable first.
set -u -o pipefail
OUTDIR=${1:?usage: benchmarks/gpu_check.sh OUTDIR [WHEELDIR]}
WHEELS=${2:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=$(mktemp -d /tmp/prune_peft_site.XXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check: installing the wheels in $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: not available"
  "$PY" - <<'PYEOF'
import importlib.metadata as md
import torch
for n in ("torch", "triton", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors"):
    try:
        print(n, md.version(n))
    except md.PackageNotFoundError:
        print(n, "missing")
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    print("cusparselt", torch.backends.cusparselt.is_available(), torch.backends.cusparselt.version())
PYEOF
} 2>&1 | tee "$OUTDIR/env.txt"

# -m gpu over the whole suite, as the issue asks; modules that need packages this machine lacks (lm-eval, gguf,
# bitsandbytes, ...) are reported as collection errors and do not stop the GPU subset.
timeout 240 "$PY" -m pytest -m gpu tests/ -p no:cacheprovider -q -rs --continue-on-collection-errors \
  --junitxml="$OUTDIR/pytest.xml" 2>&1 | tee "$OUTDIR/pytest.log"
PYTEST_RC=${PIPESTATUS[0]}

# The reduced grid: both LLM up-projections, 2048–16384 tokens, bf16 and fp16, plus one SFT step of SmolLM2-135M's
# architecture (random weights: the GGUF cannot travel; the step's time does not depend on the values).
timeout 360 "$PY" benchmarks/sparse24_gpu.py --dtypes bf16,fp16 --shapes 4096x11008,4096x14336 \
  --tokens 2048,4096,8192,16384 --config benchmarks/configs/smollm2-135m --batch 8 --seqlen 512 --sft-steps 10 \
  --out "$OUTDIR/sparse24_gpu.json" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tee "$OUTDIR/bench.log"
BENCH_RC=${PIPESTATUS[0]}
echo "gpu_check: pytest rc=$PYTEST_RC benchmark rc=$BENCH_RC" | tee -a "$OUTDIR/env.txt"
# pytest rc 5 = nothing collected/selected (no GPU); collection errors alone give rc 2 with the GPU tests still run
[ "$BENCH_RC" -eq 0 ] || exit "$BENCH_RC"
exit 0
