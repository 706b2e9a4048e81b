#!/usr/bin/env bash
# The CUDA path of megamora in one device call (at most ~9 minutes on one H100 / H200), with the
# table3 base + method delta configs on the shared C4 sample, torchrun, one rank, bf16 compute:
#   FSDP2 + NCCL   250m full / LoRA / MoRA, ReMoRA with a restart, a save and a resume; 1b MoRA;
#                  no host sync between log steps (tests/test_host_syncs.py under CUDA's sync debug mode)
#   DeepSpeed      ZeRO-2 and ZeRO-3 on the 250m MoRA config
#   compile        parallel.compile=true against the eager 250m MoRA run
#   benchmarks     bench_step.py (MoRA type 1 / type 6 / LoRA: step time and peak memory; the paper's
#                  Table 5 has MoRA / LoRA 1.01x and 1.15x at 7B) and bench_utilisation.py (MFU
#                  against the device's datasheet bf16 peak)
# then a summary table: tokens/s, MFU, peak memory per run, the ratios, what failed.
#
# 1. On a machine with PyPI, from the project root:
#      bash benchmarks/gpu_check.sh prepare
#    copies the C4 sample and the tokenizers (from $MEGAMORA_DATA, default ../shared/data) and the
#    wheels the GPU image lacks (omegaconf, datasets, DeepSpeed and their pure-Python needs) into
#    .gpu/ (kept out of git through .git/info/exclude).
# 2. Then one device call, carrying .gpu:
#      run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=600)
#    Logs and metrics come back under $OUT; the summary is the end of the output.
# A dry run of the plumbing on a CPU box (tiny shapes; every stage runs, on CPU + gloo):
#   GPU_CHECK_EXTRA="model.preset=9m data.seq_len=64 global_batch_size=4 micro_batch_size=4 adapter.r=16 parallel.param_dtype=float32 eval_tokens=2048 final_eval_tokens=2048" \
#   GPU_CHECK_BENCH="--preset 9m --seq-len 64 --batch 2 --r 16 --dtypes float32 --rounds 1 --steps 1 --warmup 1" \
#   GPU_CHECK_UTIL="--preset 9m --seq-len 64 --batch 2 --dtypes float32 --rounds 1 --steps 1 --warmup 1 --gemm-size 256 --gemm-reps 1 --profile-steps 0" \
#   GPU_CHECK_STEPS=6 GPU_CHECK_TIME_SCALE=4 GPU_CHECK_BUDGET=2400 OUT=/tmp/gpu-dry bash benchmarks/gpu_check.sh
# Stages run in order of importance within a budget (GPU_CHECK_BUDGET seconds, default 540): each gets
# at most what is left, and a stage that no longer fits is reported as skipped. GPU_CHECK_STEPS (30)
# scales every run's steps, save and restart cadence; GPU_CHECK_TIME_SCALE (1) the stages' limits.
set -u
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)

if [ "${1:-}" = prepare ]; then
  cd "$top" || exit 1
  data=${MEGAMORA_DATA:-$top/../shared/data}
  py=${PYTHON:-$top/.venv/bin/python}
  mkdir -p .git/info && { grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude; }
  rm -rf .gpu && mkdir -p .gpu/data .gpu/whl
  cp -r "$data/c4-sample" "$data/tokenizers" .gpu/data/ || exit 1
  # The device image (KINDS.md) has torch, transformers, tokenizers, sentencepiece, safetensors, pyarrow,
  # pandas, ninja, psutil, py-cpuinfo, msgpack, einops, nvidia-ml-py; add the rest (pure Python, or
  # cp312 manylinux wheels). Versions: those this project's tests run with.
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl omegaconf==2.4.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 || exit 1
  # DeepSpeed is published as a source archive only: build its (pure-Python, JIT-ops) wheel here.
  ds=$("$py" -c "import importlib.metadata as m; print(m.version('deepspeed'))") || exit 1
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$ds" -w .gpu/whl || exit 1
  du -sh .gpu; echo "now: run(command=\"bash benchmarks/gpu_check.sh\", carry=[\".gpu\"], timeout_s=600)"
  exit 0
