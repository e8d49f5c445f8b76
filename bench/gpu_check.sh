#!/usr/bin/env bash
# The worker on a GPU, in one short run (docs/BENCHMARKS.md §4.8 reports it and how to read it).
#
#   1. verify cost (parts 1 and 3): ONE batched target forward over B sessions × k positions against B single
#      forwards (bench.verify_cost), on random weights of the demo target's shape (bf16 and fp32)
#      and of the default 8B target's (bf16), each split into stack / model / logits / split, and
#      with greedy rows (only the argmax comes back to the host, as the worker does at T = 0), and
#      both batch layouts (padded, packed) on rows of mixed length;
#   2. the fleet bench (spececd-bench --fleet) through a real Mosquitto: a random-weight target of
#      the demo target's shape (bench.random_models), batched and unbatched worker, speculative
#      and cloud-only, N = $FLEET_NS ($FLEET_WORKERS picks the workers: batched, unbatched,
#      cost, packed). Random weights give no real acceptance, so the speculative
#      sessions replay the demo pair's rounds recorded on a CPU ($GPU_KIT/acceptance.json, a
#      fleet run's recordings.json; spececd-bench --fleet-acceptance).
#
# Run from the repository root on a machine with python3, torch (CUDA) and transformers. Set-up
# for a machine with no network, from a kit folder ($GPU_KIT, default .gpu) that
# bench/gpu_kit.sh makes beforehand, on a machine with the network and the demo pair:
#   $GPU_KIT/whl/*.whl          Python wheels to install into /tmp/site (paho-mqtt, cbor2)
#   $GPU_KIT/deb/*.deb          Mosquitto's Debian packages (unpacked, run through a wrapper),
#   $GPU_KIT/deb-fallback/*.deb libraries Mosquitto needs that the machine may lack (libnsl, ...)
#   $GPU_KIT/demo-target/       the demo target's config.json and tokenizer files (no weights)
#   $GPU_KIT/acceptance.json    the demo pair's speculative recordings (γ 2, T 0, ten prompts)
# PARTS (default vc,fleet) picks what runs. Results land in $OUT (default gpu-out): gpu-results.tgz (every report and log), summary.txt.
# Each part has its own time limit, and the archive is rewritten after each, so a part that
# fails or runs out of time leaves the others' results.
set -u
KIT=${GPU_KIT:-.gpu}
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
DEMO_CONFIG=${DEMO_CONFIG:-$KIT/demo-target}
BIG_CONFIG=${BIG_CONFIG:-bench/configs/llama-3.1-8b}
ACCEPTANCE=${ACCEPTANCE:-$KIT/acceptance.json}
MAX_NEW=${MAX_NEW:-48}
NUM_PROMPTS=${NUM_PROMPTS:-10}
FLEET_NS=${FLEET_NS:-1,2,4,8,16}
FLEET_SECONDS=${FLEET_SECONDS:-8}
FLEET_WORKERS=${FLEET_WORKERS:-batched,unbatched}
VC_BATCHES=${VC_BATCHES:-1,2,4,8,16}  # 32 ran past the parts' limits on an H200
VC_POSITIONS=${VC_POSITIONS:-1,3,5}
VC_CACHE=${VC_CACHE:-512}
VC_REPEAT=${VC_REPEAT:-10}
PY=${PYTHON:-python3}
RES=$(mktemp -d)/gpu-res
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
save() { tar czf "$OUT/gpu-results.tgz" -C "$(dirname "$RES")" gpu-res; cp "$RES/summary.txt" "$OUT/" 2>/dev/null; }
note() { echo "== $*" | tee -a "$RES/summary.txt"; }
part() {  # part NAME SECONDS CMD...: run with a limit, log to $RES/NAME.log, keep its exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc after $((SECONDS - t0)) s"
  tail -n 25 "$RES/$name.log" >>"$RES/summary.txt"
  save
  return $rc
}

