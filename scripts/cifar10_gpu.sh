#!/usr/bin/env bash
# The reported CIFAR-10 run as one command on the GPU machine: unpack the JPEG tarballs, train to a time budget
# with the defaults, evaluate, draw the curves, and write a ledger row.
#
#     bash scripts/cifar10_gpu.sh [TARBALL_DIR] [MINUTES]
#
# TARBALL_DIR: a folder with cifar10-jpeg-train.tar.gz and cifar10-jpeg-test.tar.gz (they unpack to
#   cifar10-jpeg/train/<class>/*.jpg and cifar10-jpeg/test/<class>/*.jpg), unpacked into DATA_DIR unless
#   DATA_DIR/cifar10-jpeg exists already. Omitted or "-": the data must be there already.
# MINUTES: training budget, passed as `--minutes MINUTES` (default 6: training, decoding and the ~30 s evaluation
#   then fit a 9-minute command); 0 passes no budget, so the run follows --epochs.
# Environment:
#   EXTRA_FLAGS  appended to the training command, e.g. for a CPU rehearsal on a tiny folder:
#                DATA_DIR=/tmp/fake RUN_DIR=/tmp/run EXTRA_FLAGS="--max-steps 3 --batch-size 32 --epochs 1
#                --warmup-epochs 0" EVAL_FLAGS="--kmeans-seeds 1 --knn-k 5 --no-linear-probe" bash scripts/cifar10_gpu.sh - 0
#   EVAL_FLAGS   appended to the evaluation command
#   DATA_DIR     where the data lives (default data); RUN_DIR the run's folder (default out/cifar10-gpu)
#   OUT          if set (the GPU machine's folder whose files come back): log.jsonl, scores.json, eval.txt,
#                curves.png, ledger-row.md, summary.json and train.txt are copied there, also when a step fails
#                (not the checkpoint, not the grids).
# Writes RUN_DIR/{train.txt, log.jsonl, ckpt.pt, scores.json, eval.txt, grids/, curves.png, ledger-row.md, summary.json}.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root: selfclassifier.py and eval_clustering.py are there

TARBALL_DIR=${1:--}
MINUTES=${2:-6}
DATA_DIR=${DATA_DIR:-data}
RUN_DIR=${RUN_DIR:-out/cifar10-gpu}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
EVAL_FLAGS=${EVAL_FLAGS:-}
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1  # the output reaches train.txt as it is printed

copy_back() {  # on every exit, success or not: what exists comes back, so a failure can be read
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        for f in train.txt log.jsonl scores.json eval.txt curves.png ledger-row.md summary.json; do
            if [ -f "$RUN_DIR/$f" ]; then cp "$RUN_DIR/$f" "$OUT/"; fi
        done
    fi
}
trap copy_back EXIT

# data
if [ ! -d "$DATA_DIR/cifar10-jpeg" ]; then
    if [ "$TARBALL_DIR" = "-" ]; then
        echo "error: $DATA_DIR/cifar10-jpeg does not exist; give the folder of cifar10-jpeg-{train,test}.tar.gz" >&2
        exit 2
    fi
    for split in train test; do
        if [ ! -f "$TARBALL_DIR/cifar10-jpeg-$split.tar.gz" ]; then
            echo "error: $TARBALL_DIR/cifar10-jpeg-$split.tar.gz does not exist" >&2
            exit 2
        fi
    done
    mkdir -p "$DATA_DIR"
    for split in train test; do
        tar -xzf "$TARBALL_DIR/cifar10-jpeg-$split.tar.gz" -C "$DATA_DIR"
    done
fi

# training: the defaults, a time budget, EXTRA_FLAGS last (they win)
mkdir -p "$RUN_DIR"
BUDGET=()
if [ "$MINUTES" != "0" ]; then BUDGET=(--minutes "$MINUTES"); fi
# shellcheck disable=SC2206  # EXTRA_FLAGS is a list of flags: split on spaces on purpose
TRAIN=($PYTHON selfclassifier.py --dataset imagefolder --data "$DATA_DIR/cifar10-jpeg" "${BUDGET[@]}"
       --out-dir "$RUN_DIR" $EXTRA_FLAGS)
echo "${TRAIN[*]}"
start=$SECONDS
"${TRAIN[@]}" 2>&1 | tee "$RUN_DIR/train.txt"
train_s=$((SECONDS - start))
echo "training: $train_s s"

# evaluation, grids, curves
start=$SECONDS
# shellcheck disable=SC2086
$PYTHON eval_clustering.py --checkpoint "$RUN_DIR/ckpt.pt" --json "$RUN_DIR/scores.json" --grid-dir "$RUN_DIR/grids" \
    $EVAL_FLAGS 2>&1 | tee "$RUN_DIR/eval.txt"
eval_s=$((SECONDS - start))
echo "evaluation: $eval_s s"
$PYTHON scripts/plot_log.py "$RUN_DIR/log.jsonl" "$RUN_DIR/curves.png"

# the ledger row (GPU, torch version, commit, scores): scripts/sweep.py reads the run folder as it reads a variant's
if [ "$MINUTES" = "0" ]; then LEDGER_MINUTES="none"; else LEDGER_MINUTES=$MINUTES; fi
$PYTHON scripts/sweep.py --summarise "$RUN_DIR" --ledger-command "${TRAIN[*]}" --ledger-minutes "$LEDGER_MINUTES" \
    --train-seconds "$train_s" --eval-seconds "$eval_s"
