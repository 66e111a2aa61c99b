#!/usr/bin/env bash
# The first CIFAR-10 sweep for a lent GPU, one command planned to end inside 10 minutes (not yet run on a GPU): the
# step's throughput for batch 512, 1024 and 2048, then seven variants at once, each trained to the same time budget and
# scored, one ranked table.
#
#     bash scripts/gpu_sweep1.sh [TARBALL_DIR] [MINUTES]
#
# TARBALL_DIR (default gpu): a folder with cifar10-jpeg-{train,test}.tar.gz, unpacked into data/ unless data/cifar10-jpeg
#   exists. MINUTES (default 5.5): the budget of each variant. The variants share the GPU, so each gets fewer
#   epochs than a run alone would: the table ranks recipes at equal cost, it does not report the recipe's best.
# The variants are the levers with the largest expected effect (issue "CIFAR-10 in ten minutes"): the authors' lr
#   rule (0.3 x 512 / 256 = 0.6), solo-learn's crop scale and colour strength, the queue started halfway, batch 1024,
#   and solo-learn's CIFAR settings for SwAV together, since its parts may only help together: its crop scale,
#   colour, LARS (eta 0.02, clipping, 1-D parameters excluded), weight decay 1e-6 and lr 0.6 per 256 images (1.2 at
#   batch 512: our linear scaling); the blur, solarisation and local crops stay ours.
# With OUT set (the GPU machine), the table and every variant's log and scores are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
TARBALL_DIR=${1:-gpu}
MINUTES=${2:-5.5}
SWEEP_DIR=${SWEEP_DIR:-out/sweep1}
EXTRA_FLAGS=${EXTRA_FLAGS:-}  # e.g. a CPU rehearsal: "--stem imagenet --batch-size 64 --local-crops 0 --max-steps 20"
BENCH_FLAGS=${BENCH_FLAGS:---bench-steps 30}
if [ ! -d data/cifar10-jpeg ]; then
    mkdir -p data
    for split in train test; do tar -xzf "$TARBALL_DIR/cifar10-jpeg-$split.tar.gz" -C data; done
fi
copy_back() {
    if [ -n "${OUT:-}" ] && [ -d "$SWEEP_DIR" ]; then
        (cd "$SWEEP_DIR" && find . \( -name "*.json" -o -name "*.txt" -o -name "log.jsonl" \) -print0 | xargs -0 -r cp --parents -t "$OUT")
    fi
}
trap copy_back EXIT
python scripts/sweep.py --out-dir "$SWEEP_DIR" --minutes "$MINUTES" \
    --base "--dataset imagefolder --data data/cifar10-jpeg $EXTRA_FLAGS" \
    --eval-flags "--kmeans-seeds 1 --knn-k 20" --bench-batch-sizes 512 1024 2048 --bench-flags "$BENCH_FLAGS" \
    --variant "defaults=" \
    --variant "lr0.6=--lr 0.6 --warmup-lr 0.06 --final-lr 0.0006" \
    --variant "crop0.08=--global-scale 0.08 1" \
    --variant "colour0.8=--jitter 0.8 0.8 0.8 0.2" \
    --variant "queue-half=--queue-len 8192 --queue-start 0.5" \
    --variant "batch1024=--batch-size 1024" \
    --variant "solo-learn=--global-scale 0.08 1 --jitter 0.8 0.8 0.8 0.2 --lars-clip --lars-trust 0.02 \
--lars-exclude-1d --weight-decay 1e-6 --lr 1.2 --warmup-lr 0.12 --final-lr 0.0012"
