#!/usr/bin/env bash
# GPU check of the five methods on real UCSD Ped2 inside a time budget (a short GPU slot).
#
#   bash .ci/gpu_ped2.sh BUDGET_S                 # DATA_ROOT must hold UCSDped2/ with Train and Test
#   PHASE=train bash .ci/gpu_ped2.sh BUDGET_S     # only what needs the training split (see below)
#   DATASET=synthetic bash .ci/gpu_ped2.sh 900    # the same sequence on the synthetic data (a CPU smoke test)
#   FOCUS="stan" bash .ci/gpu_ped2.sh BUDGET_S    # the whole budget for the paper-protocol runs named
#
# One short GPU slot holds the sequence below, but not the full paper schedules of stan, gan_flow, gmfc_vae
# and adv3dae together: after a first slot has brought back deep_anomaly and every script's throughput and
# training steps/s, give each later slot to one method with FOCUS (the runs of run_command below; several
# go in order, the next only once the one before is tested).
# A FOCUS call trains (resumed) for all its budget but FOCUS_RESERVE seconds (default 150; 60 with
# PHASE=train), then tests; the same two calls as below apply, the first with PHASE=train. FOCUS_FLAGS
# adds flags to those runs (e.g. FOCUS_FLAGS=--amp where the first slot's rates say that only bf16 fits the
# schedule into one slot; each script's run_protocol then names the change; keep the same flags in both calls).
#
# Ped2 is larger than one transfer to a lent GPU machine (64 MiB a call, checkout included), so it goes in
# two pieces, in calls made back to back while the machine stays warm (carry/ is git-ignored). The first
# call trains on the training split while the test split is still on its way; the readers need a Test
# folder, so that call writes a stand-in (one normal 2-frame video) that the second call replaces:
#   tar cf carry/ped2/train.tar -C ../shared/data UCSDped2/Train      # 59 MB
#   tar czf carry/ped2/test.tgz -C ../shared/data UCSDped2/Test       # 46 MB (the BMP masks compress)
#   call 1 (carry carry/ped2/train.tar): mkdir -p /root/data && tar xf carry/ped2/train.tar -C /root/data
#          && PHASE=train bash .ci/gpu_ped2.sh 300
#   call 2 (carry carry/ped2/test.tgz, and carry/deep_anomaly_cpu if there): rm -rf /root/data/UCSDped2/Test
#          && tar xzf carry/ped2/test.tgz -C /root/data && bash .ci/gpu_ped2.sh 360
# Make call 2 as soon as call 1 returns: the machine is given back ~30 s after a call, and a call that finds
# a bare machine (no training split) stops at once with an error. So does a machine where torch sees no CUDA.
# These budgets fit 15 minutes of device time with the machine's start and the transfers (give each call
# a timeout ~40 s above its budget); with more time, raise them or make more calls of the second kind.
# When the machine's start took longer, give call 2 the device time left (the device tool's status)
# minus ~60 s instead of 360: the tool stops a call at the time left, and a stopped call loses its last step.
# Going on in a later slot: the checkpoint of a FOCUS run that a call leaves unfinished comes back too, in
# pieces of 15 MB ($OUT/model_RUN.pt.partNN), when under 60 MB (gmfc_vae's is 20 MB, adv3dae's 24, stan's
# 57; not gan_flow's 1.37 GB). Kept where the next session can reach them (e.g. as carry/ckpt/), they go
# to the machine in a call of their own before the two above, which then resume from them (where they
# cannot be kept until the next slot, size a FOCUS run to finish in its slot, by the first slot's steps/s):
#   call 0 (carry carry/ckpt): mkdir -p /root/runs/RUN && cat carry/ckpt/model_RUN.pt.part* >/root/runs/RUN/model.pt
#
# Environment: DATA_ROOT (default /root/data), RUNS (default /root/runs), OUT (where the results go,
# default ${RUNS}_out), VAD_CACHE_DIR (default /root/cache), DATASET (default ped2), PHASE (all or train),
# ALLOW_CPU=1 (a rehearsal of the ped2 calls on a machine without CUDA).
#
# In order of what a short slot should bring back first (after the checks of the device copies and of the
# CUDA-graph training steps, whose summary lines give the graphed and eager steps/s; a failed graph check
# makes gmfc_vae and gan_flow step eagerly):
#   1. deep_anomaly at the paper protocol (random AlexNet): train + test, frame/pixel metrics, frames/s
#      (float32, as on the CPU; then the same model with --amp, and with the fixed-shape cascade);
#   2. adv3dae at the paper protocol, trained for what the budget allows, then tested (unfinished too);
#      meanwhile gan_flow's and gmfc_vae's Farneback flows are computed on the CPU cores (flow frames/s);
#   3. test throughput of stan, gan_flow, gmfc_vae and the 6-layer adv3dae on models stopped after a
#      short slice (their frames/s at the paper's input size; their AUCs mean nothing; stan's, gan_flow's
#      and gmfc_vae's training steps/s, stan's for its pixel-loss and its adversarial steps), adv3dae's
#      training steps/s with --amp and with --amp --channels-last, and its 6 vs 10 layers at test batch 1;
#   4. with time left: adv3dae --no-gan (Table V), then stan, gan_flow and gmfc_vae at the paper protocol.
# PHASE=train runs the training parts of these in the same order and tests nothing. Run the script again
# on the same machine to go on: finished steps are skipped and every paper-protocol training resumes from
# its checkpoint. Each step has its own time limit and log (logs/callN/ per call); a step that fails does
# not stop the others. Each call leaves $OUT/summary.txt and $OUT/results.tgz (every log, metrics.json
# and the frame scores of every run, i.e. scores.npz without its maps, small enough to bring back from a
# GPU machine), packed again after every step; the paper-protocol runs' full scores.npz are copied beside
# it when under 16 MB.
set -u
cd "$(dirname "$0")/.."