# -- set-up from the kit --------------------------------------------------------------------
if ls "$KIT"/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! command -v mosquitto >/dev/null && ls "$KIT"/deb/*.deb >/dev/null 2>&1; then
  MQ=/tmp/mosquitto-kit
  for f in "$KIT"/deb/*.deb; do dpkg -x "$f" "$MQ"; done
  # the fallback libraries (libnsl, libtirpc, krb5, ...) come after the kit's, for mosquitto alone
  for f in "$KIT"/deb-fallback/*.deb; do dpkg -x "$f" /tmp/mosquitto-fallback; done
  LIBS=$MQ/usr/lib/x86_64-linux-gnu:$MQ/lib/x86_64-linux-gnu:/tmp/mosquitto-fallback/usr/lib/x86_64-linux-gnu:/tmp/mosquitto-fallback/lib/x86_64-linux-gnu
  mkdir -p /tmp/mosquitto-bin
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$LIBS" "$MQ/usr/sbin/mosquitto" >/tmp/mosquitto-bin/mosquitto
  chmod +x /tmp/mosquitto-bin/mosquitto
  export PATH=/tmp/mosquitto-bin:$PATH
fi
{
  date -u; uname -a; nproc
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "import paho.mqtt, cbor2; print('paho-mqtt', paho.mqtt.__version__, 'cbor2 ok')"
  mosquitto -h 2>&1 | head -1
} >"$RES/machine.txt" 2>&1
cp "$RES/machine.txt" "$RES/summary.txt"
save

# -- 1. verify cost against sessions × positions ------------------------------------------------
VC=(-m bench.verify_cost --random --device "$DEVICE" --cpu-linear torch --cache-len "$VC_CACHE"
    --batches "$VC_BATCHES" --positions "$VC_POSITIONS" --repeat "$VC_REPEAT")
want() { [[ ",${PARTS:-vc,fleet}," == *",$1,"* ]]; }
want vc && part vc-demo-bf16 90 $PY "${VC[@]}" --model "$DEMO_CONFIG" --dtype bfloat16 --json "$RES/vc-demo-bf16.json"

# -- 2. the fleet bench: random-weight demo-shaped target, the demo pair's rounds, real Mosquitto --
# FLEET_WORKERS picks the worker configurations, side by side in one run: batched (the defaults),
# unbatched (one session a forward), cost (the batched worker with the width rule that reads the
# measured forward cost instead of the default ratio rule: docs/ARCHITECTURE.md, "Width"), packed
# (the batched worker with batch_layout packed: no padding, docs/ARCHITECTURE.md, "Variable lengths")
FLEET_WORKER_ARGS=()
for w in ${FLEET_WORKERS//,/ }; do
  case $w in
    batched) FLEET_WORKER_ARGS+=(--fleet-worker "batched=--model-device $DEVICE --dtype float32") ;;
    unbatched) FLEET_WORKER_ARGS+=(--fleet-worker "unbatched=--model-device $DEVICE --dtype float32 --max-batch-sessions 1") ;;
    cost) FLEET_WORKER_ARGS+=(--fleet-worker "cost=--model-device $DEVICE --dtype float32 --width-rule cost") ;;
    packed) FLEET_WORKER_ARGS+=(--fleet-worker "packed=--model-device $DEVICE --dtype float32 --batch-layout packed") ;;
    *) echo "FLEET_WORKERS: unknown worker configuration '$w' (batched, unbatched, cost, packed)" >&2; exit 2 ;;
  esac
done
TARGET=$(mktemp -d)/target
want fleet && part target 90 $PY -m bench.random_models --config "$DEMO_CONFIG" --out "$TARGET" --dtype float32
want fleet && part fleet 300 $PY -m bench.cli --fleet "$FLEET_NS" --fleet-seconds "$FLEET_SECONDS" --gamma 2 --temperature 0 \
  --num-prompts "$NUM_PROMPTS" --max-new-tokens "$MAX_NEW" --draft "$TARGET" --target "$TARGET" \
  --fleet-acceptance "$ACCEPTANCE" --out "$RES/fleet" --no-progress \
  "${FLEET_WORKER_ARGS[@]}"

# -- 3. the 8B default target's shape, and the fleet's dtype -------------------------------------
want vc && part vc-8b-bf16 120 $PY "${VC[@]}" --model "$BIG_CONFIG" --dtype bfloat16 --json "$RES/vc-8b-bf16.json"
want vc && part vc-demo-bf16-greedy 90 $PY "${VC[@]}" --model "$DEMO_CONFIG" --dtype bfloat16 --greedy \
  --json "$RES/vc-demo-bf16-greedy.json"
want vc && part vc-demo-fp32 60 $PY "${VC[@]}" --model "$DEMO_CONFIG" --dtype float32 --json "$RES/vc-demo-fp32.json"
# both batch layouts, rows of mixed length (the VC_POSITIONS values in turn) in one forward
want vc && part vc-demo-mixed 90 $PY "${VC[@]}" --model "$DEMO_CONFIG" --dtype bfloat16 --greedy --layout padded,packed \
  --mix --json "$RES/vc-demo-mixed.json"
note "done"
