"""Self-Classifier in one file: self-supervised classification, trained end to end in one stage.

Amrani, Karlinsky, Bronstein, "Self-Supervised Classification Network", ECCV 2022 (arXiv 2103.10994).
Augmented views of an image go through backbone -> projection MLP -> linear classifiers over C classes, and every
view must predict the class of the others. A uniform prior over classes (a softmax over the *batch*, paper Eq. 4-5)
rules out the trivial solution: no pseudo-labels, k-means, momentum encoder or stop-gradient.

    # CPU smoke run on an offline synthetic dataset with known labels
    python selfclassifier.py --dataset synthetic --stem imagenet --epochs 3 --batch-size 128 --hidden-dim 512 \
        --num-classes 10 20 --warmup-epochs 1 --local-crops 0 --lr 1.0
    # CIFAR-10 on one GPU, trained to a wall-clock budget of 10 minutes; several GPUs: torchrun --nproc_per_node=4
    python selfclassifier.py --dataset cifar10 --data ./data --download --minutes 10

Results: README.md. Sections: model | loss | nearest-neighbour queue | LARS | schedule | one training step, then the
machinery: config | augmentation | data | distributed helpers | checkpoints | monitors | training loop | main.
"""
import argparse
import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import shlex
import signal
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

warnings.filterwarnings("ignore", "torch.distributed.nn.functional.* is deprecated", FutureWarning)


# ---- Model: ResNet backbone -> projection MLP (l2-normalised) -> weight-normalised linear heads, one per C
class SelfClassifier(nn.Module):
    def __init__(self, arch="resnet18", stem="cifar", hidden_dim=4096, embed_dim=128, num_classes=(10,),
                 pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.25, 0.25, 0.25)):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1))  # saved with the weights
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1))
        self.backbone = getattr(torchvision.models, arch)(weights=None)
        if stem == "cifar":  # 32 px images: keep the resolution in the stem (initialised as torchvision's convs)
            self.backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.backbone.maxpool = nn.Identity()
        self.feature_dim = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.projector = nn.Sequential(
            nn.Linear(self.feature_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.LeakyReLU(inplace=True),
            nn.Linear(hidden_dim, embed_dim))
        for linear in (self.projector[0], self.projector[3]):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        self.heads = nn.ModuleList()
        for c in num_classes:
            head = nn.utils.parametrizations.weight_norm(nn.Linear(embed_dim, c, bias=False))
            head.parametrizations.weight.original0.data.fill_(1.0)  # weight-norm magnitude g starts at 1
            self.heads.append(head)

    def features(self, images):
        """Backbone features [B, feature_dim] of float images in [0, 1] (the only part autocast may lower)."""
        return self.backbone((images - self.pixel_mean) / self.pixel_std)

    def embed(self, features):
        """Projection MLP, l2-normalised, in float32 even under autocast: [B, feature_dim] -> [B, embed_dim]."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.to(self.projector[0].weight.dtype)
            return F.normalize(self.projector(features), dim=1, eps=1e-7)  # the authors' eps

    def classify(self, z):
        """Logits of every head in float32 even under autocast (the column softmax divides them by col_tau, which
        would multiply bf16 rounding errors by 20): [B, embed_dim] -> list over heads of [B, C]."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(self.projector[0].weight.dtype)
            return [head(z) for head in self.heads]

    def forward(self, views):
        """views: list of [B, 3, h, w] -> (embeddings: list over views of [B, D], head_logits: list over heads of
        (list over views of [B, C])). As the authors: the backbone runs once per crop resolution, then the projection
        once on the features of all views together, so its BatchNorm normalises over global and local views at once."""
        features = [self.features(torch.cat(same_size)) for same_size in runs_of(views, key=lambda v: v.shape[-1])]
        z = self.embed(torch.cat(features))                                   # [V*B, D]
        return list(z.chunk(len(views))), [list(s.chunk(len(views))) for s in self.classify(z)]


def runs_of(items, key):
    """Consecutive items with equal key, as lists: the views (or view specs) of one crop size."""
    return [list(run) for _, run in itertools.groupby(items, key=key)]


# ---- Loss (paper Eq. 4-5, Algorithm 1)
def no_gather(x):
    """The loss's gather on one process: the batch is the global batch, and all its rows are this process's."""
    return x, slice(None)


def self_classifier_loss(view_logits, row_tau=0.1, col_tau=0.05, num_global=2, eps=1e-12, gather=no_gather):
    """Self-Classifier cross-entropy of one classification head over all views.

    view_logits: list over views (global views first) of [B, C] logits s = head(z) of this process's B images.
    gather(x) -> (x over the global batch of N images, the slice of this process's rows in it): no_gather on one
    process (N = B); in data-parallel training gather_with_grad, an all-gather *with gradient*, so that both softmaxes
    below normalise over the global batch.

        p(y|x)  = softmax_y(s / row_tau)                       "row softmax", over classes
        p(x|y)  = softmax_x(s / col_tau)                       "column softmax", over the N images of the batch
        target(x_i)[n, y]  = p(x_n|y) / sum_y' p(x_n|y')                 (Eq. 5, via Bayes: uniform p(y))
        logpred(x_j)[n, y] = log( N/C * p(y|x_n) / sum_n' p(y|x_n') )   (Eq. 4: uniform prior on classes)
        l(i, j) = -mean over this process's rows n of sum_y target(x_i)[n, y] * logpred(x_j)[n, y]

    (with equal B on every process, the mean of l over processes, which DDP's gradient averaging takes, is the
    mean over the global batch). Returns the mean of l(i, j) over ordered pairs (target view i, predicted view j),
    i != j, skipping pairs of two local views (index >= num_global); for two views (l(0,1) + l(1,0)) / 2:

        pairs = [(i, j) for i in range(V) for j in range(V) if i != j and (i < num_global or j < num_global)]
        loss = sum(l(i, j) for i, j in pairs) / len(pairs)

    computed for all pairs at once as one [V, V] matrix of l(i, j). No stop-gradient: the target is differentiated
    too. Float32 even under autocast. eps = 1e-12 is the authors': with logits of about 3, 1e-8 changes the loss by
    ~25 % and the gradient by more than 100 % (column-softmax masses of a sample fall below 1e-8)."""
    logits = torch.stack(view_logits, 1)                                        # [B, V, C]: all views at once
    logits, rows = gather(logits.to(torch.promote_types(logits.dtype, torch.float32)))  # [N, V, C], >= float32
    N, V, C = logits.shape
    targets = F.normalize(F.softmax(logits / col_tau, dim=0), p=1, dim=2, eps=eps)[rows]                # Eq. 5
    log_preds = torch.log(N / C * F.normalize(F.softmax(logits / row_tau, dim=2), p=1, dim=0, eps=eps) + eps)[rows]
    with torch.autocast(logits.device.type, enabled=False):  # a matmul: autocast would lower it
        cross = -torch.einsum("bic,bjc->ij", targets, log_preds) / len(targets)        # [V, V]: l(i, j)
    view = torch.arange(V, device=logits.device)
    pairs = (view[:, None] != view) & ((view[:, None] < num_global) | (view < num_global))
    return (cross * pairs).sum() / pairs.sum()


# the loss's and the queue's gathers in data-parallel training; no-ops on one process
def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather(x, with_grad=False):
    """All-gather along dim 0; with_grad: differentiable (each rank's gradient flows back to the rank it came from)."""
    if world_size() == 1:
        return x
    if with_grad:
        import torch.distributed.nn.functional as dist_nn
        return torch.cat(dist_nn.all_gather(x))
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_with_grad(x):
    """The loss's gather in data-parallel training: (the global batch, with gradient; the slice of this rank's rows)."""
    return all_gather(x, with_grad=True), slice(rank() * len(x), (rank() + 1) * len(x))


# ---- Nearest-neighbour augmentation: the first global view's embedding replaced by its nearest past neighbour
class NeighbourQueue(nn.Module):
    """FIFO queue of detached embeddings of the first global view of past batches (all ranks), with their dataset
    indices (to never return a sample as its own neighbour) and labels (only to monitor neighbour label agreement).
    The authors replace the first view's embedding by its neighbour's before the heads; train_step replaces that
    view's logits by the heads' logits of the neighbour, the same numbers (the heads act on each row alone)."""

    def __init__(self, length, dim):
        super().__init__()
        self.known_full = False  # the device's counter is read only until the queue has filled once
        self.register_buffer("embeddings", torch.zeros(length, dim))
        self.register_buffer("indices", torch.full((length,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((length,), -1, dtype=torch.long))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))

    def is_full(self):
        self.known_full = self.known_full or int(self.pushed) >= len(self.embeddings)
        return self.known_full

    @torch.no_grad()
    def neighbours(self, z, index):
        """Nearest queued embedding by dot product, excluding the sample itself: [B, D] -> ([B, D], labels [B])."""
        top2 = (z.float() @ self.embeddings.T).topk(2, dim=1).indices
        pick = torch.where(self.indices[top2[:, 0]] == index, top2[:, 1], top2[:, 0])
        return self.embeddings[pick], self.labels[pick]

    @torch.no_grad()
    def push(self, z, index, labels, gather=lambda x: x):
        """Queue this batch; gather (data-parallel training: the all-gather of every rank's batch) queues all ranks'."""
        z, index, labels = gather(z.float()), gather(index), gather(labels)
        slots = (self.pushed + torch.arange(len(z), device=z.device)) % len(self.embeddings)
        self.embeddings[slots], self.indices[slots], self.labels[slots] = z, index, labels
        self.pushed += len(z)


# ---- LARS
class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio; reproduces apex LARC(SGD, trust_coefficient=0.001,
    clip=False) as the authors ran it. For each parameter w with gradient g and non-zero norms:

        local_lr = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
        (clip=True: local_lr = min(local_lr / lr, 1), apex's clip and solo-learn's LARS)
        d = (g + weight_decay * w) * local_lr;   buf = momentum * buf + d;   w -= lr * buf

    A parameter or gradient of norm zero gets d = g (apex then applies no weight decay either). Groups with
    lars=False (e.g. biases and norm parameters, DINO's choice) get plain SGD with momentum instead."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, clip=False, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, clip=clip, eps=eps, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        """The formula above for every parameter at once (torch._foreach_*: about 20 launches, not 15 per
        parameter); returns closure()'s loss when given one, as torch.optim.Optimizer's contract asks."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            d = grads
            if group["lars"]:
                wd = group["weight_decay"]
                w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
                local_lr = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                if group["clip"]:
                    local_lr = (local_lr / group["lr"]).clamp(max=1)
                # d = (g + wd * w) * local_lr; a zero norm gives d = g: factor 1 when ||w|| = 0 (then wd * w = 0),
                # factor 0 when ||g|| = 0 (then g = 0)
                factor = torch.where((w_norm > 0) & (g_norm > 0), local_lr, (g_norm > 0).to(local_lr.dtype))
                d = torch._foreach_add(grads, params, alpha=wd)
                torch._foreach_mul_(d, list(factor.to(d[0].dtype).unbind()))
            for p in params:  # zeros only for a new buffer: creating them every step would cost a launch each
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])  # a new buffer: 0 * momentum + d = d
            torch._foreach_add_(bufs, d)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def build_optimizer(model, cfg):
    """Param groups: 1-D parameters (biases, BatchNorm weights) separately when excluded; the heads' weight-norm
    magnitudes are [C, 1], not 1-D, and stay with the rest, as under DINO's and the authors' rule (ndim == 1)."""
    decay = [p for p in model.parameters() if p.ndim > 1 or not cfg.lars_exclude_1d]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and cfg.lars_exclude_1d]
    groups = [dict(params=decay)] + ([dict(params=no_decay, weight_decay=0.0, lars=False)] if no_decay else [])
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coefficient=cfg.lars_trust, clip=cfg.lars_clip)
    for g in groups:
        g.pop("lars", None)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# ---- Schedule: linear warmup, then cosine decay, per iteration