BUDGET=${1:?usage: bash .ci/gpu_ped2.sh BUDGET_S}
DATASET=${DATASET:-ped2}
DATA_ROOT=${DATA_ROOT:-/root/data}
RUNS=${RUNS:-/root/runs}
OUT=${OUT:-${RUNS}_out}
PHASE=${PHASE:-all}
FOCUS=${FOCUS:-}
FOCUS_FLAGS=${FOCUS_FLAGS:-}         # flags added to each FOCUS run's command (e.g. --amp)
GRAPH_FLAGS=""                       # --no-cuda-graphs when the CUDA-graph check below fails
# what a FOCUS run leaves of the budget for its test (and PHASE=train, which tests nothing, for packing)
# (with PHASE=train, the slack for a slice that ends late: a script's --max-minutes clock starts after its
# imports (stan's after it has read its checkpoint), and the script finishes its step and saves once the
# clock has run out)
if [ "$PHASE" = train ]; then FOCUS_RESERVE=${FOCUS_RESERVE:-60}; else FOCUS_RESERVE=${FOCUS_RESERVE:-150}; fi
# run_command RUN: RUN_COMMAND = the script and flags of the paper-protocol run named RUN (paper_run, FOCUS)
PAPER_RUNS="deep_anomaly adv3dae adv3dae_nogan adv3dae_l6 stan gan_flow gmfc_vae"
run_command() {
    case $1 in
        deep_anomaly) RUN_COMMAND=(deep_anomaly.py --backbone-weights none) ;;
        adv3dae) RUN_COMMAND=(adv3dae.py) ;;
        adv3dae_nogan) RUN_COMMAND=(adv3dae.py --no-gan) ;;
        adv3dae_l6) RUN_COMMAND=(adv3dae.py --layers 6) ;;
        stan) RUN_COMMAND=(stan.py) ;;
        gan_flow) RUN_COMMAND=(gan_flow.py --backbone-weights none $GRAPH_FLAGS) ;;
        gmfc_vae) RUN_COMMAND=(gmfc_vae.py $GRAPH_FLAGS) ;;
        *) return 1 ;;
    esac
    if [ -n "$FOCUS" ]; then RUN_COMMAND+=($FOCUS_FLAGS); fi
}
for run in $FOCUS; do
    if ! run_command "$run"; then echo "error: FOCUS names '$run'; runs: $PAPER_RUNS" >&2; exit 2; fi
done

export VAD_CACHE_DIR=${VAD_CACHE_DIR:-/root/cache}
export PYTHONUNBUFFERED=1
DONE=$RUNS/done                      # a marker per finished step, so a later call skips it
mkdir -p "$RUNS/logs" "$DONE" "$OUT"
CALL=$(( $(ls "$RUNS/logs" | wc -l) + 1 ))
LOGS=$RUNS/logs/call$CALL           # one folder of logs per call
mkdir -p "$LOGS"
SUMMARY=$OUT/summary.txt
D="--dataset $DATASET --data-root $DATA_ROOT"
T0=$(date +%s)
PACK_RESERVE=20                      # seconds kept for packing the results

