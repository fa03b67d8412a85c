#!/usr/bin/env bash
# GPU check of the five methods on real UCSD Ped2 inside one time budget (a short GPU slot).
#
#   bash .ci/gpu_ped2.sh BUDGET_S            # e.g. 540 on a GPU; DATA_ROOT must hold UCSDped2/
#   DATASET=synthetic bash .ci/gpu_ped2.sh 900   # the same sequence on the synthetic data (a CPU smoke test)
#
# Ped2 is larger than one transfer to a lent GPU machine (64 MiB a call, checkout included), so it goes in
# two pieces, in calls made back to back while the machine stays warm (carry/ is git-ignored):
#   tar cf carry/ped2/train.tar -C ../shared/data UCSDped2/Train      # 59 MB
#   tar czf carry/ped2/test.tgz -C ../shared/data UCSDped2/Test       # 46 MB (the BMP masks compress)
#   call 1 (carry carry/ped2/train.tar): mkdir -p /root/data && tar xf carry/ped2/train.tar -C /root/data
#   call 2 (carry carry/ped2/test.tgz):  tar xzf carry/ped2/test.tgz -C /root/data && bash .ci/gpu_ped2.sh 540
#
# Environment: DATA_ROOT (default /root/data), RUNS (default /root/runs), OUT (where the results go,
# default ${RUNS}_out), VAD_CACHE_DIR (default /root/cache), DATASET (default ped2).
#
# In order of what a short slot should bring back first:
#   1. deep_anomaly at the paper protocol (random AlexNet): train + test, frame/pixel metrics, frames/s;
#   2. adv3dae at the paper protocol, trained for what the budget allows, then tested (unfinished too);
#      meanwhile gan_flow's and gmfc_vae's Farneback flows are computed on the CPU cores (flow frames/s);
#   3. test throughput of stan, gan_flow, gmfc_vae and the 6-layer adv3dae on models stopped after a
#      short slice (their frames/s at the paper's input size; their AUCs mean nothing; stan's and gan_flow's
#      training steps/s), and adv3dae's 6 vs 10 layers at test batch 1;
#   4. with time left: adv3dae --no-gan (Table V), then stan, gan_flow and gmfc_vae at the paper protocol.
# Run it again on the same machine (calls back to back, while it stays warm) to go on: finished steps are
# skipped and every paper-protocol training resumes from its checkpoint. Each step has its own time limit
# and log (logs/callN/ per call); a step that fails does not stop the others. Each call leaves
# $OUT/summary.txt and $OUT/results.tgz (every log, metrics.json and the frame scores of every run, i.e.
# scores.npz without its maps, small enough to bring back from a GPU machine); the paper-protocol runs'
# full scores.npz are copied beside it when under 16 MB.
set -u
cd "$(dirname "$0")/.."

BUDGET=${1:?usage: bash .ci/gpu_ped2.sh BUDGET_S}
DATASET=${DATASET:-ped2}
DATA_ROOT=${DATA_ROOT:-/root/data}
RUNS=${RUNS:-/root/runs}
OUT=${OUT:-${RUNS}_out}
export VAD_CACHE_DIR=${VAD_CACHE_DIR:-/root/cache}
export PYTHONUNBUFFERED=1
DONE=$RUNS/done                     # a marker per finished step, so a later call skips it
mkdir -p "$RUNS/logs" "$DONE" "$OUT"
CALL=$(( $(ls "$RUNS/logs" | wc -l) + 1 ))
LOGS=$RUNS/logs/call$CALL          # one folder of logs per call
SUMMARY=$OUT/summary.txt
D="--dataset $DATASET --data-root $DATA_ROOT"
T0=$(date +%s)
PACK_RESERVE=20                      # seconds kept for packing the results

