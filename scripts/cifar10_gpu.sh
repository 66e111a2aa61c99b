#!/usr/bin/env bash
# The CIFAR-10 run of docs/results.md as one command on one GPU: train selfclassifier.py with its defaults to a time
# budget, evaluate the checkpoint with eval_clustering.py, draw the training curves and write the run's ledger row.
#
#     bash scripts/cifar10_gpu.sh [TARBALL_DIR] [MINUTES]
#
# Input: CIFAR-10 as JPEG files, DATA_DIR/cifar10-jpeg/train/<class>/*.jpg and DATA_DIR/cifar10-jpeg/test/<class>/*.jpg
#   (DATA_DIR defaults to data, inside the repository and ignored by git; docs/reproduce.md says how to make it).
# TARBALL_DIR: "-" (the default) when that folder exists; else a folder holding cifar10-jpeg-train.tar.gz and
#   cifar10-jpeg-test.tar.gz (each unpacks to cifar10-jpeg/<split>/<class>/*.jpg), unpacked into DATA_DIR, and
#   optionally COMMIT, a file naming the commit of a checkout without .git (docs/reproduce.md, "As a remote GPU job").
# MINUTES: the training budget, passed as `--minutes MINUTES` (default 6). Its clock starts when selfclassifier.py's
#   main() starts (after Python's imports): reading and decoding the images count inside it, the evaluation after it
#   does not. 0 passes no budget: the run follows --epochs (28 by default).
# Environment:
#   DATA_DIR     the folder that holds cifar10-jpeg/ (default data)
#   RUN_DIR      the run's folder (default out/cifar10-gpu/<date-time>-<pid>: a new one per call; an existing one with a
#                checkpoint of the same run is continued)
#   EXTRA_FLAGS  appended to the training command (they win over the defaults), e.g. "--batch-size 1024"
#   EVAL_FLAGS   appended to the evaluation command (default "--kmeans-seeds 1": one k-means run per feature kind)
#   PYTHON       the interpreter (default: python3 where there is one, else python; the first line says which)
#   OUT          optional: a folder that receives, on every exit (also after a failure or a SIGTERM), at most 8
#                files: train.txt, log.jsonl, eval.txt, scores.json, curves.png, ledger-row.md, summary.json and
#                grids.tar.gz (the sheet of the scored head)
# A SIGTERM (e.g. `timeout -s TERM`) stops training after its current step with a checkpoint, then copies to OUT.
# Output in RUN_DIR: train.txt and log.jsonl (the training's output and JSON log), ckpt.pt, eval.txt and scores.json
# (the evaluation), grids/ (the sheet of the scored head), curves.png (scripts/plot_log.py), ledger-row.md and
# summary.json (the run's row for the ledger in docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root: selfclassifier.py and eval_clustering.py are there

TARBALL_DIR=${1:--}
MINUTES=${2:-6}
DATA_DIR=${DATA_DIR:-data}
RUN_DIR=${RUN_DIR:-out/cifar10-gpu/$(date +%Y%m%d-%H%M%S)-$$}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
EVAL_FLAGS=${EVAL_FLAGS---kmeans-seeds 1}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1  # the output reaches train.txt as it is printed

copy_back() {  # on every exit, success or not: what exists is copied, so that a failure can be read
    if [ -n "${OUT:-}" ] && [ -d "$RUN_DIR" ]; then
        mkdir -p "$OUT"
        for f in train.txt log.jsonl eval.txt scores.json curves.png ledger-row.md summary.json; do
            if [ -f "$RUN_DIR/$f" ]; then cp "$RUN_DIR/$f" "$OUT/"; fi
        done
        if [ -d "$RUN_DIR/grids" ]; then tar -czf "$OUT/grids.tar.gz" -C "$RUN_DIR" grids; fi
    fi
}
trap copy_back EXIT
trap 'echo "SIGTERM: stopping" >&2; exit 143' TERM  # run once the step in progress has ended (bash waits for it)

# what the ledger needs, first, in case every file is lost
COMMIT=$(git describe --always --dirty 2>/dev/null || cat "$TARBALL_DIR/COMMIT" 2>/dev/null || echo unknown)
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU")
echo "interpreter: $PYTHON; $("$PYTHON" -c 'import importlib.metadata as m; print(
    "torch", m.version("torch"), "torchvision", m.version("torchvision"))'); GPU: $GPU; commit: $COMMIT"
echo "command: bash scripts/cifar10_gpu.sh $TARBALL_DIR $MINUTES (RUN_DIR=$RUN_DIR EXTRA_FLAGS=$EXTRA_FLAGS" \
     "EVAL_FLAGS=$EVAL_FLAGS)"

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

# training: the defaults, a time budget, EXTRA_FLAGS last (they win); tee ignores SIGTERM and Ctrl-C, so that the training's
# last lines still reach train.txt
mkdir -p "$RUN_DIR"
BUDGET=()
if [ "$MINUTES" != "0" ]; then BUDGET=(--minutes "$MINUTES"); fi
# shellcheck disable=SC2206  # EXTRA_FLAGS is a list of flags: split on spaces on purpose
TRAIN=("$PYTHON" selfclassifier.py --dataset imagefolder --data "$DATA_DIR/cifar10-jpeg" "${BUDGET[@]}"
       --out-dir "$RUN_DIR" $EXTRA_FLAGS)
echo "${TRAIN[*]}"
start=$SECONDS
"${TRAIN[@]}" 2>&1 | (trap '' TERM INT; exec tee "$RUN_DIR/train.txt")
train_s=$((SECONDS - start))
echo "training: $train_s s"

# evaluation, grids, curves
start=$SECONDS
# shellcheck disable=SC2086
"$PYTHON" eval_clustering.py --checkpoint "$RUN_DIR/ckpt.pt" --json "$RUN_DIR/scores.json" \
    --grid-dir "$RUN_DIR/grids" $EVAL_FLAGS 2>&1 | (trap '' TERM INT; exec tee "$RUN_DIR/eval.txt")
eval_s=$((SECONDS - start))
echo "evaluation: $eval_s s"
"$PYTHON" scripts/plot_log.py "$RUN_DIR/log.jsonl" "$RUN_DIR/curves.png"

# the ledger row (GPU, torch version, commit, scores): scripts/sweep.py reads the run folder as it reads a variant's
if [ "$MINUTES" = "0" ]; then LEDGER_MINUTES="none"; else LEDGER_MINUTES=$MINUTES; fi
"$PYTHON" scripts/sweep.py --summarise "$RUN_DIR" --ledger-command "${TRAIN[*]}" --ledger-minutes "$LEDGER_MINUTES" \
    --ledger-commit "$COMMIT" --train-seconds "$train_s" --eval-seconds "$eval_s"