fi

# ---- on the device (or a CPU dry run) ------------------------------------------------------
cd "$top" || exit 1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-540}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
if ! python3 -c "import omegaconf, datasets, deepspeed" >/dev/null 2>&1; then  # the device image lacks these
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    >"$OUT/pip.log" 2>&1 && export PYTHONPATH=/tmp/site || { echo "wheel install failed"; tail -5 "$OUT/pip.log"; exit 1; }
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$top
command -v nvidia-smi >/dev/null && nvidia-smi -L
python3 -c "import torch, datasets, omegaconf; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'datasets', datasets.__version__)"
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
D=.gpu/data
data="data.local_dir=$D/c4-sample/en data.tokenizer=$D/tokenizers/t5-base/spiece.model"
common="$data eval_every=0 eval_tokens=65536 final_eval_tokens=65536 logging.log_every=5 logging.progress_bar=false"
status=()
current=
trap '[ -n "$current" ] && kill -TERM "$current" 2>/dev/null; wait; exit 143' INT TERM
left() { echo $(( BUDGET - SECONDS )); }
fits() { # name seconds: is there time left for a stage that needs about this long?
  if [ "$(left)" -lt "$2" ]; then status+=("$1 skipped (budget: $(left)s left)"); echo "== $1 skipped: $(left)s left"; return 1; fi
}
stage() { # name limit command...: run with a timeout of at most what is left, log to $OUT/name.log
  local name=$1 limit=$2; shift 2
  fits "$name" 20 || return 0
  limit=$(( limit * ${GPU_CHECK_TIME_SCALE:-1} )); [ "$limit" -gt "$(left)" ] && limit=$(left)
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 &  # in the background: a TERM to this script reaches the stage
  current=$!; wait "$current"
  local rc=$?; current=; status+=("$name rc=$rc $((SECONDS - start))s"); echo "== $name rc=$rc $((SECONDS - start))s"
  grep -v '^\s*$' "$OUT/$name.log" | tail -2
}
train() { # name limit size/method overrides...   (configs/table3/<size>/base.yaml + <method>.yaml)
  local name=$1 limit=$2 cfg=$3; shift 3   # name run+what: another stage in run directory `run`
  stage "$name" "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node 1 launch/pretrain.py \
    --config "configs/table3/${cfg%/*}/base.yaml" "configs/table3/$cfg.yaml" \
    run_dir="$OUT/runs/${name%+*}" $common "$@" ${GPU_CHECK_EXTRA:-}
}
S=${GPU_CHECK_STEPS:-30}
s250="steps=$S save_every=0 global_batch_size=32 micro_batch_size=32"
# FSDP2 + NCCL, the three methods, then a save (at 2S/3 and S) and a resume (to 4S/3) across restarts
train 250m-full   120 250m/full  $s250
train 250m-lora   120 250m/lora  $s250
train 250m-mora   120 250m/mora  $s250
# CUDA itself checks that no step synchronises with the host between log steps (skipped on CPU)
stage host-syncs 90 env MEGAMORA_DATA="$top/$D" python3 -m pytest -q -p no:cacheprovider tests/test_host_syncs.py -k cuda
rem="save_every=$((2 * S / 3)) global_batch_size=32 micro_batch_size=32 restarts.every=$((S / 3)) restarts.warmup=1"
train 250m-remora 120 250m/remora steps=$S $rem
train 250m-remora+resume 100 250m/remora steps=$((4 * S / 3)) $rem
# DeepSpeed in bf16 on the MoRA config
train 250m-mora-zero2 150 250m/mora $s250 parallel.engine=deepspeed parallel.zero_stage=2
train 250m-mora-zero3 150 250m/mora $s250 parallel.engine=deepspeed parallel.zero_stage=3
# Regional compilation against the eager 250m-mora run
train 250m-mora-compile 180 250m/mora $s250 parallel.compile=true
train 1b-mora     150 1b/mora    steps=$((2 * S / 3)) save_every=0 global_batch_size=16 micro_batch_size=16
# One step of each adapter at the same shapes: time (ABBA rounds), then peak memory (one process each)
bench=${GPU_CHECK_BENCH:---preset 1b --seq-len 512 --batch 8 --r 128 --dtypes bfloat16 --rounds 3 --steps 5 --warmup 2}
stage bench-step 120 python3 benchmarks/bench_step.py $bench --contenders ours-lora ours-mora1 ours-mora6
stage bench-step-memory 120 python3 benchmarks/bench_step.py $bench --contenders ours-lora ours-mora1 ours-mora6 --memory
util=${GPU_CHECK_UTIL:---preset 250m --seq-len 512 --batch 16 --dtypes bfloat16 --rounds 3 --steps 5 --profile-steps 1}
stage bench-utilisation 90 python3 benchmarks/bench_utilisation.py $util

# ---- summary ---------------------------------------------------------------------------------
echo; echo "== summary (steady state: the first log window, with warm-up and compilation, left out)"
python3 - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {}
for rd in sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []:
    f = rd / "metrics.jsonl"
    recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.is_file() else []
    tr = [r for r in recs if r.get("kind") == "train" and "tokens_per_s" in r]
    steady = tr[1:] or tr
    setups = [r for r in recs if r.get("kind") == "setup"]
    ev = [r for r in recs if r.get("kind") == "eval"]
    if not steady:
        print(f"{rd.name:20s} no train records (see {rd.name}.log)"); continue
    mid = lambda k: sorted(r.get(k, float("nan")) for r in steady)[len(steady) // 2]
    row = dict(steps=tr[-1]["step"], loss=tr[-1]["loss"], tps=mid("tokens_per_s"),
               mfu=mid("mfu") if "mfu" in steady[0] else float("nan"),
               mem=max(r.get("peak_memory_gib") or 0 for r in tr),
               ppl=ev[-1].get("perplexity", float("nan")) if ev else float("nan"),
               resumed=[s.get("resumed_from") for s in setups if s.get("resumed_from")],
               precision=setups[-1].get("fp32_matmul_precision", "?") if setups else "?")
    rows[rd.name] = row
print(f"{'run':20s} {'steps':>5s} {'loss':>7s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>8s} {'eval ppl':>9s}  notes")
for name, r in rows.items():
    notes = f"fp32 matmuls {r['precision']}" + (f"; resumed from {Path(r['resumed'][-1]).name}" if r["resumed"] else "")
    print(f"{name:20s} {r['steps']:5d} {r['loss']:7.3f} {r['tps']:10.0f} {r['mfu']:6.3f} {r['mem']:8.2f} {r['ppl']:9.1f}  {notes}")
ratios = [("MoRA / LoRA tokens/s", "250m-mora", "250m-lora"), ("LoRA / full tokens/s", "250m-lora", "250m-full"),
          ("compiled / eager MoRA", "250m-mora-compile", "250m-mora"), ("ZeRO-2 / FSDP2 MoRA", "250m-mora-zero2", "250m-mora"),
          ("ZeRO-3 / FSDP2 MoRA", "250m-mora-zero3", "250m-mora")]
for label, a, b in ratios:
    if a in rows and b in rows:
        print(f"  {label:26s} {rows[a]['tps'] / rows[b]['tps']:.3f}x   peak memory {rows[a]['mem']:.2f} vs {rows[b]['mem']:.2f} GiB")
for name in ("host-syncs", "bench-step", "bench-step-memory", "bench-utilisation"):
    log = out / f"{name}.log"
    if not log.is_file():
        continue
    keep = [l.rstrip() for l in log.read_text().splitlines()
            if re.search(r"ours-|ratio|/ ours|MFU|utilisation|ms/step|skip|Error|error|passed|failed", l)]
    print(f"-- {name}"); print("\n".join("  " + l for l in keep[-14:]))
PY
printf '%s\n' "${status[@]}"
