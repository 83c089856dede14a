#!/usr/bin/env bash
# One-GPU benchmark of both stages at ViT-B/16, 224 px, as independent parts; prints ONE table.
#
# A lent GPU comes with about 15 minutes, start-up included: one run, no second try. So every part
# runs under its own time limit, writes its JSON as soon as it ends (a failed or timed-out part
# writes its one-line error into its JSON), and a failing part stops nothing: the next part runs,
# and the summary prints whatever finished and names what failed. The parts, in the order of what
# we most need to know:
#
#   stage-two-eager     `run_train` from a V=2 cache, bf16, data.loader=auto (DALI on the GPU),
#                       eager: images/s, data wait, device syncs per step, MFU (stage_two_run.py);
#   stage-two-compiled  the same with train.compile (its compile warm-up inside the part's limit);
#   stage-one           views/s of `cache-targets` against the bare DataLoader + base forward, fp16
#                       autocast, its CUDA default (cache_targets.py);
#   ceiling-one         stage one's host side behind an instant forward (stage_one_ceiling.py);
#   ceiling-two         stage two's host side behind an instant step, MAE's loader, pil, DALI
#                       (mixed) and the drift between DALI's CPU and GPU renderings (stage_two_ceiling.py).
#
# Usage:  bash benchmarks/gpu.sh              # needs one CUDA GPU; the limits add up to at most 540 s
#         bash benchmarks/gpu.sh --dry        # print each part's command and limit, and their sum
#         bash benchmarks/gpu.sh --cpu-smoke  # every part's code path with tiny sizes on the CPU, with
#                                             # the GPU run's settings (bf16, compile, data.loader=dali)
# JSON goes to $OUT if set, else benchmarks/results/ (smoke runs: a temp dir unless $OUT is set);
# each part's output to gpu_<part>.log beside it. PYTHON picks the interpreter (default
# .venv/bin/python, else python3). Exit status: 0 when every part ran, 1 when one failed (after
# the summary), 2 for a bad argument or no GPU.
# For the tests: GPU_SH_PARTS="part ..." runs those parts only; GPU_SH_BREAK="part:arg part:limit ..."
# breaks a part with a bogus argument, or with a 1 s limit.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ $# -gt 1 ]]; then echo "error: one argument at most (--dry, --cpu-smoke or nothing), got: $*" >&2; exit 2; fi
case "${1:-}" in
  "") ;;
  --dry) MODE=dry ;;
  --cpu-smoke) MODE=smoke ;;
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/!p}' "$0"; exit 0 ;;
  *) echo "error: unknown argument '$1' (expected --dry, --cpu-smoke or nothing)" >&2; exit 2 ;;
esac

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
# The drivers import as tec_pipeline.stages, which only an install of this checkout serves (pyproject
# maps stages/ there): a bare machine's interpreter gets one, editable and without fetching anything.
if [[ $MODE != dry ]] && ! "$PY" -c "import tec_pipeline.stages" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "error: $PY cannot import tec_pipeline.stages and installing this checkout failed" >&2; exit 2; }
fi

if [[ -n "${OUT:-}" ]]; then RES=$OUT
elif [[ $MODE == smoke ]]; then RES=$(mktemp -d -t tec-gpu-smoke-XXXX)
else RES=benchmarks/results
fi
mkdir -p "$RES"

