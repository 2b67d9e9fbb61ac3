#!/usr/bin/env bash
# The benchmarks that need a CUDA GPU, in one run of a few minutes on one GPU (written for an H200):
#
#     bash benchmarks/gpu.sh                 # from the repository root; logs go to $OUT (default /tmp/xiaolm-gpu)
#     GPU_DRY=1 bash benchmarks/gpu.sh       # print what it would run, run nothing
#
# Wheels in .whl/ (fastapi, uvicorn, openai and what they need that the machine lacks, for `xiaolm serve` and its
# benchmark) are installed first into /tmp/site, without the network; src/ is on PYTHONPATH. Then $OUT/env.txt
# gets the GPU (nvidia-smi), the versions and, as each benchmark ends, its exit status and wall time. Each
# benchmark runs under `timeout` (its own limit, cut to what is left of GPU_BUDGET, 420 s from the start, so the
# whole run stays within about 7 minutes), most important first; its output (stdout and stderr) goes to
# $OUT/NAME.txt and the Markdown tables it ends with to this script's stdout. The timeouts are generous
# estimates for an H200, not measurements. At most 8 files in $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/xiaolm-gpu}
BUDGET=${GPU_BUDGET:-420}
DRY=${GPU_DRY:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false

say() { echo "$*" | tee -a "$OUT/env.txt"; }

# bench NAME LIMIT_S ESTIMATE_S COMMAND...: COMMAND's output appended to $OUT/NAME.txt, for at most LIMIT_S seconds
# (fewer when less of the budget is left; skipped under 30 s); its tables (lines starting with |) echoed here.
# ESTIMATE_S, a guess of its wall time on an H200, is printed beside the time it took; with GPU_DRY the clock
# advances by it, to show what the budget would cut.
bench() {
    local name=$1 limit=$2 estimate=$3 left=$((BUDGET - SECONDS)) log="$OUT/$1.txt"
    shift 3
    if ((left < limit)); then limit=$left; fi
    if ((limit < 30)); then
        say "=== $name: SKIPPED, ${left} s of the ${BUDGET} s budget left: $*"
        return
    fi
    say "=== $name at ${SECONDS} s (timeout ${limit} s, estimate ${estimate} s): $*"
    if [ -n "$DRY" ]; then
        SECONDS=$((SECONDS + estimate))
        return
    fi
    local start=$SECONDS lines
    lines=$(cat "$log" 2>/dev/null | wc -l)
    echo "=== $name: $* (timeout ${limit} s)" >> "$log"
    timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local how="exit $rc"
    if ((rc == 124 || rc == 137)); then how="TIMED OUT after the limit of $limit s (exit $rc)"; fi
    echo "=== $name: $how, $((SECONDS - start)) s" >> "$log"
    tail -n +$((lines + 1)) "$log" | grep '^|' || true
    say "=== $name: $how, $((SECONDS - start)) s (estimate ${estimate} s)"
}

: > "$OUT/env.txt"
if compgen -G ".whl/*.whl" > /dev/null; then
    say "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    if [ -z "$DRY" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
            >> "$OUT/env.txt" 2>&1 || say "pip install FAILED (exit $?)"
    fi
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
say "PYTHONPATH=$PYTHONPATH"
if [ -z "$DRY" ]; then
    nvidia-smi >> "$OUT/env.txt" 2>&1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/env.txt"
    python3 - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import platform, torch, transformers
print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}), transformers {transformers.__version__}; CUDA available "
      f"{torch.cuda.is_available()}: {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}, "
      f"bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
for name in ("triton", "peft", "fastapi", "uvicorn", "openai", "xiaolm"):
    try:
        module = __import__(name)
        print(f"  {name} {getattr(module, '__version__', '?')} from {module.__file__}")
    except Exception as e:
        print(f"  {name}: NOT importable ({e!r})")
EOF
else
    SECONDS=$((SECONDS + 15))  # what the installation and the versions take, about
fi

# --- the benchmarks, most important first --------------------------------------------------------------------

# GRPO on the 100M recipe shape, G=8, 256 new tokens: a full reference copy vs LoRA + adapter-disabled reference
# (the full-copy run first: a run of 2026-12-04 measured LoRA in 60 s, then ran out of its 110 s limit in it)
bench grpo_memory 200 130 python3 benchmarks/grpo_memory.py --device cuda --size 100m --variants full+copy,lora+adapter

# DPO: LoRA vs full, reference copy vs adapter-disabled base vs precomputed; CUDA peak memory and step time, bf16
# autocast (4 runs of ~12 s, each a fresh process)
bench dpo_memory 150 60 python3 benchmarks/dpo_memory.py --device cuda --size 100m --rounds 1
# single-stream greedy decode, ours vs transformers' generate, bf16 weights, 256 new tokens
bench decode 180 70 python3 benchmarks/decode.py --device cuda --dtype bf16 --shapes 100m,26m --rounds 5
# `xiaolm serve` (bf16) under 1/4/16/64 streaming openai clients, 10 s each
bench serve 150 70 python3 benchmarks/serve.py --shape 100m --device cuda --rounds 1 --seconds 10 --threads 4
# training step, ours vs transformers, the 100M shape, bf16 autocast: throughput, MFU, CUDA peak memory
bench train_step 120 45 python3 benchmarks/train_step.py --device cuda --dtype bf16 --dim 768 --layers 12 \
    --heads 12 --kv-heads 4 --vocab 32000 --batch 16 --seq 512 --steps 10 --rounds 5 --memory-runs 1
# training memory of the built-in recipes (100m with and without activation checkpointing, 26m), bf16 autocast
bench memory_budget 90 35 python3 benchmarks/memory_budget.py
# last, the riskiest (compile time unknown): our decode step under torch.compile, a second table in decode.txt
# (128 new tokens, its own eager and transformers rows beside it)
bench decode 150 65 python3 benchmarks/decode.py --device cuda --dtype bf16 --shapes 100m --rounds 2 \
    --new-tokens 128 --compile

say "=== done at ${SECONDS} s; logs: $(cd "$OUT" && ls | tr '\n' ' ')"
