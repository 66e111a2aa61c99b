#!/usr/bin/env bash
# A prepared CIFAR-10 sweep on one GPU, planned to end inside 10 minutes: the training step's throughput for batch
# 512, 1024 and 2048 (scripts/bench_step.py), then seven variants trained at once by scripts/sweep.py, each to the
# same time budget and scored as soon as it ends, and one table ranked by the ACC of the 10-class head.
#
#     bash scripts/gpu_sweep1.sh [TARBALL_DIR] [MINUTES]
#
# Input: CIFAR-10 as JPEG files, DATA_DIR/cifar10-jpeg/train/<class>/*.jpg and DATA_DIR/cifar10-jpeg/test/<class>/*.jpg
#   (DATA_DIR defaults to data, inside the repository and ignored by git; docs/reproduce.md says how to make it).
# TARBALL_DIR: "-" (the default) when that folder exists; else a folder holding cifar10-jpeg-train.tar.gz and
#   cifar10-jpeg-test.tar.gz (each unpacks to cifar10-jpeg/<split>/<class>/*.jpg), unpacked into DATA_DIR.
# MINUTES (default 5.5): the training budget of each variant, counted from its main() (image decoding included, the
#   evaluation not). The variants share the GPU, so each gets fewer epochs than a run alone would: the table ranks
#   recipes at equal cost, it does not report a recipe's best.
# The variants: the defaults; the authors' lr rule (0.3 x 512 / 256 = 0.6); solo-learn's crop scale; its colour
#   strength; the nearest-neighbour queue started halfway; batch 1024; and solo-learn's CIFAR settings for SwAV
#   together, since its parts may only help together: its crop scale, colour, LARS (eta 0.02, clipping, 1-D
#   parameters excluded), weight decay 1e-6 and lr 0.6 per 256 images (1.2 at batch 512: our linear scaling); the
#   blur, solarisation and local crops stay ours.
# Environment:
#   DATA_DIR     the folder that holds cifar10-jpeg/ (default data)
#   SWEEP_DIR    the sweep's folder (default out/sweep1)
#   EXTRA_FLAGS  appended to every variant's training command and to the benchmark's, e.g. "--workers 8"
#   BENCH_FLAGS  scripts/bench_step.py's own flags (default "--bench-steps 30")
#   PYTHON       the interpreter (default: python3 where there is one, else python; the first line says which)
#   OUT          optional: a folder that receives, on every exit (also after a failure or a SIGTERM), table.json,
#                bench.txt and sweep1.tar.gz (every JSON, text and curves file of SWEEP_DIR; no checkpoint)
# Output in SWEEP_DIR: bench.txt and bench.json (the throughput), table.json (the ranked table, also printed), and
# per variant NAME/: train.txt, log.jsonl, ckpt.pt, eval.txt, scores.json and curves.png (scripts/plot_log.py).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
TARBALL_DIR=${1:--}
MINUTES=${2:-5.5}
DATA_DIR=${DATA_DIR:-data}
SWEEP_DIR=${SWEEP_DIR:-out/sweep1}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
BENCH_FLAGS=${BENCH_FLAGS:---bench-steps 30}
if [ ! -d "$DATA_DIR/cifar10-jpeg" ]; then
    if [ "$TARBALL_DIR" = "-" ]; then
        echo "error: $DATA_DIR/cifar10-jpeg does not exist; set DATA_DIR to the folder that holds it," \
             "or give the folder of cifar10-jpeg-{train,test}.tar.gz" >&2
        exit 2
    fi
    mkdir -p "$DATA_DIR"
    for split in train test; do tar -xzf "$TARBALL_DIR/cifar10-jpeg-$split.tar.gz" -C "$DATA_DIR"; done
fi
copy_back() {  # on every exit, success or not: 3 files
    if [ -n "${OUT:-}" ] && [ -d "$SWEEP_DIR" ]; then
        mkdir -p "$OUT"
        for f in table.json bench.txt; do if [ -f "$SWEEP_DIR/$f" ]; then cp "$SWEEP_DIR/$f" "$OUT/"; fi; done
        (cd "$SWEEP_DIR" && find . \( -name "*.json" -o -name "*.txt" -o -name "log.jsonl" -o -name "curves.png" \) \
            -print0 | tar -czf "$OUT/sweep1.tar.gz" --null -T -)
    fi
}
trap copy_back EXIT
trap 'echo "SIGTERM: stopping" >&2; exit 143' TERM
COMMIT=$(git describe --always --dirty 2>/dev/null || cat "$TARBALL_DIR/COMMIT" 2>/dev/null || echo unknown)
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU")
echo "interpreter: $PYTHON; $("$PYTHON" -c 'import importlib.metadata as m; print(
    "torch", m.version("torch"), "torchvision", m.version("torchvision"))'); GPU: $GPU; commit: $COMMIT"
echo "command: bash scripts/gpu_sweep1.sh $TARBALL_DIR $MINUTES (SWEEP_DIR=$SWEEP_DIR EXTRA_FLAGS=$EXTRA_FLAGS)"
"$PYTHON" scripts/sweep.py --out-dir "$SWEEP_DIR" --minutes "$MINUTES" \
    --base "--dataset imagefolder --data $DATA_DIR/cifar10-jpeg $EXTRA_FLAGS" \
    --eval-flags "--kmeans-seeds 1 --knn-k 20" --bench-batch-sizes 512 1024 2048 --bench-flags "$BENCH_FLAGS" \
    --variant "defaults=" \
    --variant "lr0.6=--lr 0.6 --warmup-lr 0.06 --final-lr 0.0006" \
    --variant "crop0.08=--global-scale 0.08 1" \
    --variant "colour0.8=--jitter 0.8 0.8 0.8 0.2" \
    --variant "queue-half=--queue-len 8192 --queue-start 0.5" \
    --variant "batch1024=--batch-size 1024" \
    --variant "solo-learn=--global-scale 0.08 1 --jitter 0.8 0.8 0.8 0.2 --lars-clip --lars-trust 0.02 \
--lars-exclude-1d --weight-decay 1e-6 --lr 1.2 --warmup-lr 0.12 --final-lr 0.0012"
for log in "$SWEEP_DIR"/*/log.jsonl; do  # each variant's curves; a run that logged no training step has none
    if [ -f "$log" ]; then "$PYTHON" scripts/plot_log.py "$log" "$(dirname "$log")/curves.png" || true; fi
done