left() { echo $((BUDGET - $(date +%s) + T0 - PACK_RESERVE)); }
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in $LOGS/NAME.log, for at most LIMIT_S seconds
# and never past the budget; skipped when under 15 s would be left.
step() {
    local name=$1 limit=$2; shift 2
    local avail; avail=$(left)
    if [ "$limit" -gt "$avail" ]; then limit=$avail; fi
    if [ "$limit" -lt 15 ]; then say "$name: skipped (budget)"; return 99; fi
    local start; start=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    say "$name: rc $rc in $(($(date +%s) - start))s (limit ${limit}s): $*"
    # the lines a reader wants from the log: throughput, results, warnings, errors
    tr '\r' '\n' <"$LOGS/$name.log" | grep -a -E "frames/s|steps/s|AUC|auc|training done|stopped|warning|Error|error" \
        | grep -a -v "it/s\]$" | tail -n 12 | sed "s/^/    /" | tee -a "$SUMMARY"
    # and the last progress bar's rate (tqdm's smoothed it/s: the training steps/s of a slice)
    tr '\r' '\n' <"$LOGS/$name.log" | grep -a -E "(it/s|s/it)\]$" | tail -n 1 | sed "s/^/    last bar: /" \
        | tee -a "$SUMMARY"
    return $rc
}

# train NAME RESERVE_S COMMAND...: COMMAND --max-minutes M, M leaving RESERVE_S seconds of the budget for what
# follows (at least 30 s of training, else skipped)
train() {
    local name=$1 reserve=$2; shift 2
    local seconds=$(( $(left) - reserve ))
    if [ "$seconds" -lt 30 ]; then say "$name: skipped (budget)"; return 99; fi
    step "$name" $((seconds + 60)) "$@" --max-minutes "$(python3 -c "print(round($seconds / 60, 2))")"
}

mkdir -p "$LOGS"
say "call $CALL: budget ${BUDGET}s, dataset $DATASET under $DATA_ROOT, runs in $RUNS"
step env 60 bash -c 'nvidia-smi -L; nproc; python3 -c "import torch, cv2, sklearn; print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\", \"opencv\", cv2.__version__)"'
if [ "$DATASET" = ped2 ]; then
    step summary 60 python3 common.py $D --summary
fi

# 1. deep_anomaly, paper protocol, random backbone (no ImageNet file on a machine without internet)
if [ ! -f "$DONE/deep_anomaly" ]; then
    step deep_anomaly 240 python3 deep_anomaly.py $D --backbone-weights none --resume --out "$RUNS/deep_anomaly" \
        && touch "$DONE/deep_anomaly"
fi

# 2. flows for gan_flow (256x256) and gmfc_vae (420x280) on the CPU cores while adv3dae trains on the GPU
FLOW_WORKERS=$(( $(nproc) > 4 ? $(nproc) - 2 : 1 ))
[ "$DATASET" = synthetic ] && FLOW_SIZES="(64,64) (112,168)" || FLOW_SIZES="(256,256) (280,420)"
python3 - "$DATASET" "$DATA_ROOT" "$FLOW_WORKERS" $FLOW_SIZES >"$LOGS/flows.log" 2>&1 <<'EOF' &
import ast, sys, time
import common
name, root, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
ds = common.load_dataset(name, root)
for size in map(ast.literal_eval, sys.argv[4:]):
    for split in ("train", "test"):
        t0 = time.time()
        flows = common.load_split_flows(ds, split, size, method="farneback", workers=workers)
        num = sum(len(f) for f in flows.values())
        print(f"flows {split} {size[1]}x{size[0]}: {num} flows in {time.time() - t0:.1f}s = "
              f"{num / (time.time() - t0):.1f} frames/s ({workers} processes)")
EOF
FLOWS_PID=$!

# paper_run NAME RESERVE_S SCRIPT ARGS...: train at the paper protocol (resumed) for what leaves RESERVE_S
# seconds, then test; an unfinished model is tested too (except stan's, which has no lambda_s before the end
# of training), and a run is done once its finished model is tested.
paper_run() {
    local name=$1 reserve=$2 script=$3; shift 3
    if [ -f "$DONE/$name" ]; then return 0; fi
    train "${name}_train" "$reserve" python3 "$script" $D --train --resume --out "$RUNS/$name" "$@" || return
    local finished=1
    if grep -a -q "stopped after" "$LOGS/${name}_train.log"; then finished=0; fi
    if [ $finished = 0 ] && [ "$name" = stan ]; then return 1; fi
    step "${name}_test" 180 python3 "$script" $D --test --out "$RUNS/$name" "$@" || return
    if [ $finished = 1 ]; then touch "$DONE/$name"; else return 1; fi
}