def lr_at(step, total_steps, warmup_steps, peak_lr, warmup_lr, final_lr):
    """Learning rate at optimizer step `step` (0-based) of `total_steps`, step for step the authors' schedule (DINO's
    cosine_scheduler): warmup_lr to peak_lr over the warmup steps, both ends included, then a cosine from peak_lr
    at the first step after warmup towards final_lr, which it would reach one step after the last."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / max(1, warmup_steps - 1)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + 0.5 * (peak_lr - final_lr) * (1 + math.cos(math.pi * progress))


# ---- One training step
def train_step(model, raw_model, optimizer, scaler, views, labels, index, queue, cfg, dtype, neighbour_swap=True):
    """One optimisation step on this rank's batch; returns (loss, head_logits: list over heads of list over views of
    [B, C], [images whose nearest neighbour has their label, labelled images] or None). `model` may be DDP-wrapped;
    `raw_model` is the unwrapped SelfClassifier. With a full queue and neighbour_swap, the first global view's
    logits are those of its nearest neighbour in the queue. Nothing is read back to the host (but the queue's fill
    count, until it has filled once), so on a GPU the host can queue the next step while this one runs."""
    if views[0].is_cuda:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    with torch.autocast(views[0].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        embeddings, head_logits = model(views)
    agree = None
    if queue is not None:  # nearest-neighbour augmentation of views[0] (no gradient to the backbone through it)
        if neighbour_swap and queue.is_full():
            neighbour, neighbour_label = queue.neighbours(embeddings[0], index)
            labelled = labels >= 0  # counts, not a masked mean: a boolean mask would read the mask back to the host
            agree = torch.stack([((neighbour_label == labels) & labelled).sum(), labelled.sum()])
            for view_logits, s in zip(head_logits, raw_model.classify(neighbour)):
                view_logits[0] = s
        queue.push(embeddings[0].detach(), index, labels, gather=all_gather)
    loss = sum(self_classifier_loss(view_logits, cfg.row_tau, cfg.col_tau, gather=gather_with_grad)
               for view_logits in head_logits) / len(head_logits)  # mean over heads
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), head_logits, agree


# ---- Config: every knob in one place; the command line is generated from these fields
DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "synthetic")
IMAGENET_MEAN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, never as a traceback."""


def one_line(error):
    """An exception as 'Type: first line of its message', for one-line errors about files that will not load."""
    return f"{type(error).__name__}: {(str(error) or '?').splitlines()[0]}"


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def option(default, help, **argparse_kwargs):
    """A config field whose help text (and argparse settings) live next to its default."""
    metadata = dict(help=help, **argparse_kwargs)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def checked(convert, is_valid, requirement):
    """An argparse type: convert the text, then refuse a value that fails is_valid with a one-line reason."""
    def parse(text):
        value = convert(text)
        if not is_valid(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
        return value
    parse.__name__ = convert.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


positive_float = checked(float, lambda v: v > 0, "must be > 0")
non_negative_float = checked(float, lambda v: v >= 0, "must be >= 0")
positive_int = checked(int, lambda v: v >= 1, "must be >= 1")
non_negative_int = checked(int, lambda v: v >= 0, "must be >= 0")
epochs_or_auto = checked(int, lambda v: v >= -1, "must be >= 0, or -1 for automatic")
num_classes_type = checked(int, lambda v: v >= 2, "a head needs at least 2 classes")
probability = checked(float, lambda v: 0 <= v <= 1, "must be a probability in [0, 1]")
scale_type = checked(float, lambda v: 0 < v <= 1, "a crop scale is a fraction of the image area in (0, 1]")
momentum_type = checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)")