PARTS=(stage-two-eager stage-two-compiled stage-one ceiling-one ceiling-two)
declare -A LIMIT
if [[ $MODE == smoke ]]; then
  # Tiny and on the CPU: proves each part's code path, flags and JSON, not the speed. Stage two runs
  # with the GPU run's settings: bf16 autocast, train.compile (fullgraph) and DALI (its CPU graph);
  # 3 blocks per model (one adapter group), as compiling 12 took minutes of the CPU.
  TWO=("$PY" benchmarks/stage_two_run.py --device cpu --precision bf16 --loader dali --arch vit_tiny_patch16_224
       --base-arch vit_tiny_patch16_224 --depth 3 --img-size 64 --images 32 --images-per-shard 16 --batch 4 --k 5 --steps 6
       --log-every 2 --workers 1)
  STAGE_TWO_EAGER=("${TWO[@]}" --variants cache-eager --out "$RES/gpu_stage_two_eager.json")
  STAGE_TWO_COMPILED=("${TWO[@]}" --variants cache-compiled --out "$RES/gpu_stage_two_compiled.json")
  STAGE_ONE=("$PY" benchmarks/cache_targets.py --device cpu --arch vit_tiny_patch16_224 --img-size 64 --images 16
             --views 2 --batch 8 --workers 0 --shard 8 --k-max 5 --feat-dtype int8 --attn-dtype uint8 --rss-images ""
             --out "$RES/gpu_stage_one.json")
  CEILING_ONE=("$PY" benchmarks/stage_one_ceiling.py --device cpu --archs tiny --storage int8/uint8 --img-size 32
               --images 16 --views 2 --batch 8 --shard-images 8 --writer-shards 2 --writer-threads 1 --record-images 1
               --k-max 5 --compress zstd none --out "$RES/gpu_ceiling_one.json")
  CEILING_TWO=("$PY" benchmarks/stage_two_ceiling.py --device cpu --img-size 32 --images 16 --views 2 --batch 4
               --shard-images 8 --k-max 3 --epochs 2 --workers 1 --out "$RES/gpu_ceiling_two.json")
  LIMIT=([stage-two-eager]=240 [stage-two-compiled]=300 [stage-one]=120 [ceiling-one]=120 [ceiling-two]=120)
else
  # Stage two: ViT-B/16 new model, ViT-B/16-shaped int8/uint8 targets (k=15), per-GPU batch 256 (the
  # configs use 512; 256 leaves memory to spare on any 40 GB+ card), 12 loader threads, bf16, DALI.
  # Set-up writes 512 ~500x375 JPEGs (~5 ms each) and a V=2 cache of 1,024 views of Gaussian
  # targets (~0.6 MB of float32 per view generated, quantized and compressed): about 10-20 s, paid
  # by each part, so the images are few: 512 images at batch 256 are 2 steps per epoch, and the
  # loader lives across epochs. 60 steps, a record every 10: the first 2 records (20 steps: start-up,
  # DALI's first batches, compilation) are dropped, 40 are measured. A step is estimated at ~0.1 s
  # (~10 TFLOP at ~30-40% of an H100's peak, or DALI decoding 256 JPEGs), so the steps take ~6-12 s;
  # importing torch, timm and DALI ~10 s, the FLOP count ~5 s and the final checkpoint (model +
  # AdamW, ~1.5 GB) ~5 s come on top: ~50 s eager in a 100 s limit. Compiling a ViT-B forward and
  # backward is estimated at 1-2 minutes: ~170 s compiled in a 210 s limit.
  TWO=("$PY" benchmarks/stage_two_run.py --device cuda --precision bf16 --loader auto --arch vit_base_patch16_224
       --base-arch vit_base_patch16_224 --img-size 224 --images 512 --images-per-shard 128 --views 2 --batch 256
       --k 15 --steps 60 --log-every 10 --workers 12)
  STAGE_TWO_EAGER=("${TWO[@]}" --variants cache-eager --out "$RES/gpu_stage_two_eager.json")
  STAGE_TWO_COMPILED=("${TWO[@]}" --variants cache-compiled --out "$RES/gpu_stage_two_compiled.json")
  # Stage one: ViT-B/16 base, 512 JPEGs x 2 views = 1,024 views per pass, 3 passes (bare, cache-targets,
  # bare), batch 256, 12 loader workers decoding with PIL (~1,500-3,000 views/s on 12 cores): each pass
  # a few seconds, set-up ~5 s, imports ~10 s: ~40 s in a 90 s limit.
  STAGE_ONE=("$PY" benchmarks/cache_targets.py --device cuda --arch vit_base_patch16_224 --img-size 224
             --images 512 --views 2 --batch 256 --workers 12 --shard 256 --k-max 15 --feat-dtype int8
             --attn-dtype uint8 --rss-images "" --out "$RES/gpu_stage_one.json")
  # Stage one's ceiling: 256 photos, a random-init ViT-B's targets recorded once on the GPU and
  # replayed, 1 and 4 writer threads, zstd and none, 2 repeats: its CPU run of similar rows took
  # minutes on 2 slow cores; on a 16-core host ~30-40 s in a 75 s limit.
  CEILING_ONE=("$PY" benchmarks/stage_one_ceiling.py --device cuda --archs vit_b16 --images 256 --writer-threads 1 4
               --io direct --encode device --compress zstd none --repeats 2 --out "$RES/gpu_ceiling_one.json")
  # Stage two's ceiling: 192 photos, batch 64, 2 epochs, 4 and 12 workers, every path once (the
  # CPU's slowest path, ~4 ms of CPU per view, is 384 views per pass): ~35 s in a 70 s limit.
  CEILING_TWO=("$PY" benchmarks/stage_two_ceiling.py --device cuda --images 192 --batch 64 --epochs 2 --workers 4 12
               --out "$RES/gpu_ceiling_two.json")
  LIMIT=([stage-two-eager]=100 [stage-two-compiled]=210 [stage-one]=90 [ceiling-one]=75 [ceiling-two]=65)