# adv3dae, paper protocol; the first call leaves ~240 s for the throughput runs below
[ -f "$DONE/throughput" ] && reserve=30 || reserve=240
paper_run adv3dae "$reserve" adv3dae.py
wait $FLOWS_PID
say "flows: $(grep -a 'flows ' "$LOGS/flows.log" | tr '\n' ';')"

# 3. test throughput on models stopped after a short slice (MINUTES of training, counted from the start of
# the run): the AUCs of these runs say nothing about the methods. stan's and gan_flow's slices are long
# enough for their paper-protocol training steps/s ("last bar"), which sizes their full schedules.
short_run() {
    local name=$1 script=$2 minutes=$3; shift 3
    if [ -f "$DONE/${name}_short" ]; then return 0; fi
    step "${name}_short_train" 120 python3 "$script" $D --train --resume --max-minutes "$minutes" \
        --out "$RUNS/${name}_short" "$@" \
        && step "${name}_short_test" 90 python3 "$script" $D --test --out "$RUNS/${name}_short" "$@" \
        && touch "$DONE/${name}_short"
}
if [ ! -f "$DONE/throughput" ]; then
    short_run stan stan.py 0.4 --lambda-s 1
    short_run gan_flow gan_flow.py 0.4 --backbone-weights none
    short_run gmfc_vae gmfc_vae.py 0.001
    short_run adv3dae_l6 adv3dae.py 0.001 --layers 6
    # launch-bound comparison of 6 vs 10 layers (Table VII's ratio): test batch 1, on copies of the models
    for run_layers in "adv3dae_l6_short 6" "adv3dae 10"; do
        set -- $run_layers
        if [ -f "$RUNS/$1/model.pt" ]; then
            mkdir -p "$RUNS/adv3dae_b1_l$2" && cp "$RUNS/$1/model.pt" "$RUNS/adv3dae_b1_l$2/"
            step "adv3dae_b1_l$2" 90 python3 adv3dae.py $D --test --test-batch-size 1 --out "$RUNS/adv3dae_b1_l$2"
        fi
    done
    if [ -f "$DONE/stan_short" ] && [ -f "$DONE/gan_flow_short" ] && [ -f "$DONE/gmfc_vae_short" ] \
        && [ -f "$DONE/adv3dae_l6_short" ]; then touch "$DONE/throughput"; fi
fi

# 4. with time left, and in later calls: the other paper protocols, each continued where the last call stopped
paper_run adv3dae_nogan 30 adv3dae.py --no-gan \
    && paper_run stan 30 stan.py \
    && paper_run gan_flow 30 gan_flow.py --backbone-weights none \
    && paper_run gmfc_vae 30 gmfc_vae.py

# results: every log and metrics.json, and each run's frame scores (maps dropped, to stay small)
python3 - "$RUNS" "$OUT" <<'EOF'
import glob, os, sys
import numpy as np
runs, out = sys.argv[1], sys.argv[2]
for path in glob.glob(os.path.join(runs, "*", "scores*.npz")):
    if path.endswith("_frames.npz"):
        continue
    with np.load(path, allow_pickle=False) as z:
        kept = {k: z[k] for k in z.files if not k.startswith("map/")}
    np.savez(path[:-4] + "_frames.npz", **kept)
EOF
for run in deep_anomaly adv3dae adv3dae_nogan stan gan_flow gmfc_vae; do     # full scores.npz, maps too
    f=$RUNS/$run/scores.npz
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 16000000 ]; then cp "$f" "$OUT/scores_$run.npz"; fi
done
(cd "$RUNS" && tar czf "$OUT/results.tgz" logs */metrics.json */*_frames.npz 2>/dev/null)
say "done: $(du -h "$OUT/results.tgz" | cut -f1) in $OUT/results.tgz"