@dataclass
class Config:
    # data (labels serve the monitors and the evaluation only)
    dataset: str = option("cifar10", "training data", choices=DATASETS)
    data: str = option("./data", "root; imagefolder: DATA/train/<class>/*, DATA/test (or val)/<class>/*, or any images")
    download: bool = option(False, "let torchvision download CIFAR / STL-10 into --data")
    in_memory_max_size: int = option(96, "imagefolder: decode images up to this side in memory", type=non_negative_int)
    batch_aug: str = option("auto", "auto: augment in-memory data by batch on the device", choices=("auto", "off"))
    workers: int = option(min(8, available_cpus()), "data-loading processes per GPU", type=non_negative_int)
    # multi-crop augmentation (paper: 2 x 224 px at scale (0.4, 1), 6 x 96 px at scale (0.05, 0.4))
    global_size: int = option(32, "side of the two global crops in pixels", type=positive_int)
    global_scale: list = option((0.4, 1.0), "area range of the global crops", nargs=2, type=scale_type)
    local_crops: int = option(4, "number of local crops (0 = two views only)", type=non_negative_int)
    local_size: int = option(16, "side of the local crops in pixels", type=positive_int)
    local_scale: list = option((0.05, 0.4), "area range of the local crops", nargs=2, type=scale_type)
    jitter: list = option((0.4, 0.4, 0.2, 0.1), "brightness contrast saturation hue", nargs=4, type=non_negative_float)
    jitter_prob: float = option(0.8, "probability of the colour jitter", type=probability)
    gray_prob: float = option(0.2, "probability of grayscale", type=probability)
    blur_prob: list = option((0.0, 0.0, 0.0), "blur probability: global 1, 2, local", nargs=3, type=probability)
    solarize_prob: float = option(0.2, "solarisation probability of the second global crop", type=probability)
    # model
    arch: str = option("resnet18", "torchvision backbone", choices=("resnet18", "resnet34", "resnet50"))
    stem: str = option("auto", "cifar (3x3) or imagenet (7x7 + max-pool); auto: cifar up to --global-size 64",
                       choices=("auto", "cifar", "imagenet"))
    hidden_dim: int = option(4096, "hidden width of the projection MLP", type=positive_int)
    embed_dim: int = option(128, "output width of the projection MLP (the embedding)", type=positive_int)
    num_classes: list = option((10, 20, 40, 80), "one head per value, its C", nargs="+", type=num_classes_type)
    # loss (paper: tau_row 0.1, tau_col 0.05) and nearest-neighbour queue
    row_tau: float = option(0.1, "temperature of the softmax over classes (prediction)", type=positive_float)
    col_tau: float = option(0.05, "temperature of the softmax over the batch (target)", type=positive_float)
    queue_len: int = option(0, "nearest-neighbour queue length (0 = off; paper: 262144)", type=non_negative_int)
    queue_start: float = option(0.0, "share of the schedule before the queue is used", type=probability)
    # optimisation (the authors' ImageNet script: LARS, lr 3.2 at batch 4096, warmup 10 epochs from 0.2, cosine)
    epochs: int = option(28, "training epochs (with --minutes: until the budget is planned)", type=positive_int)
    minutes: float = option(0.0, "train to this wall-clock budget instead (0 = off)", type=non_negative_float)
    batch_size: int = option(512, "images per GPU per step", type=positive_int)
    optimizer: str = option("lars", "lars (apex LARC, as the authors) or plain sgd", choices=("lars", "sgd"))
    lr: float = option(2.0, "peak learning rate (the authors: 0.3 x global batch / 256)", type=positive_float)
    warmup_lr: float = option(0.2, "learning rate at step 0", type=non_negative_float)
    final_lr: float = option(0.002, "end of the cosine (the authors: --lr / 1000)", type=non_negative_float)
    warmup_epochs: float = option(5.0, "linear warmup length in epochs", type=non_negative_float)
    weight_decay: float = option(1e-5, "weight decay (the authors: 1e-6)", type=non_negative_float)
    momentum: float = option(0.9, "SGD momentum", type=momentum_type)
    lars_trust: float = option(0.001, "LARS trust coefficient (solo-learn: 0.02 with --lars-clip)", type=positive_float)
    lars_clip: bool = option(False, "LARS: cap the trust ratio at lr (apex's clip=True, solo-learn)")
    lars_exclude_1d: bool = option(False, "LARS: plain SGD without decay for biases and norms (DINO, solo-learn)")
    # run
    bn_group_size: int = option(0, "ranks each BatchNorm pools (0 = all; the authors: 22)", type=non_negative_int)
    precision: str = option("auto", "backbone autocast; auto: bf16 from Ampere, fp16 before, fp32 on the CPU",
                            choices=("auto", "bf16", "fp16", "fp32"))
    compile: bool = option(False, "torch.compile the backbone")
    seed: int = option(0, "random seed (each rank adds its rank)", type=int)
    device: str = option("auto", "auto = cuda when available, else cpu", choices=("auto", "cuda", "cpu"))
    out_dir: str = option("", "ckpt.pt (resumed if of this run) and log.jsonl; default: out/<dataset or folder>")
    resume: str = option("", "a new run from this checkpoint's weights (ours or the authors')")
    max_steps: int = option(0, "stop after this many steps (0 = the whole schedule)", type=non_negative_int)
    log_every: int = option(50, "steps between log lines (and after 1, 2, 4, ... steps)", type=positive_int)
    save_every_min: float = option(15.0, "minutes between mid-epoch checkpoints", type=positive_float)
    eval_every: int = option(-1, "epochs between heads monitors (-1: each; with --minutes: the end; 0: never)",
                             type=epochs_or_auto)
    knn_every: int = option(-1, "epochs between kNN monitors (-1: 10 up to 100,000 images, else 0 = never)",
                            type=epochs_or_auto)


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Help texts with their default, once: not when the text names one already, nor for no default."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, "", argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class CommandLine(argparse.ArgumentParser):
    """argparse answering a bad command line in one line: no abbreviations, the closest flag, where help is."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=DefaultsOnce, **kwargs)

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flag = unknown[1].split("=")[0]
            flags = [option for action in self._actions for option in action.option_strings]
            close = sorted(f for f in flags if f.startswith(flag)) or difflib.get_close_matches(flag, flags, n=1)
            message = f"unknown option {flag}" + (f"; did you mean {' or '.join(close[:3])}?" if close else "")
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def config_parser():
    parser = CommandLine(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        kwargs = dict(f.metadata)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "type" not in kwargs:
            kwargs["type"] = type(default)
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, **kwargs)
    return parser


def parse_config(argv=None):
    parser = config_parser()
    cfg = Config(**vars(parser.parse_args(argv)))
    for name in ("global_scale", "local_scale"):
        low, high = getattr(cfg, name)
        if low > high:
            parser.error(f"--{name.replace('_', '-')}: the first value must not exceed the second, got {low} {high}")
    if cfg.warmup_epochs > cfg.epochs:
        parser.error(f"--warmup-epochs {cfg.warmup_epochs} exceeds --epochs {cfg.epochs}")
    cfg.stem = resolve_stem(cfg.stem, cfg.global_size)  # stored resolved: a checkpoint says which stem it has
    cfg.data = str(Path(cfg.data).expanduser().resolve())  # a checkpoint names the data it was trained on
    default_out = Path(cfg.data).name if cfg.dataset == "imagefolder" else cfg.dataset  # runs on different data never
    cfg.out_dir = cfg.out_dir or str(Path("out") / default_out)                          # share a checkpoint
    return cfg


def resolve_stem(stem, global_size):
    """--stem auto: the 3x3 CIFAR stem for crops of at most 64 px, ImageNet's 7x7 stem + max-pool above."""
    return stem if stem != "auto" else "cifar" if global_size <= 64 else "imagenet"


def build_model(cfg, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.25, 0.25, 0.25)):
    stem = resolve_stem(cfg.stem, cfg.global_size)
    return SelfClassifier(cfg.arch, stem, cfg.hidden_dim, cfg.embed_dim, cfg.num_classes, pixel_mean, pixel_std)


# ---- Multi-crop augmentation (BYOL/DINO recipe): per image in DataLoader workers, or per batch on the device
RATIO = (3 / 4, 4 / 3)  # aspect ratios of RandomResizedCrop
BLUR_SIGMA = (0.1, 2.0)  # in pixels of the crop, whatever its size: the radius of the authors' PIL GaussianBlur


@dataclass
class ViewSpec:
    """How one view is drawn. The defaults after the first four are the authors' (BYOL's) colour recipe."""
    size: int
    scale: tuple
    blur_prob: float
    solarize_prob: float
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_prob: float = 0.8
    gray_prob: float = 0.2
    flip_prob: float = 0.5


def view_specs(cfg):
    """The crops of one image: global 1 (paper: blur p 0.1; the queue replaces it), global 2, the local crops."""
    blur0, blur1, blur_local = cfg.blur_prob
    colour = dict(jitter=tuple(cfg.jitter), jitter_prob=cfg.jitter_prob, gray_prob=cfg.gray_prob)
    return ([ViewSpec(cfg.global_size, tuple(cfg.global_scale), blur0, 0.0, **colour),
             ViewSpec(cfg.global_size, tuple(cfg.global_scale), blur1, cfg.solarize_prob, **colour)]
            + [ViewSpec(cfg.local_size, tuple(cfg.local_scale), blur_local, 0.0, **colour)] * cfg.local_crops)


def blur_kernel_size(size):
    """Odd kernel of 4 sigma each side (17 px), cut to the crop: the std of PIL's GaussianBlur(radius=sigma) (the
    authors') at every crop size; a kernel of 10 % of the side blurs less."""
    return 2 * min(math.ceil(4 * BLUR_SIGMA[1]), size - 1) + 1  # reflect padding needs radius < side


def per_image_transform(spec):
    """One view, one image at a time: PIL or uint8 tensor in, float [3, size, size] in [0, 1] out."""
    brightness, contrast, saturation, hue = spec.jitter
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=RATIO, interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(spec.flip_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=spec.jitter_prob),
        v2.RandomGrayscale(spec.gray_prob),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(spec.size), sigma=BLUR_SIGMA)], p=spec.blur_prob),
        v2.RandomSolarize(threshold=0.5, p=spec.solarize_prob),
        v2.Lambda(lambda x: x.clamp(0, 1).as_subclass(torch.Tensor)),
    ])


class PerImageViews(torch.utils.data.Dataset):
    """dataset[(index, epoch_seed)] -> (list of views, label, index), seeded by (epoch seed, index), i.e. by (run
    seed, epoch, index): any worker count or mid-epoch resume agrees."""

    def __init__(self, dataset, specs):
        self.dataset, self.transforms = dataset, [per_image_transform(s) for s in specs]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch_seed = key
        seed = derive_seed(epoch_seed, index)
        image, label = self.dataset[index]
        while image is None:  # unreadable file: say so and use the next image instead of crashing mid-epoch
            print(f"skipped unreadable image {self.dataset.samples[index][0]}", file=sys.stderr, flush=True)
            index = (index + 1) % len(self.dataset)
            image, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG; leave it as it was
            torch.manual_seed(seed)
            return [t(image) for t in self.transforms], label, index