fi
declare -A CMD=([stage-two-eager]=STAGE_TWO_EAGER [stage-two-compiled]=STAGE_TWO_COMPILED [stage-one]=STAGE_ONE
                [ceiling-one]=CEILING_ONE [ceiling-two]=CEILING_TWO)
json_of() { echo "$RES/gpu_${1//-/_}.json"; }

# The test hooks: a subset of the parts, and parts broken on purpose.
if [[ -n "${GPU_SH_PARTS:-}" ]]; then read -r -a PARTS <<<"$GPU_SH_PARTS"; fi
for name in "${PARTS[@]}"; do
  [[ -n "${CMD[$name]:-}" ]] || { echo "error: GPU_SH_PARTS: unknown part '$name'" >&2; exit 2; }
done
for broken in ${GPU_SH_BREAK:-}; do
  name=${broken%%:*}
  [[ -n "${CMD[$name]:-}" ]] || { echo "error: GPU_SH_BREAK: unknown part '$name'" >&2; exit 2; }
  case "${broken#*:}" in
    arg) declare -n cmd=${CMD[$name]}; cmd+=(--bogus-argument-for-the-test); unset -n cmd ;;
    limit) LIMIT[$name]=1 ;;
    *) echo "error: GPU_SH_BREAK: '$broken' (expected part:arg or part:limit)" >&2; exit 2 ;;
  esac
done

total=0
for name in "${PARTS[@]}"; do total=$((total + LIMIT[$name])); done
if [[ $MODE == dry ]]; then
  for name in "${PARTS[@]}"; do
    declare -n cmd=${CMD[$name]}
    printf "%s (%s s): " "$name" "${LIMIT[$name]}"; printf "%q " "${cmd[@]}"; echo
    unset -n cmd
  done
  sums=""; for name in "${PARTS[@]}"; do sums+="${sums:+ + }$name ${LIMIT[$name]} s"; done
  echo "time limits: $sums = $total s"
  exit 0
fi

if [[ $MODE == gpu ]]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: benchmarks/gpu.sh needs a CUDA GPU and $PY's torch sees none (nvidia-smi: $(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -1 || echo 'not found')); use --cpu-smoke to check the script on a CPU" >&2
    exit 2
  fi
fi

run_part() {  # run_part NAME: its command under its limit (TERM 5 s before it, KILL at it), log apart
  local name=$1 limit=${LIMIT[$1]} json log rc=0 began=$SECONDS
  declare -n cmd=${CMD[$name]}
  json=$(json_of "$name"); log=$RES/gpu_${name//-/_}.log
  rm -f "$json"  # a JSON from an earlier run must not pass for this one's
  echo "== $name (limit ${limit} s): ${cmd[*]}" >"$log"
  timeout -k 5 "$((limit > 5 ? limit - 5 : 1))" "${cmd[@]}" >>"$log" 2>&1 || rc=$?
  echo "== $name: exit $rc after $((SECONDS - began)) s" >>"$log"
  if [[ $rc != 0 ]]; then
    "$PY" benchmarks/gpu_report.py failed "$json" "$name" "$rc" "$limit" "$log" || true
    echo "error: $name failed (exit $rc); see $log" >&2
  fi
  return "$rc"
}

start=$SECONDS
failed=0
for name in "${PARTS[@]}"; do run_part "$name" || failed=1; done
"$PY" benchmarks/gpu_report.py summary "$RES" "$((SECONDS - start))" "${PARTS[@]}"
exit $failed
