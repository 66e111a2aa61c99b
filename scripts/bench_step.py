"""Throughput of one Self-Classifier training step, for one or several batch sizes in one process.

Per batch size (on a GPU with cudnn.benchmark off, then on) it measures:
  (a) the step alone on random views already on the device: the ceiling;
  (b) the same step fed by the real pipeline (the in-memory training images on the device, sc.Batches' batched
      augmentation), as in training;
  the augmentation alone (sc.multi_crop), in ms per step.
Model, optimizer, gradient scaler and autocast precision are training's own (sc.build_training); the learning rate
is held at --warmup-lr and the step runs without the nearest-neighbour queue. (a) and (b) are each the better of two
timings of --bench-steps steps, after 3 + 3 warm-up steps; the augmentation is one timing of --bench-steps batches.
On the CPU (a smoke run: the numbers mean little there) no warm-up and one timing each, so that it stays short.
It prints one line `RESULT {json}` per measurement and, at the end, a table; a batch size that runs out of memory
gives a row that says so, and the next batch size still runs. Measured tables: docs/results.md.

    python scripts/bench_step.py --dataset imagefolder --data data/cifar10-jpeg --batch-sizes 512 1024 2048 \
        --bench-steps 30
    python scripts/bench_step.py --dataset synthetic --batch-sizes 32 --bench-steps 2 --hidden-dim 64 \
        --stem imagenet --local-crops 1   # CPU smoke run

Own flags: --batch-sizes B [B ...] (default: --batch-size), --bench-steps N (default 40), --bench-warmup N and
--bench-repeats N (defaults: 3 and 2 on a GPU, 0 and 1 on the CPU), --bench-compile (the same as selfclassifier.py's
--compile: torch.compile(backbone) as training does it), --bench-module NAME (another copy of selfclassifier.py in
the repo root, e.g. an older version saved as sc_old.py), --json FILE (every result). All other flags are
selfclassifier.py's.
"""
import argparse
import gc
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # selfclassifier.py is in the repo root


# =====================================================================================================
# The only section that calls selfclassifier (sc.*): adapt it here when its API changes.
# =====================================================================================================
def load_config(sc, argv):
    return sc.parse_config(argv)


def training_device(sc, cfg):
    return sc.setup_distributed(cfg.device)  # one process: the device training would use, and nothing else


def load_training_images(sc, cfg, device):
    """The training split, its uint8 images and labels on the device (as sc.load_data keeps them for the batched
    augmentation)."""
    train_set = sc.load_split(cfg, train=True)
    if not sc.use_batch_aug(cfg, train_set):
        raise SystemExit("error: the benchmark needs the batched augmentation of an in-memory dataset (cifar10/100, "
                         "stl10, synthetic, or an image folder of small images) and --batch-aug auto")
    train_set.images, train_set.labels = train_set.images.to(device), train_set.labels.to(device)
    return train_set


class Trainer:
    """One batch size's model, optimizer, scaler and autocast dtype as training builds them, and its real batches."""

    def __init__(self, sc, cfg, train_set, device):
        self.sc, self.cfg, self.train_set, self.device = sc, cfg, train_set, device
        self.specs = sc.view_specs(cfg)
        self.view_sizes = [spec.size for spec in self.specs]
        self.model, self.raw_model, self.optimizer, self.scaler, _, self.dtype = sc.build_training(cfg, device,
                                                                                                    train_set)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.warmup_lr  # a small learning rate: dozens of steps on random data without diverging
        self.monitor = sc.CollapseMonitor(cfg.num_classes, device)
        self.steps_per_epoch = len(train_set) // cfg.batch_size
        self.real = self.real_batches()

    def real_batches(self):
        epoch = 0
        while True:  # epoch after epoch, as long as the benchmark asks
            yield from self.sc.Batches(self.train_set, self.cfg, self.specs, self.device, epoch, 0,
                                       self.steps_per_epoch)
            epoch += 1

    def step(self, views, labels, index):
        _, logits, _ = self.sc.train_step(self.model, self.raw_model, self.optimizer, self.scaler, views, labels,
                                          index, None, self.cfg, self.dtype)
        self.monitor.update(logits)  # training updates it every step too

    def augment(self, seed):
        index = torch.randint(len(self.train_set), (self.cfg.batch_size,), device=self.device)
        self.sc.multi_crop(self.train_set.images[index], self.specs, seed)
# =====================================================================================================


def parse_args(argv):
    # allow_abbrev=False: selfclassifier's --batch-size must not be taken for an abbreviation of --batch-sizes
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="every other flag is passed to selfclassifier.py's parser")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="one measurement per batch size (default: --batch-size)")
    p.add_argument("--bench-steps", type=int, default=40, help="steps per timing")
    p.add_argument("--bench-warmup", type=int, help="untimed steps per source first (allocator, cuDNN autotuning, "
                   "torch.compile); default 3 on a GPU, 0 on the CPU")
    p.add_argument("--bench-repeats", type=int,
                   help="timings per source, the best kept; default 2 on a GPU, 1 on the CPU")
    p.add_argument("--bench-compile", action="store_true",
                   help="the same as selfclassifier.py's --compile: torch.compile(backbone) as training does it")
    p.add_argument("--bench-module", default="selfclassifier",
                   help="module to benchmark (a .py file in the repo root)")
    p.add_argument("--json", help="write every result to this JSON file")
    return p.parse_known_args(argv)