def grayscale(x):
    """ITU-R 601 luma, as torchvision: [B, 3, H, W] -> [B, 1, H, W]."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_hue(x, shift):
    """Rotate the HSV hue of each image by shift[b] turns (torchvision's adjust_hue, batched)."""
    value, _ = x.max(1, keepdim=True)
    chroma = value - x.min(1, keepdim=True)[0]
    r, g, b = x.unbind(1)
    safe = chroma.squeeze(1).clamp_min(1e-12)
    hue = torch.where(value.squeeze(1) == r, ((g - b) / safe) % 6,                 # hue in sextants [0, 6)
                      torch.where(value.squeeze(1) == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = (hue + 6 * shift.view(-1, 1, 1)) % 6
    k = torch.stack([(hue + n) % 6 for n in (5.0, 3.0, 1.0)], 1)  # per output channel R, G, B (no host tensor)
    return value - chroma * torch.clamp(torch.minimum(k, 4 - k), 0, 1)     # HSV -> RGB, channel by channel


def gaussian_blur(x, sigma, kernel_size):
    """Blur each image b with its own sigma[b] (separable kernel, reflect padding)."""
    B, C, H, W = x.shape
    offsets = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, k]
    x = F.pad(x.reshape(1, B * C, H, W), [kernel_size // 2] * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)
    x = F.conv2d(x, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)
    return x.view(B, C, H, W)


def random_crop_boxes(n, height, width, scale, gen, device):
    """torchvision's RandomResizedCrop.get_params (the authors' crop) for n images at once: of 10 draws (area, ratio),
    the first that fits, else the central crop of the nearest allowed ratio; a uniform position. -> (top, left, h, w)"""
    tries = 10
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, device=device, generator=gen))
    log_ratio = math.log(RATIO[0]) + math.log(RATIO[1] / RATIO[0]) * torch.rand(n, tries, device=device, generator=gen)
    w = (area * log_ratio.exp()).sqrt().round()
    h = (area / log_ratio.exp()).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # index of the first draw that fits
    fallback = ((width, round(width / RATIO[0])) if width / height < RATIO[0] else  # (w, h), as torchvision's
                (round(height * RATIO[1]), height) if width / height > RATIO[1] else (width, height))
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback[0])
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback[1])
    top = (torch.rand(n, device=device, generator=gen) * (height - h + 1)).floor()
    left = (torch.rand(n, device=device, generator=gen) * (width - w + 1)).floor()
    top, left = torch.where(found, top, (height - h) // 2), torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def resize_weights(start, length, size, in_size):
    """[n, size, in_size]: the weights with which output pixel o of image b reads input pixels start[b] ... + length[b]
    - 1: PIL's (the authors') antialiased bicubic (a = -0.5), widened by the shrink factor, cut to the crop."""
    scale = (length / size).view(-1, 1, 1)  # input pixels per output pixel
    centre = (torch.arange(size, device=start.device) + 0.5).view(1, -1, 1) * scale
    x = torch.arange(in_size, device=start.device).view(1, 1, -1) - start.view(-1, 1, 1)  # in crop coordinates
    t = (x + 0.5 - centre).abs() / scale.clamp(min=1)
    a = -0.5
    cubic = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                        torch.where(t < 2, a * (((t - 5) * t + 8) * t - 4), 0.0))
    weights = cubic * ((x >= 0) & (x < length.view(-1, 1, 1)))
    return weights / weights.sum(2, keepdim=True)


def resized_crops(images, top, left, h, w, size, flip):
    """Crop image b to (top, left, h, w)[b], resize to size x size, mirror where flip[b]: uint8 -> float in [0, 1], as
    PIL's (the authors') uint8 resize: antialiased bicubic, horizontal pass first, each pass rounded to uint8 levels."""
    rows = resize_weights(top, h, size, images.shape[2])  # [B, size, H]
    cols = resize_weights(left, w, size, images.shape[3])  # [B, size, W]
    cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)
    x = torch.einsum("bchw,btw->bcht", images.float(), cols).round().clamp(0, 255)
    x = torch.einsum("bsh,bcht->bcst", rows, x).round().clamp(0, 255)
    return x / 255