left() { echo $((BUDGET - $(date +%s) + T0 - PACK_RESERVE)); }
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$SUMMARY"; }

# pack: every log and metrics.json, and each run's frame scores (maps dropped, to stay small) into
# $OUT/results.tgz, and the paper-protocol runs' full scores.npz beside it when under 16 MB. Called after
# every step, so a call cut short by the device's own limit still brings back all but its last step.
pack() {
    python3 - "$RUNS" "$OUT" $PAPER_RUNS <<'EOF'
import glob, os, shutil, sys
import numpy as np
runs, out, paper_runs = sys.argv[1], sys.argv[2], sys.argv[3:]
newer = lambda a, b: not os.path.exists(b) or os.path.getmtime(b) < os.path.getmtime(a)
for path in glob.glob(os.path.join(runs, "*", "scores*.npz")):
    frames = path[:-4] + "_frames.npz"
    if path.endswith("_frames.npz") or not newer(path, frames):
        continue
    with np.load(path, allow_pickle=False) as z:
        kept = {k: z[k] for k in z.files if not k.startswith("map/")}
    np.savez(frames + ".tmp.npz", **kept)
    os.replace(frames + ".tmp.npz", frames)
# the paper-protocol runs' full scores.npz, compressed when over the 16 MB a returned file may have
for run in paper_runs:
    path, copy = os.path.join(runs, run, "scores.npz"), os.path.join(out, f"scores_{run}.npz")
    too_large = os.path.join(runs, run, "scores_too_large")   # compressed once, still over 16 MB
    if not os.path.exists(path) or not newer(path, copy) or not newer(path, too_large):
        continue
    if os.path.getsize(path) < 16_000_000:
        shutil.copy2(path, copy)
        continue
    with np.load(path, allow_pickle=False) as z:
        np.savez_compressed(copy + ".tmp.npz", **{k: z[k] for k in z.files})
    if os.path.getsize(copy + ".tmp.npz") < 16_000_000:
        os.replace(copy + ".tmp.npz", copy)
    else:
        os.remove(copy + ".tmp.npz")
        open(too_large, "w").close()
EOF
    local run f
    # a FOCUS run not yet done (training unfinished, or its test not yet run): its checkpoint too, in 15 MB
    # pieces (the header says how a later slot goes on from it)
    for run in $FOCUS; do
        f=$RUNS/$run/model.pt
        rm -f "$OUT/model_$run.pt.part"*
        if [ ! -f "$DONE/$run" ] && [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 60000000 ]; then
            split -b 15000000 -d "$f" "$OUT/model_$run.pt.part"
        fi
    done
    (cd "$RUNS" && tar czf "$OUT/results.tgz.tmp" logs $(ls -d */metrics.json */*_frames.npz 2>/dev/null)) \
        && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}

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
    local wanted="frames/s|steps/s|copies|AUC|auc|training done|stopped|peak memory|warning|Error|error"
    tr '\r' '\n' <"$LOGS/$name.log" | grep -a -E "$wanted" \
        | grep -a -v "it/s\]$" | tail -n 12 | sed "s/^/    /" | tee -a "$SUMMARY"
    # and the last progress bar's rate (tqdm's smoothed it/s: the training steps/s of a slice)
    tr '\r' '\n' <"$LOGS/$name.log" | grep -a -E "(it/s|s/it)\]$" | tail -n 1 | sed "s/^/    last bar: /" \
        | tee -a "$SUMMARY"
    pack
    return $rc
}

# once NAME LIMIT_S COMMAND...: step, skipped when an earlier call finished it
once() {
    if [ -f "$DONE/$1" ]; then return 0; fi
    step "$@" && touch "$DONE/$1"
}

# train NAME RESERVE_S COMMAND...: COMMAND --max-minutes M, M leaving RESERVE_S seconds of the budget for what
# follows (at least 30 s of training, else skipped)
train() {
    local name=$1 reserve=$2; shift 2
    local seconds=$(( $(left) - reserve ))
    if [ "$seconds" -lt 30 ]; then say "$name: skipped (budget)"; return 99; fi
    step "$name" $((seconds + 60)) "$@" --max-minutes "$(python3 -c "print(round($seconds / 60, 2))")"
}

# paper_run NAME RESERVE_S: train the run NAME (run_command) at the paper protocol (resumed) for what leaves
# RESERVE_S seconds, then test; an unfinished model is tested too (except stan's, which has no lambda_s before the end
# of training), and a run is done once its finished model is tested. Returns 0 only when it is done (with
# PHASE=train: when its training is).
paper_run() {
    local name=$1 reserve=$2
    if [ -f "$DONE/$name" ]; then return 0; fi
    run_command "$name"
    set -- "${RUN_COMMAND[@]}"
    local script=$1; shift
    if [ ! -f "$DONE/${name}_train" ]; then
        train "${name}_train" "$reserve" python3 "$script" $D --train --resume --out "$RUNS/$name" "$@" || return
        if ! grep -a -q "stopped after" "$LOGS/${name}_train.log"; then touch "$DONE/${name}_train"; fi
    fi
    if [ "$PHASE" = train ]; then [ -f "$DONE/${name}_train" ]; return; fi
    if [ ! -f "$DONE/${name}_train" ] && [ "$name" = stan ]; then return 1; fi
    step "${name}_test" 180 python3 "$script" $D --test --out "$RUNS/$name" "$@" || return
    if [ -f "$DONE/${name}_train" ]; then touch "$DONE/$name"; else return 1; fi
}

# short_run NAME SCRIPT MINUTES ARGS...: a slice of MINUTES (counted from the start of the run), then a test
short_run() {
    local name=$1 script=$2 minutes=$3; shift 3
    once "${name}_short_train" 120 python3 "$script" $D --train --resume --max-minutes "$minutes" \
        --out "$RUNS/${name}_short" "$@" || return
    if [ "$PHASE" = train ]; then return 0; fi
    once "${name}_short_test" 90 python3 "$script" $D --test --out "$RUNS/${name}_short" "$@"
}

say "call $CALL ($PHASE): budget ${BUDGET}s, dataset $DATASET under $DATA_ROOT, runs in $RUNS${FOCUS:+, FOCUS $FOCUS}"
if [ "$DATASET" = ped2 ] && [ ! -d "$DATA_ROOT/UCSDped2/Train" ]; then
    # e.g. call 2 on a fresh machine: the last call's was given back, and its data and runs with it
    say "error: no $DATA_ROOT/UCSDped2/Train (a bare machine?); unpack carry/ped2/train.tar there first"; exit 3
fi
test_dir=$DATA_ROOT/UCSDped2/Test
if [ "$DATASET" = ped2 ] && [ "$PHASE" = train ] && [ ! -d "$test_dir" ]; then
    # the stand-in test split: one normal video of two training frames (nothing is tested in this phase)
    mkdir -p "$test_dir/Test001" && touch "$test_dir/STAND-IN"
    cp "$DATA_ROOT/UCSDped2/Train/Train001/"00[12].* "$test_dir/Test001/"
    echo 'TestVideoFile{end+1}.gt_frame = [];' >"$test_dir/UCSDped2.m"
fi
if [ "$PHASE" != train ] && [ -f "$test_dir/STAND-IN" ]; then
    say "error: $test_dir is the stand-in of PHASE=train; unpack the real test split there first"; exit 2
fi
step env 60 bash -c 'nvidia-smi -L; nproc; python3 -c "import torch, cv2, sklearn; print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\", \"opencv\", cv2.__version__)"'
if [ "$DATASET" = ped2 ] && [ "${ALLOW_CPU:-0}" != 1 ] \
        && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    say "error: torch sees no CUDA device, so every script would run on the CPU; nothing run (ALLOW_CPU=1 runs anyway)"
    pack; exit 3
fi
if [ "$DATASET" = ped2 ]; then step summary 60 python3 common.py $D --summary; fi
# the device copies every test path uses (pinned staging, side stream, resident splits), checked on CUDA
# against the host data before anything relies on them (pytest is not on the machine)
once device_copies 60 python3 - <<'PY'
import pathlib, sys, tempfile
import torch
sys.path.insert(0, "tests")
from device_checks import check_prefetch, check_to_device      # the CUDA tests' checks, without pytest
if torch.cuda.is_available():
    check_prefetch("cuda")
    check_to_device("cuda", pathlib.Path(tempfile.mkdtemp()))
print("device copies:", "ok" if torch.cuda.is_available() else "no CUDA, nothing checked")
PY
# gmfc_vae's and gan_flow's CUDA-graph training steps (their default on CUDA) against their eager steps,
# with the speed-ups; if that fails, gmfc_vae and gan_flow step eagerly (in this call and the later ones)
if [ -f "$DONE/cuda_graph_step_failed" ] || ! once cuda_graph_step 90 python3 - <<'PY'
import sys
import torch
sys.path.insert(0, "tests")
from device_checks import check_graphed_training_step
if torch.cuda.is_available():
    what = {"gmfc_vae": "VaDE step, batch 100", "gan_flow": "one cGAN's D and G step, 256x256, batch 1"}
    for name, (eager, graphed, same_draws) in check_graphed_training_step("cuda").items():
        print(f"{name} CUDA-graph training step: ok; steps/s eager {eager:.1f}, graphed {graphed:.1f} "
              f"({graphed / eager:.2f}x; {what[name]}); random draws {'the' if same_draws else 'not the'} "
              f"eager run's")
else:
    print("CUDA-graph training steps: no CUDA, nothing checked")
PY
then
    GRAPH_FLAGS=--no-cuda-graphs; touch "$DONE/cuda_graph_step_failed"
    say "gmfc_vae and gan_flow run with --no-cuda-graphs"
fi

# FOCUS: only the named paper-protocol runs, in order, each trained (resumed) for all the budget but
# FOCUS_RESERVE seconds and then tested; a run that is not done stops the list
if [ -n "$FOCUS" ]; then
    for run in $FOCUS; do
        paper_run "$run" "$FOCUS_RESERVE" || break
    done
    pack
    say "done ($FOCUS): $(du -h "$OUT/results.tgz" | cut -f1) in $OUT/results.tgz"
    exit 0
fi

# 1. deep_anomaly, paper protocol, random backbone (no ImageNet file on a machine without internet)
once deep_anomaly_train 240 python3 deep_anomaly.py $D --train --backbone-weights none --resume \
    --out "$RUNS/deep_anomaly"
if [ "$PHASE" != train ]; then
    once deep_anomaly_test 120 python3 deep_anomaly.py $D --test --backbone-weights none --out "$RUNS/deep_anomaly"
    # the model behind the README's CPU row, when carried (carry/deep_anomaly_cpu/model.pt, 13 MB; it fits
    # beside test.tgz): tested here, it tells a difference of the GPU's test path from one of its training
    if [ -f carry/deep_anomaly_cpu/model.pt ]; then
        mkdir -p "$RUNS/deep_anomaly_cpu_model" && cp -u carry/deep_anomaly_cpu/model.pt "$RUNS/deep_anomaly_cpu_model/"
        once deep_anomaly_cpu_model_test 90 python3 deep_anomaly.py $D --test --backbone-weights none \
            --out "$RUNS/deep_anomaly_cpu_model"
    fi
    # the same model tested with --amp (bf16 convolutions), the faster opt-in setting: its frames/s and metrics
    if [ -f "$RUNS/deep_anomaly/model.pt" ]; then
        mkdir -p "$RUNS/deep_anomaly_amp" && cp -u "$RUNS/deep_anomaly/model.pt" "$RUNS/deep_anomaly_amp/"
        once deep_anomaly_amp_test 90 python3 deep_anomaly.py $D --test --amp --backbone-weights none \
            --out "$RUNS/deep_anomaly_amp"
        # and with the fixed-shape cascade (CT and G2 on every region, no host sync; the same scores) against
        # the default gather of the suspicious regions: which is faster on this GPU
        mkdir -p "$RUNS/deep_anomaly_dense" && cp -u "$RUNS/deep_anomaly/model.pt" "$RUNS/deep_anomaly_dense/"
        once deep_anomaly_dense_test 90 python3 - $D --test --backbone-weights none --out "$RUNS/deep_anomaly_dense" <<'PY'
import sys
import deep_anomaly as da
gathered = da.DeepAnomaly.region_scores
da.DeepAnomaly.region_scores = lambda self, *a, **k: gathered(self, *a, **{**k, "gather": False})
da.common.run_main(lambda: da.main(sys.argv[1:]), report_memory=True)
PY
    fi
fi

# 2. flows for gan_flow (256x256) and gmfc_vae (420x280) on the CPU cores while adv3dae trains on the GPU
FLOW_WORKERS=$(( $(nproc) > 4 ? $(nproc) - 2 : 1 ))
[ "$DATASET" = synthetic ] && FLOW_SIZES="(64,64) (112,168)" || FLOW_SIZES="(256,256) (280,420)"
[ "$PHASE" = train ] && FLOW_SPLITS=train || FLOW_SPLITS="train test"
# (load_split_flows prints the frames/s of what it computes; cached flows are only read)
python3 - "$DATASET" "$DATA_ROOT" "$FLOW_WORKERS" "$FLOW_SPLITS" $FLOW_SIZES >"$LOGS/flows.log" 2>&1 <<'EOF' &
import ast, sys
import common
name, root, workers, splits = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split()
ds = common.load_dataset(name, root)
for size in map(ast.literal_eval, sys.argv[5:]):
    for split in splits:
        common.load_split_flows(ds, split, size, method="farneback", workers=workers)
EOF
FLOWS_PID=$!

# adv3dae, paper protocol; until the throughput runs are done, leave ~240 s for them
if [ "$PHASE" = train ]; then marker=throughput_train; reserve=150; else marker=throughput; reserve=240; fi
if [ -f "$DONE/$marker" ]; then reserve=30; fi
paper_run adv3dae "$reserve"
wait $FLOWS_PID
say "flows ($FLOW_WORKERS processes): $(tr '\r' '\n' <"$LOGS/flows.log" | grep -a '^optical flow' | tr '\n' ';')"

# 3. test throughput on models stopped after a short slice: the AUCs of these runs say nothing about the
# methods. stan's, gan_flow's and gmfc_vae's slices are long enough for their paper-protocol training
# steps/s ("last bar"), which sizes their full schedules (gmfc_vae's first ~20 s on a 2-core CPU go to
# sampling its 960K patches per stream; at 0.001 min it stopped before its first step and gave no rate).
if [ ! -f "$DONE/throughput" ]; then
    short_run stan stan.py 0.4 --lambda-s 1
    # the 0.4 min above are all pixel-loss steps; the adversarial step (D's 3D convolutions too) takes 20 of
    # the 30 paper epochs: its steps/s from a slice that starts adversarial (not the paper's schedule)
    once stan_adv_short_train 90 python3 stan.py $D --train --resume --max-minutes 0.3 --pretrain-epochs 0 \
        --lambda-s 1 --out "$RUNS/stan_adv_short"
    short_run gan_flow gan_flow.py 0.4 --backbone-weights none $GRAPH_FLAGS
    short_run gmfc_vae gmfc_vae.py 0.75 $GRAPH_FLAGS
    short_run adv3dae_l6 adv3dae.py 0.001 --layers 6
    # adv3dae's training steps/s in bf16 autocast, then with channels_last_3d as well (both opt-in and not
    # yet measured): whether its paper schedule fits one slot that way (fp32: the paper run's own rate)
    once adv3dae_amp_short_train 75 python3 adv3dae.py $D --train --max-minutes 0.3 --amp \
        --out "$RUNS/adv3dae_amp_short"
    once adv3dae_amp_cl_short_train 75 python3 adv3dae.py $D --train --max-minutes 0.3 --amp --channels-last \
        --out "$RUNS/adv3dae_amp_cl_short"
    all_done() { for f in "$@"; do [ -f "$DONE/$f" ] || return 1; done; }
    if all_done stan_short_train stan_adv_short_train gan_flow_short_train gmfc_vae_short_train adv3dae_l6_short_train \
            adv3dae_amp_short_train adv3dae_amp_cl_short_train; then
        touch "$DONE/throughput_train"
    fi
    if [ "$PHASE" != train ]; then
        # launch-bound comparison of 6 vs 10 layers (Table VII's ratio): test batch 1, on copies of the models
        for run_layers in "adv3dae_l6_short 6" "adv3dae 10"; do
            set -- $run_layers
            if [ -f "$RUNS/$1/model.pt" ]; then
                mkdir -p "$RUNS/adv3dae_b1_l$2" && cp "$RUNS/$1/model.pt" "$RUNS/adv3dae_b1_l$2/"
                step "adv3dae_b1_l$2" 90 python3 adv3dae.py $D --test --test-batch-size 1 --out "$RUNS/adv3dae_b1_l$2"
            fi
        done
        if all_done stan_short_test gan_flow_short_test gmfc_vae_short_test adv3dae_l6_short_test; then
            touch "$DONE/throughput"
        fi
    fi
fi

# 4. with time left, and in later calls: the other paper protocols, each continued where the last call stopped
paper_run adv3dae_nogan 30 && paper_run stan 30 && paper_run gan_flow 30 && paper_run gmfc_vae 30

pack
say "done: $(du -h "$OUT/results.tgz" | cut -f1) in $OUT/results.tgz"