def free_memory(device):
    gc.collect()  # the trainer and its batch generator reference each other: only the collector frees them
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_batch_size(sc, argv, batch, train_set, device, args, sync):
    """The measurements of one batch size: one result per cudnn.benchmark setting."""
    cfg = load_config(sc, argv + ["--batch-size", str(batch)])  # the last --batch-size wins
    base = dict(module=args.bench_module, compile=cfg.compile, batch=batch, device=str(device))
    trainer = Trainer(sc, cfg, train_set, device)
    if trainer.steps_per_epoch == 0:
        return [dict(base, error=f"{len(train_set)} training images are fewer than one batch")]
    gen = torch.Generator(device=device).manual_seed(0)
    random_batches = [([torch.rand(batch, 3, size, size, device=device, generator=gen)
                        for size in trainer.view_sizes],
                       torch.randint(10, (batch,), device=device, generator=gen), torch.arange(batch, device=device))
                      for _ in range(4)]

    def timed(source, n):  # images per second over n steps, the device drained before and after
        sync()
        t0 = time.perf_counter()
        for i in range(n):
            trainer.step(*(random_batches[i % 4] if source == "a" else next(trainer.real)))
        sync()
        return n * batch / (time.perf_counter() - t0)

    results = []
    # cudnn.benchmark autotunes each convolution once per shape: compare it off and on (training turns it on)
    for cudnn_bench in [False, True] if device.type == "cuda" and not cfg.compile else [False]:
        torch.backends.cudnn.benchmark = cudnn_bench
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        timed("a", args.bench_warmup)
        timed("b", args.bench_warmup)
        warmup_s = time.perf_counter() - t
        rates = {"a": [], "b": []}
        for source in ("a", "b") * args.bench_repeats:  # interleaved: a drift of the machine's speed hits both alike
            rates[source].append(timed(source, args.bench_steps))
        sync()
        t0 = time.perf_counter()
        for i in range(args.bench_steps):
            trainer.augment(i)
        sync()
        aug_ms = 1000 * (time.perf_counter() - t0) / args.bench_steps
        a, b = max(rates["a"]), max(rates["b"])
        results.append(dict(base, cudnn_benchmark=cudnn_bench, views=len(trainer.view_sizes),
                            steps=args.bench_steps, warmup_steps=args.bench_warmup, warmup_s=warmup_s,
                            a_img_s=rates["a"], b_img_s=rates["b"], a_best=a, b_best=b, b_over_a=b / a,
                            step_ms_a=1000 * batch / a, step_ms_b=1000 * batch / b, aug_ms_per_step=aug_ms,
                            max_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0))
        print("RESULT " + json.dumps(results[-1]), flush=True)
    return results


def format_table(results):
    lines = [f"{'batch':>6} {'cudnn':>5} {'(a) img/s':>10} {'(b) img/s':>10} {'(b)/(a)':>7} {'ms/step (a)':>11} "
             f"{'ms/step (b)':>11} {'aug ms':>7} {'peak GB':>8}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['batch']:>6} {r['error']}")
        else:
            lines.append(f"{r['batch']:>6} {'on' if r['cudnn_benchmark'] else 'off':>5} {r['a_best']:>10.0f} "
                         f"{r['b_best']:>10.0f} {r['b_over_a']:>7.2f} {r['step_ms_a']:>11.1f} "
                         f"{r['step_ms_b']:>11.1f} {r['aug_ms_per_step']:>7.1f} {r['max_mem_gb']:>8.2f}")
    return "\n".join(lines)


def main(argv=None):
    args, sc_argv = parse_args(sys.argv[1:] if argv is None else argv)
    sc = importlib.import_module(args.bench_module)
    sc_argv += ["--compile"] if args.bench_compile else []
    cfg = load_config(sc, sc_argv)
    args.bench_compile = cfg.compile  # --bench-compile or --compile
    device = training_device(sc, cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    on_gpu = device.type == "cuda"
    args.bench_warmup = args.bench_warmup if args.bench_warmup is not None else 3 if on_gpu else 0
    args.bench_repeats = args.bench_repeats if args.bench_repeats is not None else 2 if on_gpu else 1
    t = time.perf_counter()
    train_set = load_training_images(sc, cfg, device)  # once: the images do not depend on the batch size
    print(f"decode {time.perf_counter() - t:.1f} s, {len(train_set)} training images on {device}", flush=True)
    results = []
    for batch in args.batch_sizes or [cfg.batch_size]:
        try:
            results += bench_batch_size(sc, sc_argv, batch, train_set, device, args, sync)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            # the rest of the row is left out; the memory is freed below, once the traceback's frames are gone
            results.append(dict(module=args.bench_module, compile=args.bench_compile, batch=batch,
                                device=str(device), error="out of memory"))
            print("RESULT " + json.dumps(results[-1]), flush=True)
        free_memory(device)
    print(f"\n{args.bench_module}{' + torch.compile(backbone)' if args.bench_compile else ''} on {device}, "
          f"{args.bench_steps} steps per timing, best of {args.bench_repeats}, after {args.bench_warmup} warm-up steps")
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