def crops_of_one_size(images, specs, gen, jitter_order=(0, 1, 2, 3)):
    """Views `specs` (one size and crop scale) of a batch in one pass: uint8 [B, 3, H, W] -> float [len(specs) * B, 3,
    size, size] in [0, 1], each sample with its own crop, flip, jitter, grayscale, blur and solarisation at its view's
    probabilities; unlike torchvision's, the order of the four colour jitters is drawn per call, not per image."""
    if images.dtype != torch.uint8:
        raise TypeError(f"crops_of_one_size takes uint8 images with levels 0-255, got {images.dtype} "
                        "(a float batch in [0, 1] would come out nearly black): pass (x * 255).round().to(torch.uint8)")
    spec, k = specs[0], len(specs)  # size, scale and colour recipe are shared; blur and solarisation per view
    images = images.repeat(k, 1, 1, 1)
    B, _, H, W = images.shape  # samples of all k views
    dev = images.device

    def uniform(low, high, n=B):
        return low + (high - low) * torch.rand(n, device=dev, generator=gen)

    def chance(probs):  # one probability per view -> one boolean per sample
        u = torch.rand(len(probs), B // len(probs), device=dev, generator=gen)
        return torch.cat([u[j] < p for j, p in enumerate(probs)]) if len(set(probs)) > 1 else (u < probs[0]).flatten()

    # RandomResizedCrop + horizontal flip, as torchvision's (and the authors' PIL) per image.
    top, left, h, w = random_crop_boxes(B, H, W, spec.scale, gen, dev)
    x = resized_crops(images, top, left, h, w, spec.size, chance([spec.flip_prob]))

    # Colour jitter with probability jitter_prob (factor 1 / shift 0 means "not applied"), in jitter_order.
    jitter = chance([spec.jitter_prob])
    brightness, contrast, saturation = [torch.where(jitter, uniform(1 - s, 1 + s), 1.0).view(B, 1, 1, 1)
                                        for s in spec.jitter[:3]]
    hue = torch.where(jitter, uniform(-spec.jitter[3], spec.jitter[3]), 0.0)
    jitters = [lambda x: (x * brightness).clamp(0, 1),
               lambda x: (contrast * x + (1 - contrast) * grayscale(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1),
               lambda x: (saturation * x + (1 - saturation) * grayscale(x)).clamp(0, 1),
               lambda x: adjust_hue(x, hue)]
    for op in jitter_order:
        x = jitters[op](x)
    x = torch.where(chance([spec.gray_prob]).view(B, 1, 1, 1), grayscale(x).expand_as(x), x)
    if any(s.blur_prob > 0 for s in specs):  # sigma ~ U(0.1, 2) where blurred; a tiny sigma is an exact identity kernel
        sigma = torch.where(chance([s.blur_prob for s in specs]), uniform(*BLUR_SIGMA), 1e-3)
        x = gaussian_blur(x, sigma, blur_kernel_size(spec.size))
    if any(s.solarize_prob > 0 for s in specs):
        x = torch.where(chance([s.solarize_prob for s in specs]).view(B, 1, 1, 1) & (x >= 0.5), 1 - x, x)
    return x.clamp(0, 1)  # the blur's rounding can step 1e-7 outside [0, 1]


def multi_crop(images, specs, seed):
    """All views of a uint8 batch [B, 3, H, W], as specs; those of one size and scale from one crops_of_one_size."""
    gen = torch.Generator(device=images.device).manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)  # jitter order drawn on the host: no device sync
    views = []
    for same_size in runs_of(specs, key=lambda spec: (spec.size, spec.scale)):
        jitter_order = torch.randperm(4, generator=order_gen).tolist()
        views += crops_of_one_size(images, same_size, gen, jitter_order).chunk(len(same_size))
    return views


# ---- Data: uint8 tensors in memory (CIFAR, STL-10, synthetic, small image folders), or files read by workers
class ImageArray(torch.utils.data.Dataset):
    """Images held in memory as one uint8 tensor [N, 3, H, W] with integer labels [N] (-1 = unlabelled)."""

    def __init__(self, images, labels, classes, paths=None):
        self.images, self.labels, self.classes, self.paths = images, labels, list(classes), paths  # paths: of files
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


def make_synthetic(train, size=32):
    """Offline, 10 classes of shape (5 textures x 2 scales; random tint, phase, noise): they survive augmentation."""
    n = 2000 if train else 500
    gen = torch.Generator().manual_seed(1 if train else 2)
    labels = torch.arange(n) % 10
    texture, period = labels // 2, torch.where(labels % 2 == 0, 4.0, 12.0)
    axis = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    freq = (2 * math.pi / period).view(n, 1, 1)
    phase_x, phase_y = (torch.rand(2, n, 1, 1, generator=gen) * 2 * math.pi).unbind(0)
    centre = torch.rand(n, 2, 1, 1, generator=gen) * size
    radius = ((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2).sqrt()
    patterns = torch.stack([
        torch.sin(freq * yy + phase_y),                                   # horizontal stripes
        torch.sin(freq * xx + phase_x),                                   # vertical stripes
        torch.sin(freq * xx + phase_x) * torch.sin(freq * yy + phase_y),  # checkerboard
        torch.sin(freq * radius),                                         # rings
        (torch.sin(freq * (xx + yy) / 1.4 + phase_x).abs()                # cross-hatch
         - torch.sin(freq * (xx - yy) / 1.4 + phase_y).abs()),
    ])[texture, torch.arange(n)]                                          # [n, size, size] in [-1, 1]
    weight = (patterns.unsqueeze(1) + 1) / 2
    # light and dark colours: a random tint of white and black, so that colour is no shortcut
    light = 0.8 + 0.2 * torch.rand(n, 3, 1, 1, generator=gen)
    dark = 0.2 * torch.rand(n, 3, 1, 1, generator=gen)
    images = light * weight + dark * (1 - weight) + 0.05 * torch.randn(n, 3, size, size, generator=gen)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    classes = [f"{t}-p{p}" for t in ("hstripes", "vstripes", "checker", "rings", "crosshatch") for p in (4, 12)]
    return ImageArray(images, labels, classes)


def read_image(path):
    """PIL loader that returns None for an unreadable file instead of raising."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError:
        return None


class ImageFiles(torchvision.datasets.ImageFolder):
    """Every image file under root, at any depth, sorted by path, unlabelled (-1): an ImageFolder with no classes."""

    def find_classes(self, directory):
        return [], {}

    @staticmethod
    def make_dataset(directory, *args, **kwargs):
        extensions = torchvision.datasets.folder.IMG_EXTENSIONS
        files = sorted(Path(directory).rglob("*"))
        return [(str(p), -1) for p in files if p.suffix.lower() in extensions and p.is_file()]


def fit(images, shape, shorter_side):
    """uint8 images [..., 3, H, W] -> [..., 3, *shape]: as they are, or shorter side resized and centre-cropped."""
    if tuple(images.shape[-2:]) == tuple(shape):
        return images
    return v2.functional.center_crop(v2.functional.resize(images, shorter_side, antialias=True), list(shape))


class Indexed(torch.utils.data.Dataset):
    """dataset[i] -> (fit(uint8 image), label, i, whether it was resized), or None for an unreadable file."""

    def __init__(self, dataset, shape, shorter_side):
        self.dataset, self.shape, self.shorter_side = dataset, tuple(shape), shorter_side

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        if image is None:
            return None
        image = v2.functional.pil_to_tensor(image)
        return fit(image, self.shape, self.shorter_side), label, index, tuple(image.shape[-2:]) != self.shape


def collate_readable(batch):
    """collate_fn of Indexed: readable items stacked (None if none); one tensor per batch: thousands of small ones
    from workers run out of file descriptors ("received 0 items of ancdata")."""
    readable = [item for item in batch if item is not None]
    if not readable:
        return None
    images, *rest = zip(*readable)
    return [torch.stack(images)] + [torch.tensor(column) for column in rest]


def say_skipped(root, skipped, total):
    """One line on stderr naming the unreadable files skipped (the first few of them); returns it."""
    names = ", ".join(str(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    line = f"{root}: skipped {len(skipped)} unreadable image(s) of {total}: {names}"
    if skipped and rank() == 0:
        print(line, file=sys.stderr, flush=True)
    return line


def image_sizes(folder, samples=256):
    """(width, height) of up to `samples` files spread over the folder, from their headers (no decoding)."""
    from PIL import Image
    sizes = []
    for path, _ in folder.samples[::max(1, len(folder.samples) // samples)]:
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except OSError:
            pass
    return sizes


def load_image_folder(root, in_memory_max_size, workers, labelled=True):
    """ImageFolder (labelled) or ImageFiles; small images decoded once into an ImageArray at the size most have
    (others resized and centre-cropped, said in one line), unreadable files left out and listed in .skipped."""
    if not Path(root).is_dir():
        raise UserError(f"cannot read image folder {root}: it does not exist")
    try:
        folder = (torchvision.datasets.ImageFolder if labelled else ImageFiles)(root, loader=read_image)
    except (FileNotFoundError, OSError) as error:
        raise UserError(f"cannot read image folder {root}: {str(error).splitlines()[0]}") from None
    if labelled and len(folder.classes) < 2:
        raise UserError(f"image folder {root} has {len(folder.classes)} class folder(s); it needs at least 2 "
                        "(DIR/<class>/*.jpg)")
    if not folder.samples:
        raise UserError(f"cannot read image folder {root}: no image files in it at any depth")
    sizes = image_sizes(folder)
    if not sizes:
        raise UserError(f"no readable image in {root}")
    if max(max(size) for size in sizes) > in_memory_max_size:
        folder.skipped = []
        return folder
    width, height = max(set(sizes), key=sizes.count)  # the size most images have
    loader = torch.utils.data.DataLoader(Indexed(folder, (height, width), min(height, width)), batch_size=256,
                                         num_workers=workers, collate_fn=collate_readable)
    batches, progress = [], Progress(f"decoding {root}", len(folder), "images")
    for done, batch in enumerate(loader, 1):
        batches += [batch] if batch is not None else []
        progress(min(len(folder), 256 * done))
    if not batches:
        raise UserError(f"no readable image in {root}")
    images, labels, indices, resized = (torch.cat(column) for column in zip(*batches))
    if resized.any() and rank() == 0:
        print(f"{root}: {int(resized.sum())} image(s) not of the most common size {width}x{height} were resized "
              "(shorter side) and centre-cropped to it", file=sys.stderr, flush=True)
    kept = indices.tolist()
    array = ImageArray(images, labels, folder.classes, [folder.samples[i][0] for i in kept])
    readable = set(kept)
    array.skipped = [path for i, (path, _) in enumerate(folder.samples) if i not in readable]
    return array


def load_split(cfg, train):
    """A split of cfg.dataset (None: a folder without test/ or val/; without train/, all its images, unlabelled)."""
    root = Path(cfg.data)
    if cfg.dataset == "synthetic":
        return make_synthetic(train)
    if cfg.dataset == "imagefolder" and not (root / "train").is_dir():  # one's own images: no labels, no split
        return load_image_folder(root, cfg.in_memory_max_size, cfg.workers, labelled=False) if train else None
    if cfg.dataset == "imagefolder":
        split = root / "train" if train else next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
        return split and load_image_folder(split, cfg.in_memory_max_size, cfg.workers)
    try:
        if cfg.dataset == "stl10":
            ds = torchvision.datasets.STL10(root, split="train+unlabeled" if train else "test", download=cfg.download)
            return ImageArray(torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long(), ds.classes)
        cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        ds = cls(root, train=train, download=cfg.download)
    except RuntimeError as error:
        raise UserError(f"{cfg.dataset} not found in {root} ({str(error).splitlines()[0]}); "
                        f"pass --download, or --data DIR pointing at an existing copy") from None
    return ImageArray(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes)


class Progress:
    """A line on stderr every `every` seconds of a long step: done/total and a rate (rank 0; short steps: none)."""

    def __init__(self, what, total, unit, every=5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.start = self.last = time.time()

    def __call__(self, done):
        now = time.time()
        if now - self.last >= self.every or (done >= self.total and now - self.start >= self.every):
            self.last = now
            if rank() == 0:
                rate = done / (now - self.start)
                print(f"{self.what}: {done}/{self.total} {self.unit} ({rate:.0f}/s)", file=sys.stderr, flush=True)


# ---- Distributed helpers: every collective is a no-op at world size 1, so CPU, one GPU and tests need no launcher.
def broadcast_from_main(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if world_size() == 1:
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def all_reduce_sum(x):
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def any_rank(flag, device):
    """Whether flag holds on any rank, on every rank: a collective, so every rank calls it at the same step."""
    return bool(flag) if world_size() == 1 else bool(all_reduce_sum(torch.tensor([float(bool(flag))], device=device)))


def bn_process_group(group_size):
    """This rank's BatchNorm group: group_size consecutive ranks (None: all), as the authors' apex; a collective."""
    if group_size in (0, world_size()):
        return None
    if world_size() % group_size:
        raise UserError(f"--bn-group-size {group_size} does not divide the {world_size()} ranks into equal groups")
    return dist.new_subgroups(group_size)[0]


def sync_batchnorm(model, device, group_size=0):
    """nn.SyncBatchNorm over the group of ranks; it needs GPUs: CPU processes normalise their own batch, said once."""
    group = bn_process_group(group_size)
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    if rank() == 0:
        print(f"{world_size()} processes on the CPU: each BatchNorm normalises its own process's batch")
    return model


def setup_distributed(device_choice):
    """Read RANK / WORLD_SIZE / LOCAL_RANK set by torchrun (none = one process); return the device."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is visible")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ---- Checkpoints: one file, written atomically, read as data; the authors' released checkpoints load as ours
MODEL_KEYS = ("arch", "stem", "hidden_dim", "embed_dim", "num_classes")
RUN_KEYS = ("dataset", "data", "batch_size", "world_size", "epochs", "minutes", "warmup_epochs", "lr", "warmup_lr",
            "final_lr", "optimizer", "lars_exclude_1d", "queue_len")  # a run's data, schedule and the layout of its
                                                                      # optimizer and queue: with others, another run's


def save_checkpoint(path, state):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


def strip_prefixes(state_dict):
    """Remove 'module.' (DDP) and '_orig_mod.' (torch.compile) wherever they appear in the keys."""
    return {k.replace("module.", "").replace("_orig_mod.", ""): v for k, v in state_dict.items()}


class AuthorsQueue:
    """Inert stand-in for the queue (their utils.NNQueue) that the authors pickle into checkpoints: data, unused."""


# the two globals the authors' files need beyond weights_only's tensors (read off their train.py's save_checkpoint)
AUTHORS_GLOBALS = [argparse.Namespace, (AuthorsQueue, "utils.NNQueue")]


def from_authors_checkpoint(state):
    """The authors' released checkpoint as one of ours: module.backbone.*, module.mlp_head.mlp.{0,1,3}.* and
    module.cls_{i}.weight_g / weight_v (old-style weight norm) renamed, the config read off the shapes, the ImageNet
    mean and std. ValueError when the projection or the backbone is not this project's."""
    weights = dict(pixel_mean=torch.tensor(IMAGENET_MEAN_STD[0]).view(1, 3, 1, 1),
                   pixel_std=torch.tensor(IMAGENET_MEAN_STD[1]).view(1, 3, 1, 1))
    projection_layers = set()
    for key, value in state["state_dict"].items():
        key = key.removeprefix("module.")  # their DistributedDataParallel's
        head = re.fullmatch(r"cls_(\d+)\.weight_([gv])", key)
        if key.startswith("backbone.") and not key.startswith("backbone.fc."):
            weights[key] = value
        elif key.startswith("mlp_head.mlp."):
            projection_layers.add(int(key.split(".")[2]))
            weights["projector." + key.removeprefix("mlp_head.mlp.")] = value
        elif head:
            weights[f"heads.{head[1]}.parametrizations.weight.original{dict(g=0, v=1)[head[2]]}"] = value
    args = vars(state["args"]) if hasattr(state.get("args"), "__dict__") else state.get("args") or {}
    if projection_layers != {0, 1, 3} or args.get("no_leaky"):
        raise ValueError(f"this model's projection is Linear-BatchNorm-LeakyReLU-Linear (the authors' "
                         f"--num-hidden 2 --use-bn); this checkpoint's has layers {sorted(projection_layers)}")
    layer3 = {k.split(".")[2] for k in weights if k.startswith("backbone.layer3.")}
    arch = {2: "resnet18", 6: "resnet34"}.get(len(layer3))
    arch = "resnet50" if "backbone.layer1.0.conv3.weight" in weights else arch
    if arch is None or "backbone.conv1.weight" not in weights:
        raise ValueError("the backbone is not a torchvision ResNet-18/34/50")
    heads = sorted(int(k.split(".")[1]) for k in weights if k.startswith("heads.") and k.endswith("original1"))
    config = dict(arch=arch, stem="imagenet" if weights["backbone.conv1.weight"].shape[-1] == 7 else "cifar",
                  global_size=224, dataset="imagefolder", hidden_dim=weights["projector.0.weight"].shape[0],
                  embed_dim=weights["projector.3.weight"].shape[0],
                  num_classes=[weights[f"heads.{i}.parametrizations.weight.original1"].shape[0] for i in heads])
    return dict(model=weights, config=config, step=0, source="authors")


def load_torch_file(path, what="checkpoint", allowed=()):
    """torch.load as data (tensors, numbers, strings, lists, dicts, `allowed`), or a UserError naming the cause."""
    if not Path(path).is_file():
        raise UserError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise UserError(f"{what} {path} is empty (0 bytes)")
    if not head.startswith(b"PK\x03\x04") and head[:1] != b"\x80":  # torch.save's zip archive, or its older pickle
        raise UserError(f"{what} {path} is not a PyTorch file")
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(error))
        if wanted:  # refused before anything in the file ran
            raise UserError(f"{what} {path} wants to load {wanted[1]}: not a checkpoint this program reads") from None
        raise UserError(f"{what} {path} is truncated or corrupted ({one_line(error)})") from None


