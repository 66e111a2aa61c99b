#!/usr/bin/env bash
# The CIFAR-10 run of docs/results.md as one command on one GPU: train selfclassifier.py with its defaults to a time
# budget, evaluate the checkpoint with eval_clustering.py, draw the training curves and write the run's ledger row.
#
#     bash scripts/cifar10_gpu.sh [TARBALL_DIR] [MINUTES]
#
# Input: CIFAR-10 as JPEG files, DATA_DIR/cifar10-jpeg/train/<class>/*.jpg and DATA_DIR/cifar10-jpeg/test/<class>/*.jpg
#   (DATA_DIR defaults to data, inside the repository and ignored by git; docs/reproduce.md says how to make it).
# TARBALL_DIR: "-" (the default) when that folder exists; else a folder holding cifar10-jpeg-train.tar.gz and
#   cifar10-jpeg-test.tar.gz (each unpacks to cifar10-jpeg/<split>/<class>/*.jpg), unpacked into DATA_DIR.
# MINUTES: the training budget, passed as `--minutes MINUTES` (default 6); reading the images before training and
#   the evaluation after it come on top. 0 passes no budget: the run follows --epochs (28 by default).
# Environment:
#   DATA_DIR     the folder that holds cifar10-jpeg/ (default data)
#   RUN_DIR      the run's folder (default out/cifar10-gpu)
#   EXTRA_FLAGS  appended to the training command (they win over the defaults), e.g. "--batch-size 1024"
#   EVAL_FLAGS   appended to the evaluation command, e.g. "--kmeans-seeds 1"
#   PYTHON       the interpreter (default python)
#   OUT          optional: a folder that also receives the run's small files (all of RUN_DIR but the checkpoint and
#                the grids) on every exit, also after a failure
# Output in RUN_DIR: train.txt and log.jsonl (the training's output and JSON log), ckpt.pt, eval.txt and scores.json
# (the evaluation), grids/ (images per predicted class), curves.png (scripts/plot_log.py), ledger-row.md and
# summary.json (the run's row for the ledger in docs/results.md).
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

copy_back() {  # on every exit, success or not: what exists is copied, so that a failure can be read
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
        echo "error: $DATA_DIR/cifar10-jpeg does not exist; set DATA_DIR to the folder that holds it," \
             "or give the folder of cifar10-jpeg-{train,test}.tar.gz" >&2
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