def load_checkpoint(path):
    """Our checkpoint, or the authors' (keys 'state_dict' with 'mlp_head.'), loaded onto the CPU; else UserError."""
    state = load_torch_file(path, "checkpoint", AUTHORS_GLOBALS)
    if isinstance(state, dict) and any("mlp_head." in k for k in state.get("state_dict") or {}):
        try:
            return from_authors_checkpoint(state)
        except ValueError as error:
            raise UserError(f"{path}: {error}") from None
    if not isinstance(state, dict) or not {"model", "config"} <= set(state):
        raise UserError(f"{path} is not a Self-Classifier checkpoint (no 'model' and 'config' entries)")
    return state


def config_from_checkpoint(state, **overrides):
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{**{k: v for k, v in state["config"].items() if k in known}, **overrides})


def model_from_checkpoint(state):
    """Rebuild the model a checkpoint was trained with and load its weights."""
    cfg = config_from_checkpoint(state)
    model = build_model(cfg)
    model.load_state_dict(strip_prefixes(state["model"]))
    return model, cfg


# ---- Monitors: collapse (every log line, from the training batches) and the test split (at epoch ends)
class CollapseMonitor:
    """Per head, the epoch's class counts (over ranks) of views[1], which the queue never replaces (as the authors)."""

    def __init__(self, num_classes, device):
        self.counts = [torch.zeros(c, dtype=torch.long, device=device) for c in num_classes]
        self.last_batch = [torch.zeros(c, dtype=torch.long, device=device) for c in num_classes]
        self.classes = [torch.arange(c, device=device) for c in num_classes]

    def update(self, head_logits):
        for head, view_logits in enumerate(head_logits):
            # not torch.bincount: on a GPU it reads the largest class back to the host, a sync every step
            self.last_batch[head] = (view_logits[1].argmax(1)[:, None] == self.classes[head]).sum(0)
            self.counts[head] += self.last_batch[head]

    def summary(self):
        """{C: classes used in the last batch and in the epoch so far, entropy of the class sizes, ln C (its max)}."""
        out = {}
        for batch, counts in zip(self.last_batch, self.counts):
            batch, counts = all_reduce_sum(batch.clone()), all_reduce_sum(counts.clone())
            p = counts.double() / counts.sum().clamp_min(1)
            out[len(counts)] = dict(batch_classes=int((batch > 0).sum()), epoch_classes=int((counts > 0).sum()),
                                    entropy=float(-(p[p > 0] * p[p > 0].log()).sum()), log_c=math.log(len(counts)))
        return out


def test_split_monitors(run, epoch, heads, knn, logged=True):
    """On rank 0, the due test-split monitors (heads: NMI / ACC; knn: kNN top-1) by train's monitor, each logged."""
    if not (heads or knn) or not run.is_main or not run.eval_labelled or run.monitor is None:
        return
    for record, line in run.monitor(run.raw_model, run.train_set, run.eval_set, run.cfg, run.device, run.dtype,
                                    heads, knn):
        if logged:
            log(run, dict(record, epoch=epoch, step=run.step), f"epoch {epoch} {line}")


# ---- Training loop
BUDGET_MARGIN = 0.03   # --minutes: the share of the budget kept free for the exit and the start-up's variation
PACE_MARGIN = 0.05     # --minutes: and the share of the remaining training time, for the pace's variation
PACE_WARMUP_STEPS = 5  # --minutes: steps not timed (cuDNN autotuning, allocator, first batches) ...
PACE_STEPS = 10        # ... then the steps timed; the budget is planned after them


class Batches:
    """An epoch's batches for this rank, (views, labels [B], indices [B]) on the device, in DistributedSampler's
    order; augmentation seeded by (run seed, epoch, sample or step): resumed at any step, the same batches."""

    def __init__(self, dataset, cfg, specs, device, epoch, start_step, steps):
        sampler = torch.utils.data.DistributedSampler(range(len(dataset)), num_replicas=world_size(), rank=rank(),
                                                      shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))[:steps * cfg.batch_size].view(steps, cfg.batch_size)
        self.start, self.steps, self.device, self.specs = start_step, steps, device, specs
        self.seed = (cfg.seed, epoch, rank())
        self.on_device = use_batch_aug(cfg, dataset)
        if self.on_device:
            self.images, self.labels = dataset.images, dataset.labels  # already on the device (load_data)
            self.order = order.to(device)  # one copy per epoch, not one per step
        else:
            epoch_seed = derive_seed(cfg.seed, epoch)
            keys = [(i, epoch_seed) for i in order[start_step:].flatten().tolist()]
            self.loader = torch.utils.data.DataLoader(
                PerImageViews(dataset, specs), batch_size=cfg.batch_size, sampler=keys, drop_last=True,
                num_workers=cfg.workers, pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None)

    def __iter__(self):
        if self.on_device:
            for step in range(self.start, self.steps):
                index = self.order[step]
                views = multi_crop(self.images[index], self.specs, derive_seed(*self.seed, step))
                yield views, self.labels[index], index
        else:
            for views, labels, index in self.loader:
                yield ([v.to(self.device, non_blocking=True) for v in views],
                       labels.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True))


def derive_seed(*numbers):
    return int(np.random.SeedSequence([int(n) % 2**32 for n in numbers]).generate_state(1)[0])


def use_batch_aug(cfg, dataset):
    return cfg.batch_aug == "auto" and isinstance(dataset, ImageArray)


def autocast_dtype(precision, device):
    """--precision as an autocast dtype (None: fp32); auto: bf16 from Ampere (8.0), fp16 before, fp32 on the CPU."""
    if precision == "auto":
        precision = ("fp32" if device.type != "cuda" else
                     "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def build_training(cfg, device, train_set):
    """(model, raw_model, optimizer, scaler, queue, dtype); inputs normalised by the training images' statistics."""
    if isinstance(train_set, ImageArray):
        pixels = train_set.images[:10000].float() / 255
        mean_std = pixels.mean((0, 2, 3)).tolist(), pixels.std((0, 2, 3)).tolist()
    else:
        mean_std = IMAGENET_MEAN_STD
    model = raw_model = build_model(cfg, *mean_std).to(device)
    if world_size() > 1:
        model = raw_model = sync_batchnorm(model, device, cfg.bn_group_size)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN keeps its fastest kernels (as the authors)
    optimizer = build_optimizer(model, cfg)
    queue = NeighbourQueue(cfg.queue_len, cfg.embed_dim).to(device) if cfg.queue_len else None
    dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if cfg.compile:
        model.backbone = torch.compile(model.backbone)
    if world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, raw_model, optimizer, scaler, queue, dtype


def log(run, record, line):
    """A record in OUT_DIR/log.jsonl and, unless line is None, a line on the screen (rank 0)."""
    if run.is_main:
        if line is not None:
            print(line, flush=True)
        run.log_file.write(json.dumps(record) + "\n")
        run.log_file.flush()


def start_run(cfg, started):
    """Everything a run holds (device, data, model, optimiser, log file, step, schedule), resumed if it can be."""
    device = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed + rank())
    run = types.SimpleNamespace(cfg=cfg, device=device, started=started, is_main=rank() == 0, log_file=None,
                                out_dir=Path(cfg.out_dir), step=0, schedule=None, overhead=0.0, pending_losses=[],
                                interval_losses=[], pace_start=None)
    run.ckpt_path = run.out_dir / "ckpt.pt"
    try:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        run.log_file = open(run.out_dir / "log.jsonl", "a") if run.is_main else None
    except OSError as error:
        raise UserError(f"cannot write to --out-dir {run.out_dir}: {error.strerror}") from None
    state, path, own = find_checkpoint(cfg, run.ckpt_path)  # refused before the data is loaded: another run's
    load_data(run)
    run.model, run.raw_model, run.optimizer, run.scaler, run.queue, run.dtype = build_training(cfg, device,
                                                                                                run.train_set)
    if state:
        resume(run, state, path, own)
    if run.schedule is None and not cfg.minutes:
        run.schedule = dict(total_steps=cfg.epochs * run.steps_per_epoch)
    run.first_step = run.saved_step = run.step
    run.last_save_time = time.time()
    return run


def load_data(run):
    cfg = run.cfg
    run.global_batch = cfg.batch_size * world_size()
    if cfg.queue_len and run.global_batch >= cfg.queue_len:  # push would write several rows to one slot
        raise UserError(f"--queue-len {cfg.queue_len} must exceed the global batch of {run.global_batch} images "
                        "(the authors' queue holds 64 of their batches)")
    run.train_set, run.eval_set = load_split(cfg, train=True), load_split(cfg, train=False)
    run.specs = view_specs(cfg)
    for split in (run.train_set, run.eval_set):
        if getattr(split, "skipped", None):  # every path in the log, the first few on the screen
            log(run, dict(event="skipped", paths=split.skipped), None)
            say_skipped(cfg.data, split.skipped, len(split) + len(split.skipped))
    if use_batch_aug(cfg, run.train_set):  # the whole uint8 dataset lives on the device: no loader, no copies
        run.train_set.images = run.train_set.images.to(run.device)
        run.train_set.labels = run.train_set.labels.to(run.device)
    run.steps_per_epoch = len(run.train_set) // run.global_batch
    if run.steps_per_epoch == 0:
        raise UserError(f"{len(run.train_set)} training images are fewer than one global batch of {run.global_batch}")
    if run.global_batch < min(cfg.num_classes):  # over-clustering heads may exceed it: the paper's 8000 with 4096
        log(run, dict(event="small_batch"), f"note: global batch {run.global_batch} < smallest head C="
            f"{min(cfg.num_classes)}: the uniform prior asks every class for N/C samples of a batch, which needs many")
    run.eval_labelled = run.eval_set is not None and all(label >= 0 for label in run.eval_set.targets)
    run.labelled_train = sum(label >= 0 for label in getattr(run.train_set, "targets", []))
    if not run.eval_labelled and (cfg.eval_every or cfg.knn_every):
        log(run, dict(event="no_monitors"), f"no labelled evaluation split in {cfg.data}: the test-split NMI/ACC and "
            "kNN monitors are skipped (the loss and collapse monitors stay; labels are never needed to train)")


def find_checkpoint(cfg, ckpt_path):
    """-> (state, path, own): OUT_DIR/ckpt.pt (own), else --resume FILE, else Nones; another run's is refused."""
    own = ckpt_path.exists()
    path = ckpt_path if own else Path(cfg.resume) if cfg.resume else None
    if path is None:
        return None, None, False
    state = load_checkpoint(path)
    # settings of older checkpoints that lack a field: its default
    saved = {**dataclasses.asdict(Config()), **state["config"], "world_size": state.get("world_size", 1)}
    now = dict(dataclasses.asdict(cfg), world_size=world_size())
    keys = MODEL_KEYS + (RUN_KEYS if own else ())  # --resume FILE: a new run from another's weights
    changed = [k for k in keys if saved[k] != now[k] and not (k == "data" and cfg.dataset == "synthetic")]
    if changed:
        raise UserError(f"checkpoint {path} was trained with " + ", ".join(f"{k}={saved[k]}" for k in changed)
                        + "; this run asks for " + ", ".join(f"{k}={now[k]}" for k in changed)
                        + " (use another --out-dir or the same settings)")
    return state, path, own


def resume(run, state, path, own):
    """The weights; optimizer, scaler, queue, step and schedule only when continuing this run's own checkpoint."""
    run.raw_model.load_state_dict(strip_prefixes(state["model"]))
    if not own:
        whose = "the authors' checkpoint" if state.get("source") == "authors" else "checkpoint"
        log(run, dict(event="init", source=str(path)), f"started from the weights of {whose} {path}; optimizer, "
            "schedule, queue and step start afresh")
        return
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    if run.queue is not None and state.get("queue"):
        run.queue.load_state_dict(state["queue"])
    run.step, run.schedule = state["step"], state.get("schedule")
    log(run, dict(event="resume", step=run.step), f"resumed from {path} at step {run.step}")


def budget_monitors(run):
    """(heads, kNN): the test-split monitors a budgeted run ends with."""
    cfg, wanted = run.cfg, run.monitor is not None and run.eval_labelled
    return wanted and cfg.eval_every != 0, wanted and cfg.knn_every != 0 and run.labelled_train > 0


def monitors_due(run, epoch):
    """(heads, kNN) monitors due after this epoch: every --eval-every / --knn-every epochs, and at the end."""
    cfg, final = run.cfg, run.step == total_steps(run)
    if cfg.minutes:
        return tuple(final and due for due in budget_monitors(run))
    knn_default = 10 if 0 < run.labelled_train <= 100_000 else 0
    every = (1 if cfg.eval_every < 0 else cfg.eval_every, knn_default if cfg.knn_every < 0 else cfg.knn_every)
    return tuple(bool(e) and ((epoch + 1) % e == 0 or final) for e in every)


def total_steps(run):  # before a budget is planned: the provisional --epochs
    return run.schedule["total_steps"] if run.schedule else run.cfg.epochs * run.steps_per_epoch


def last_step(run):
    return min(total_steps(run), run.cfg.max_steps) if run.cfg.max_steps else total_steps(run)


def check_losses(run):
    """The losses since the last check to the host at once (no sync per step), for the next log line; NaN stops."""
    values = torch.stack([loss for _, loss in run.pending_losses]).tolist() if run.pending_losses else []
    for (step, _), value in zip(run.pending_losses, values):
        if not math.isfinite(value):
            raise UserError(f"loss is {value} at step {step}; stopping. {run.ckpt_path} (step {run.saved_step}) is "
                            "left as it was: lower --lr, or use --precision bf16/fp32 instead of fp16")
    run.pending_losses.clear()
    run.interval_losses += values


def save(run):
    check_losses(run)
    if run.is_main:
        save_checkpoint(run.ckpt_path, dict(
            model=strip_prefixes(run.raw_model.state_dict()), optimizer=run.optimizer.state_dict(),
            scaler=run.scaler.state_dict(), queue=run.queue.state_dict() if run.queue else None, step=run.step,
            schedule=run.schedule, world_size=world_size(), config=dataclasses.asdict(run.cfg)))
    run.saved_step, run.last_save_time = run.step, time.time()


def timed(run, action, *args):
    """action(run, *args) (a checkpoint, the monitors); its seconds, also counted as run.overhead: not steps (pace)."""
    started = time.time()
    action(run, *args)
    seconds = time.time() - started
    run.overhead += seconds
    return seconds


def train(cfg, started=None, monitor=None):
    """Train (or resume) the run cfg describes; returns the unwrapped model. started: the budget's clock (now).
    monitor: eval_clustering.monitor_test_split, the test-split monitors (None: the loss and collapse ones only)."""
    run = start_run(cfg, started or time.time())
    run.monitor = monitor
    config = dataclasses.asdict(cfg)
    log(run, dict(event="config", config=config, world_size=world_size()), f"config: {json.dumps(config)}\n"
        f"{len(run.train_set)} training images, {run.steps_per_epoch} steps per epoch of {run.global_batch} images, "
        f"{len(run.specs)} views, {world_size()} process(es) on {run.device}")
    if run.step >= last_step(run):
        log(run, dict(event="finished", step=run.step), f"already trained {run.step // run.steps_per_epoch} epochs "
            f"({run.step} steps) in {run.out_dir}; nothing to do — use another --out-dir to train again")
    interrupted = []  # Ctrl-C or SIGTERM (a job's time limit) finishes the step, saves a checkpoint, then exits
    previous = {s: signal.signal(s, lambda n, _: interrupted.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while run.step < last_step(run):
            train_epoch(run, run.step // run.steps_per_epoch, interrupted)
        ckpt = shlex.quote(str(run.ckpt_path))
        after = "" if run.eval_labelled else f" --predict {shlex.quote(cfg.data)} --grid-dir grids"
        memory = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
        log(run, dict(event="done", step=run.step, checkpoint=str(run.ckpt_path), max_gpu_memory_gib=memory),
            f"done: {run.ckpt_path} (step {run.step}" + (f", {memory:.1f} GiB of GPU memory" if memory else "")
            + f"); next: python eval_clustering.py --checkpoint {ckpt}{after}")
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory with {cfg.batch_size} images per GPU and {len(run.specs)} views; "
                        f"try a smaller --batch-size (or fewer --local-crops)") from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if run.log_file:
            run.log_file.close()
    return run.raw_model


def train_epoch(run, epoch, interrupted):
    """The steps of one epoch (or up to the last step), then a checkpoint and the due test-split monitors."""
    cfg, spe = run.cfg, run.steps_per_epoch
    monitor = CollapseMonitor(cfg.num_classes, run.device)
    batches = iter(Batches(run.train_set, cfg, run.specs, run.device, epoch, run.step % spe, spe))
    interval = dict(start=time.time(), wait=0.0, images=0, agree=[])
    warmup_steps = round(cfg.warmup_epochs * spe)
    while run.step < last_step(run) and run.step // spe == epoch:
        started = time.time()
        views, labels, index = next(batches)
        interval["wait"] += time.time() - started
        lr = lr_at(run.step, total_steps(run), warmup_steps, cfg.lr, cfg.warmup_lr, cfg.final_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        swap = run.step >= cfg.queue_start * total_steps(run)
        loss, head_logits, agree = train_step(run.model, run.raw_model, run.optimizer, run.scaler, views, labels,
                                              index, run.queue, cfg, run.dtype, neighbour_swap=swap)
        interval["agree"] += [agree] if agree is not None else []
        monitor.update(head_logits)  # argmaxes only: no gradient to detach
        run.pending_losses.append((run.step, loss))
        run.step += 1
        interval["images"] += run.global_batch
        steps_run = run.step - run.first_step  # by this process; 1, 2, 4, ... log early (the same on every rank)
        early = steps_run < cfg.log_every and (steps_run & (steps_run - 1)) == 0
        if early or run.step % cfg.log_every == 0 or run.step == last_step(run) or run.step % spe == 0:
            log_interval(run, epoch, lr, monitor, interval)
            interval = dict(start=time.time(), wait=0.0, images=0, agree=[])
        if time.time() - run.last_save_time > 60 * cfg.save_every_min:
            timed(run, save)
        if world_size() == 1 or run.step % cfg.log_every == 0:  # DDP: a sync
            stop_if_interrupted(run, interrupted)
        if cfg.minutes and run.schedule is None:
            pace(run, steps_run, warmup_steps)
    stop_if_interrupted(run, interrupted)  # not on into the monitors
    timed(run, save)
    if run.step % spe == 0 or run.step == total_steps(run):
        timed(run, test_split_monitors, epoch, *monitors_due(run, epoch))


def stop_if_interrupted(run, interrupted):
    """After Ctrl-C or SIGTERM on any rank: a checkpoint, then exit 128 + the signal's number (130, 143)."""
    if any_rank(interrupted, run.device):
        save(run)
        log(run, dict(event="interrupted", step=run.step), f"interrupted: saved {run.ckpt_path} at step {run.step}")
        raise SystemExit(128 + (interrupted or [signal.SIGINT])[0])


def log_interval(run, epoch, lr, monitor, interval):
    check_losses(run)
    losses, run.interval_losses = run.interval_losses, []
    loss_mean = all_reduce_sum(torch.tensor([sum(losses) / len(losses)], device=run.device)) / world_size()
    elapsed = time.time() - interval["start"]
    record = dict(event="train", epoch=epoch, step=run.step, loss=float(loss_mean), lr=lr,  # mean over ranks
                  images_per_s=interval["images"] / elapsed, data_wait=interval["wait"] / elapsed,
                  heads=monitor.summary())
    same_label, labelled = torch.stack(interval["agree"]).sum(0).tolist() if interval["agree"] else (0, 0)
    if labelled:
        record["nn_label_agreement"] = same_label / labelled
    heads = " ".join(f"C{c}: {h['epoch_classes']}/{c} used (batch {h['batch_classes']}), H {h['entropy']:.2f}/"
                     f"{h['log_c']:.2f}" for c, h in record["heads"].items())
    log(run, record, f"epoch {epoch} step {run.step}/{total_steps(run)} loss {record['loss']:.4f} lr {lr:.4g} "
        f"{record['images_per_s']:.0f} img/s data-wait {100 * record['data_wait']:.0f}% | {heads}"
        + (f" | NN same label {record['nn_label_agreement']:.2f}" if labelled else ""))


def pace(run, steps_run, warmup_steps):
    """--minutes: time PACE_STEPS steps after PACE_WARMUP_STEPS (not the overhead), then plan, the same on all ranks."""
    if steps_run in (PACE_WARMUP_STEPS, PACE_WARMUP_STEPS + PACE_STEPS) and run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # the host may run ahead of the device by a step
    if steps_run == PACE_WARMUP_STEPS:
        run.pace_start = (time.time(), run.overhead)
    elif steps_run == PACE_WARMUP_STEPS + PACE_STEPS:
        seconds = time.time() - run.pace_start[0] - (run.overhead - run.pace_start[1])
        plan_budget(run, seconds / PACE_STEPS, warmup_steps)


def plan_budget(run, step_time, warmup_steps):
    """Fix the schedule's length so that its steps, a checkpoint per epoch and the final monitors end inside the
    budget, from the step time, one timed checkpoint and one timed heads pass (kNN: that per image). Rank 0's plan."""
    cfg, spe, budget = run.cfg, run.steps_per_epoch, 60 * run.cfg.minutes
    heads, knn = budget_monitors(run)
    if cfg.compile:  # the first pass in eval mode compiles the backbone again: not a cost of the final monitors
        test_split_monitors(run, run.step // spe, heads or knn, False, logged=False)
    costs = dict(checkpoint=timed(run, save),
                 heads=timed(run, test_split_monitors, run.step // spe, heads or knn, False))
    costs["knn"] = costs["heads"] * (len(run.train_set) + len(run.eval_set)) / len(run.eval_set) if knn else 0.0
    final = costs["checkpoint"] + costs["heads"] * heads + costs["knn"]
    remaining = budget * (1 - BUDGET_MARGIN) - (time.time() - run.started) - final
    total = run.step + max(1, int(spe * remaining / ((spe * step_time + costs["checkpoint"]) * (1 + PACE_MARGIN))))
    run.schedule = broadcast_from_main(dict(total_steps=total))
    record = dict(event="budget", minutes=cfg.minutes, images_per_s=run.global_batch / step_time, epochs=total / spe,
                  seconds_per_step=step_time, costs=costs, planned_at_step=run.step,
                  elapsed=time.time() - run.started, total_steps=total)
    log(run, record, f"budget {cfg.minutes:g} min: {record['images_per_s']:,.0f} img/s measured, {total / spe:.1f} "
        f"epochs ({total:,} steps), a checkpoint per epoch ({costs['checkpoint']:.2f} s), the test-split monitors "
        f"after the last step ({costs['heads'] * heads + costs['knn']:.1f} s)")
    if total <= warmup_steps:
        log(run, dict(event="short_budget"), f"note: the budget allows {total} steps, no more than the {warmup_steps} "
            "warmup steps: the cosine never starts; lower --warmup-epochs or raise --minutes")


def main(argv=None):
    started = time.time()  # the clock of --minutes
    cfg = parse_config(argv)
    sys.modules.setdefault("selfclassifier", sys.modules[__name__])  # run as a script: one copy of this module
    try:
        from eval_clustering import monitor_test_split
    except ImportError as error:  # this file copied alone, or scipy missing
        monitor_test_split = None
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"cannot import eval_clustering: {error}; the test-split monitors are skipped")
    try:
        train(cfg, started, monitor_test_split)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)  # 2: argparse's, for the command line
    except KeyboardInterrupt:  # before training started (afterwards Ctrl-C saves a checkpoint and exits 130)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
