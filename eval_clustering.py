"""Clustering metrics, k-means, weighted kNN and a linear probe on frozen features, and a command line that
scores a checkpoint.

    python eval_clustering.py --checkpoint out/ckpt.pt          # every head, k-means baselines, kNN, linear probe
    python eval_clustering.py --checkpoint out/ckpt.pt --json scores.json --grid-dir grids
    python eval_clustering.py --arch resnet50 --weights r50.pth --dataset imagefolder --data DIR   # baselines only
    python eval_clustering.py --checkpoint out/ckpt.pt --predict photos/ --out classes.csv   # a class per image

Metrics are scikit-learn's (numpy and scipy only; cluster_metrics says which); ACC is the accuracy after the best
one-to-one matching of clusters to classes (Hungarian algorithm). This file builds on selfclassifier.py (the model,
the data); its metrics, k-means and probes use none of it.
selfclassifier.py's main() borrows monitor_test_split for the training's test-split monitors.
"""
import argparse
import csv
import html
import json
import math
import os
import re
import shutil
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

import selfclassifier as sc

# CIFAR-100 fine label (alphabetical class index) -> one of its 20 superclasses, from the dataset's own
# "coarse_labels"; the clustering literature scores CIFAR-100 against these 20 classes.
CIFAR100_SUPERCLASS = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13])


# ---- Metrics
def check_labels(y_true, y_pred):
    """Validate two labelings; return them as int64 arrays or raise ValueError with a one-line reason."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_pred.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shapes {y_true.shape} and {y_pred.shape}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no labels: y_true and y_pred are empty")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
            raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    return y_true.astype(np.int64), y_pred.astype(np.int64)


def contingency_matrix(y_true, y_pred):
    """Counts [classes, clusters] of samples per (true class, predicted cluster); labels may be any integers."""
    classes, true_idx = np.unique(y_true, return_inverse=True)
    clusters, pred_idx = np.unique(y_pred, return_inverse=True)
    flat = np.bincount(true_idx * len(clusters) + pred_idx, minlength=len(classes) * len(clusters))
    return flat.reshape(len(classes), len(clusters))


def entropy(counts):
    """Shannon entropy (nats) of the distribution given by counts."""
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_info(contingency):
    """Mutual information (nats) of the two labelings behind a contingency matrix."""
    n = contingency.sum()
    nz = contingency[contingency > 0].astype(np.float64)
    row, col = np.nonzero(contingency)
    a, b = contingency.sum(1)[row].astype(np.float64), contingency.sum(0)[col].astype(np.float64)
    terms = nz / n * (np.log(nz * n) - np.log(a * b))
    terms[np.abs(terms) < np.finfo(np.float64).eps] = 0.0  # as scikit-learn: drop rounding noise per term
    return max(0.0, float(terms.sum()))


def expected_mutual_info(a, b, n, max_terms=1 << 22):
    """E[MI] of two random labelings with row sums a and column sums b (hypergeometric model, Vinh et al. 2010),
    exact as scikit-learn's expected_mutual_information, in vectorised numpy.

    The sum runs over cells (i, j) and values n_ij in [max(1, a_i + b_j - n), min(a_i, b_j)]. A cell's terms
    depend only on (a_i, b_j), so cells are grouped by distinct (a, b) pairs and weighted by their multiplicity:
    class sizes take at most ~sqrt(2n) distinct values, which bounds the work whatever the number of clusters.
    """
    a_vals, a_mult = np.unique(np.asarray(a), return_counts=True)
    b_vals, b_mult = np.unique(np.asarray(b), return_counts=True)
    A, B = (v.ravel().astype(np.float64) for v in np.meshgrid(a_vals, b_vals, indexing="ij"))
    weight = np.outer(a_mult, b_mult).ravel().astype(np.float64)
    lo = np.maximum(1, A + B - n)
    lengths = np.maximum(np.minimum(A, B) - lo + 1, 0).astype(np.int64)
    # log of the hypergeometric normaliser a! b! (n-a)! (n-b)! / n!, per pair
    log_norm = gammaln(A + 1) + gammaln(B + 1) + gammaln(n - A + 1) + gammaln(n - B + 1) - gammaln(n + 1)
    emi, ends = 0.0, np.cumsum(lengths)
    start = 0
    while start < len(A):  # pairs in chunks of about max_terms terms
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - lengths[start] + max_terms, side="right")))
        pair = np.repeat(np.arange(start, stop), lengths[start:stop])
        first = np.cumsum(lengths[start:stop]) - lengths[start:stop]
        nij = lo[pair] + (np.arange(len(pair)) - np.repeat(first, lengths[start:stop]))
        a_, b_ = A[pair], B[pair]
        log_p = (log_norm[pair] - gammaln(nij + 1) - gammaln(a_ - nij + 1) - gammaln(b_ - nij + 1)
                 - gammaln(n - a_ - b_ + nij + 1))
        emi += float((weight[pair] * nij / n * (np.log(n * nij) - np.log(a_ * b_)) * np.exp(log_p)).sum())
        start = stop
    return emi


def adjusted_rand_index(contingency):
    """ARI from pair counts, in exact integer arithmetic (scikit-learn's adjusted_rand_score)."""
    n = int(contingency.sum())
    sum_squares = int((contingency.astype(np.int64) ** 2).sum())
    rows, cols = contingency.sum(1).astype(np.int64), contingency.sum(0).astype(np.int64)
    tp = sum_squares - n                                   # ordered pairs together in both labelings
    fp = int((rows ** 2).sum()) - sum_squares              # together in y_true only
    fn = int((cols ** 2).sum()) - sum_squares              # together in y_pred only
    tn = n * n - tp - fp - fn - n
    if fp == 0 and fn == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def hungarian_accuracy(contingency):
    """Accuracy under the best one-to-one cluster -> class matching; unmatched clusters count as errors."""
    row, col = linear_sum_assignment(contingency, maximize=True)
    return float(contingency[row, col].sum() / contingency.sum()), dict(zip(col.tolist(), row.tolist()))


AUTHORS_SQUARE_LIMIT = 10_000  # ids up to this use the authors' id-indexed square matrix (at 10,000: 0.8 GB of counts)


def matched_then_majority(y_true, y_pred):
    """The class each sample's cluster stands for, as the authors' over-clustering evaluation (their cls_eval.py)
    decides it, tie-breaking included. Counts [cluster id, class id] in a square matrix indexed by the ids
    themselves (0 ... largest id, so a cluster id never predicted is an all-zero row), Hungarian on it; then, with
    more clusters than classes, every cluster matched to an id of no class takes its majority class (else it is
    wrong: -1). A class may thus be matched to a cluster id nobody predicted, which leaves a real cluster to its
    majority class: not the same as matching the predicted clusters alone. Negative ids, or ids from
    AUTHORS_SQUARE_LIMIT up, are first replaced by their rank (outside the authors' domain)."""
    y_true, y_pred = check_labels(y_true, y_pred)
    classes = None
    if min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= AUTHORS_SQUARE_LIMIT:
        classes, y_true = np.unique(y_true, return_inverse=True)
        y_pred = np.unique(y_pred, return_inverse=True)[1]
    size = int(max(y_true.max(), y_pred.max())) + 1
    count = np.bincount(y_pred * size + y_true, minlength=size * size).reshape(size, size)
    _, cluster_class = linear_sum_assignment(count.max() - count)  # row i is cluster id i
    is_class = np.bincount(y_true, minlength=size) > 0
    over_clustering = len(np.unique(y_pred)) > is_class.sum()
    cluster_class = np.where(is_class[cluster_class], cluster_class, count.argmax(1) if over_clustering else -1)
    predicted = cluster_class[y_pred]
    return predicted if classes is None else np.where(predicted >= 0, classes[predicted.clip(0)], -1)


def hungarian_majority_accuracy(y_true, y_pred):
    """The authors' over-clustering accuracy: samples whose class is their cluster's matched_then_majority class."""
    return float((matched_then_majority(y_true, y_pred) == np.asarray(y_true)).mean())


def superclass_accuracy(y_fine, y_pred, to_superclass):
    """The authors' superclass ACC (their ImageNet-hierarchy and BREEDS tables): every cluster is matched to a *fine*
    class (matched_then_majority), then predicts that class's superclass; the accuracy is counted on superclasses.
    y_fine: fine class labels; to_superclass[fine class] = superclass. Scoring the clusters against the superclass
    labels directly (what cluster_metrics does with mapped labels) matches clusters to superclasses instead."""
    y_fine, y_pred = check_labels(y_fine, y_pred)
    to_superclass = np.asarray(to_superclass)
    if y_fine.min() < 0 or y_fine.max() >= len(to_superclass):
        raise ValueError(f"fine labels must index to_superclass ({len(to_superclass)} entries), "
                         f"got {y_fine.min()}..{y_fine.max()}")
    predicted = matched_then_majority(y_fine, y_pred)
    return float(((predicted >= 0) & (to_superclass[predicted.clip(0)] == to_superclass[y_fine])).mean())


def cluster_metrics(y_true, y_pred, num_clusters=None):
    """NMI, AMI, ARI, ACC of predicted clusters against true classes. The values of scikit-learn's
    normalized_mutual_info_score, adjusted_mutual_info_score, adjusted_rand_score (arithmetic-mean normalisation),
    and exactly 1 for one partition under two namings; empty or non-integer labels are refused (ValueError), where
    scikit-learn scores empty labelings 1 and accepts integer-valued floats. With more clusters than classes also
    acc_majority (every cluster -> its majority class) and acc_hungarian_majority (the authors' protocol: one-to-one
    matching, then majority for the rest). num_clusters: how many clusters the predictor has (a head's C, k-means'
    k), so that an over-clustering head that used only a few of them still gets those two; default: those used."""
    y_true, y_pred = check_labels(y_true, y_pred)
    cont = contingency_matrix(y_true, y_pred)
    n = len(y_true)
    num_classes, num_clusters_used = cont.shape
    if num_classes == num_clusters_used == np.count_nonzero(cont):  # one partition under two namings (one cluster
        nmi = ami = 1.0  # included): exactly 1, where MI and entropy, computed apart, differ in their last bits
    elif num_classes == 1 or num_clusters_used == 1:  # one labeling carries no information
        nmi = ami = 0.0
    else:
        mi = mutual_info(cont)
        h_mean = (entropy(cont.sum(1)) + entropy(cont.sum(0))) / 2
        nmi = mi / h_mean if mi > 0 else 0.0
        emi = expected_mutual_info(cont.sum(1), cont.sum(0), n)
        # as scikit-learn: numerator and denominator kept at least eps away from 0, sign preserved
        eps = np.finfo(np.float64).eps
        numerator, denominator = (min(v, -eps) if v < 0 else max(v, eps) for v in (mi - emi, h_mean - emi))
        ami = numerator / denominator
    scores = dict(nmi=float(nmi), ami=float(ami), ari=adjusted_rand_index(cont), acc=hungarian_accuracy(cont)[0])
    if max(num_clusters or 0, num_clusters_used) > num_classes:
        scores["acc_majority"] = float(cont.max(0).sum() / n)
        scores["acc_hungarian_majority"] = hungarian_majority_accuracy(y_true, y_pred)
    return scores


# ---- k-means in torch: greedy k-means++ init, restarts, chunked distances, empty clusters re-seeded
def input_device(x):
    """Where a function runs by default: on its input's device (the CPU for a numpy array), never CUDA unasked."""
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def squared_distances(x, x_sq, centroids):
    """||x - c||^2 for every row of x and every centroid: [n, k], via ||x||^2 - 2 x.c + ||c||^2 (one addmm: the
    factor -2 goes on the [n, k] product, never on the [n, D] features)."""
    norms = x_sq[:, None] + (centroids * centroids).sum(1)[None]
    return torch.addmm(norms, x, centroids.T, alpha=-2).clamp_min_(0)


def assign(x, x_sq, centroids, chunk_rows):
    """Nearest centroid and its squared distance for every row, chunked so that no [N, k] matrix is built."""
    labels, dists = [], []
    for start in range(0, len(x), chunk_rows):
        d = squared_distances(x[start:start + chunk_rows], x_sq[start:start + chunk_rows], centroids)
        dist, label = d.min(1)
        labels.append(label)
        dists.append(dist)
    return torch.cat(labels), torch.cat(dists)


def kmeans_plus_plus(x, x_sq, k, gen, chunk_rows):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007; scikit-learn's variant): each new centre is the best of
    2 + ln(k) candidates drawn with probability proportional to the squared distance to the chosen centres."""
    n = len(x)
    trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), device=x.device, generator=gen)
    centres = [x[first]]
    closest = assign(x, x_sq, x[first], chunk_rows)[1].double()
    for _ in range(1, k):
        cumulative = closest.cumsum(0)
        draws = torch.rand(trials, device=x.device, generator=gen, dtype=torch.float64) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, draws).clamp_(max=n - 1)
        # squared distance of every point to its closest centre if each candidate were added: [N, trials]
        with_candidate = torch.minimum(closest[:, None], squared_distances(x, x_sq, x[candidates]).double())
        best = int(with_candidate.sum(0).argmin())
        centres.append(x[candidates[best]][None])
        closest = with_candidate[:, best]
    return torch.cat(centres)


def cluster_sums(x, labels, k):
    """Per-cluster sum of rows [k, D]: index_add_ on the CPU; a one-hot product on the GPU (deterministic)."""
    if x.is_cuda:
        one_hot = torch.zeros(len(x), k, device=x.device, dtype=x.dtype)
        one_hot[torch.arange(len(x), device=x.device), labels] = 1
        return one_hot.T @ x
    return torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)


def kmeans(x, k, n_init=10, n_iter=300, tol=1e-4, seed=0, device=None, chunk_rows=None):
    """k-means (Lloyd) with greedy k-means++ init; the best of n_init restarts by inertia.

    x: [N, D] array or tensor (use l2-normalised features for the usual baseline). Runs on `device` (default: where
    x is; the CPU for an array). Stops a restart when the centres move less than tol x the mean feature variance
    (scikit-learn's rule) or the labels stop changing; an emptied cluster is re-seeded with the point farthest
    from its centre. Deterministic for a seed. Returns (labels [N] int64, centroids [k, D]) on the CPU.
    """
    device = device or input_device(x)
    x = torch.as_tensor(x, dtype=torch.float32).to(device)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans needs a non-empty [N, D] array, got shape {tuple(x.shape)}")
    if not 1 <= k <= len(x):
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k} for N={len(x)}")
    if n_init < 1:
        raise ValueError(f"kmeans needs n_init >= 1, got {n_init}")
    chunk_rows = chunk_rows or max(1, (1 << 24) // max(k, 1))
    gen = torch.Generator(device=x.device).manual_seed(seed)
    x_sq = (x * x).sum(1)
    tol = tol * float(x.var(0, unbiased=False).mean())
    best_inertia, best = math.inf, None
    for _ in range(n_init):
        centroids = kmeans_plus_plus(x, x_sq, k, gen, chunk_rows)
        labels = None
        for _ in range(n_iter):
            new_labels, dists = assign(x, x_sq, centroids, chunk_rows)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            counts = torch.bincount(labels, minlength=k)
            new_centroids = cluster_sums(x, labels, k) / counts.clamp_min(1)[:, None].to(x.dtype)
            empty = (counts == 0).nonzero().flatten()
            if len(empty):  # re-seed empty clusters with the worst-fitted points
                new_centroids[empty] = x[dists.topk(len(empty)).indices]
            shift = float(((new_centroids - centroids) ** 2).sum())
            centroids = new_centroids
            if shift <= tol:
                break
        labels, dists = assign(x, x_sq, centroids, chunk_rows)
        inertia = float(dists.double().sum())
        if inertia < best_inertia:
            best_inertia, best = inertia, (labels.cpu(), centroids.cpu())
    return best


def kmeans_baseline(train_features, eval_features, eval_labels, k, seeds, l2_normalise=True, train_fraction=1.0,
                    n_init=1, progress=None, device=None):
    """The field's baseline: k-means fitted on features of the training split, each evaluation sample assigned to
    its nearest centroid and scored; one row of metrics per seed.

    Ours (the defaults): l2-normalised features of the whole training split. The authors' k-means table:
    raw features (l2_normalise=False) of a 10 % subset (train_fraction=0.1), scikit-learn's 10 restarts
    (n_init=10). progress(done), when given, is called after each seed. k-means runs on `device` (default: where the
    training features are)."""
    train_features, eval_features = torch.as_tensor(train_features).float(), torch.as_tensor(eval_features).float()
    if l2_normalise:
        train_features = F.normalize(train_features, dim=1)
        eval_features = F.normalize(eval_features, dim=1)
    runs = []
    for done, seed in enumerate(seeds, 1):
        fit_on = train_features
        if train_fraction < 1:  # a random subset per seed
            subset = torch.randperm(len(train_features), generator=torch.Generator().manual_seed(seed))
            fit_on = train_features[subset[:max(k, round(train_fraction * len(train_features)))]]
        _, centroids = kmeans(fit_on, k, n_init=n_init, seed=seed, device=device)  # default: where fit_on is
        pred = assign(eval_features, (eval_features ** 2).sum(1), centroids, 1 << 14)[0]
        runs.append(cluster_metrics(np.asarray(eval_labels), pred.numpy(), num_clusters=k))
        if progress:
            progress(done)
    return runs


# ---- Probes on frozen features: weighted kNN and a linear (logistic-regression) probe
def check_probe_inputs(train_features, train_labels, test_features, test_labels):
    """Validate the two labelled splits of a probe; return (train_x, train_y, test_x, test_y) as tensors (features
    keep their dtype and device, labels become int64 on the CPU) or raise ValueError with a one-line reason."""
    out = []
    for split, x, y in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.ndim != 2:
            raise ValueError(f"{split}_features must be 2-D [N, D], got shape {tuple(x.shape)}")
        if y.ndim != 1:
            raise ValueError(f"{split}_labels must be 1-D, got shape {tuple(y.shape)}")
        if len(x) != len(y):
            raise ValueError(f"{split}_features has {len(x)} rows but {split}_labels has {len(y)} labels")
        if len(x) == 0:
            raise ValueError(f"the {split} split is empty")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"{split}_labels must hold integer class labels, got dtype {y.dtype}")
        y = y.cpu().long()
        if (y == -1).any():  # this project marks unlabelled samples with -1
            raise ValueError("training labels contain -1 (unlabelled samples); a probe needs labelled training data"
                             if split == "train" else "the evaluation split is unlabelled (test labels contain -1)")
        if (y < 0).any():
            raise ValueError(f"{split}_labels must be >= 0, got {int(y.min())}")
        out += [x, y]
    if out[0].shape[1] != out[2].shape[1]:
        raise ValueError(f"train features have {out[0].shape[1]} dims but test features have {out[2].shape[1]}")
    return out


KNN_TEMPERATURE = 0.1  # the authors' knn_eval.py and lightly; DINO and solo-learn default to 0.07


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=200, temperature=KNN_TEMPERATURE,
                 num_classes=None, chunk_rows=None, device=None, progress=None):
    """Weighted kNN accuracy of frozen features (Wu et al. 2018; the protocol of DINO, lightly and solo-learn).

    On l2-normalised features (x.y = cosine), each test sample takes its k most similar training samples; neighbour
    i votes for its label with weight exp(s_i / temperature) (temperature=math.inf: the plain majority vote); the
    largest summed vote is the prediction (top-5: the five largest). Ties do not depend on torch.topk: tied
    neighbours by lowest training index, equal sums by lowest class index. Test rows go through in chunks of
    chunk_rows (default: a similarity block of about 2**24 floats, on `device`).

    train_features [N, D], test_features [M, D]: arrays or tensors; labels: integers >= 0 (-1, this project's mark
    for unlabelled, is refused); num_classes defaults to the largest label + 1; progress(done) after each chunk.
    Returns {"top1": acc, "top5": acc} in [0, 1]; "top5" only with more than 5 classes."""
    train_x, train_y, test_x, test_y = check_probe_inputs(train_features, train_labels, test_features, test_labels)
    n_train, n_test = len(train_x), len(test_x)
    if int(k) != k or not 1 <= k <= n_train:
        raise ValueError(f"k must be an integer between 1 and the training set size {n_train}, got k={k}")
    k = int(k)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    largest = int(max(train_y.max(), test_y.max()))
    num_classes = largest + 1 if num_classes is None else num_classes
    if num_classes <= largest:
        raise ValueError(f"num_classes={num_classes} but the labels go up to {largest}")
    chunk_rows = chunk_rows or max(1, (1 << 24) // max(n_train, num_classes))
    device = torch.device(device or input_device(train_features))

    train = normalised_float32(train_x, device)
    train_y, test_y = train_y.to(device), test_y.to(device)

    correct1 = correct5 = 0
    for start in range(0, n_test, chunk_rows):
        query = test_x[start:start + chunk_rows].to(device, torch.float32)
        if not torch.isfinite(query).all():
            raise ValueError("test_features contain NaN or inf")
        sim = F.normalize(query, dim=1) @ train.T                        # [c, N] cosine similarities
        sim_k, idx_k = nearest_k(sim, k)
        weight = ((sim_k - sim_k[:, :1]) / temperature).exp()             # exp(s_i / T) / exp(s_max / T), in (0, 1]
        label_k = train_y[idx_k]                                          # [c, k]
        votes = torch.zeros(len(sim), num_classes, device=device)         # [c, classes]
        rows = torch.arange(len(sim), device=device)
        for j in range(k):  # one neighbour at a time, most similar first: no atomics, no order-dependent rounding
            votes[rows, label_k[:, j]] += weight[:, j]
        ranking = votes.argsort(dim=1, descending=True, stable=True)[:, :5]  # stable: lowest class wins ties
        target = test_y[start:start + chunk_rows, None]
        correct1 += int((ranking[:, :1] == target).sum())
        correct5 += int((ranking == target).any(1).sum())
        if progress:
            progress(start + len(query))
    result = {"top1": correct1 / n_test}
    if num_classes > 5:
        result["top5"] = correct5 / n_test
    return result


def normalised_float32(x, device):
    """l2-normalised rows of x as one float32 matrix on device, filled in blocks: a single copy of a large x."""
    out = torch.empty(len(x), x.shape[1], dtype=torch.float32, device=device)
    for start in range(0, len(x), 1 << 16):
        rows = x[start:start + (1 << 16)].to(device, torch.float32)
        if not torch.isfinite(rows).all():
            raise ValueError("train_features contain NaN or inf")
        out[start:start + len(rows)] = F.normalize(rows, dim=1)
    return out


def nearest_k(sim, k):
    """The k largest similarities of each row of sim [c, N] and their columns, most similar first; where several
    columns share the k-th largest value, the lowest columns (training indices) are taken."""
    sim_k, idx_k = sim.topk(min(k + 1, sim.shape[1]), dim=1)            # [c, k+1], most similar first
    if sim_k.shape[1] == k:
        return sim_k, idx_k
    # ambiguous only where the k-th and (k+1)-th are equal: there keep all above the k-th, then the tied ones in
    # increasing index up to k
    tied = (sim_k[:, k - 1] == sim_k[:, k]).nonzero().flatten()
    sim_k, idx_k = sim_k[:, :k].contiguous(), idx_k[:, :k].contiguous()
    if len(tied):
        s, kth = sim[tied], sim_k[tied, k - 1:k]
        above, at = s > kth, s == kth
        keep = above | (at & (at.cumsum(1) <= k - above.sum(1, keepdim=True)))   # exactly k per row
        idx = keep.nonzero()[:, 1].view(-1, k)                         # increasing training index
        order = s.gather(1, idx).argsort(dim=1, descending=True)       # back to most similar first
        idx_k[tied] = idx.gather(1, order)
        sim_k[tied] = s.gather(1, idx_k[tied])
    return sim_k, idx_k


PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def linear_probe(train_features, train_labels, test_features, test_labels,
                 weight_decays=PROBE_WEIGHT_DECAYS, val_fraction=0.1, max_iter=200, seed=0, device=None,
                 progress=None):
    """Linear probe: multinomial logistic regression on frozen features, with the L2 penalty chosen on held-out data.

    Features are standardised with the training split's per-dimension mean and std (the test split with the same),
    so the probe does not depend on the scale of each feature. The model, logits = x W^T + b, minimises

        L(W, b) = (1/n) sum_i CE(softmax(x_i W^T + b), y_i) + (weight_decay / 2) ||W||_F^2      (b not penalised)

    scikit-learn's LogisticRegression(C = 1 / (weight_decay * n)), by full-batch L-BFGS (fit_logistic). A
    stratified val_fraction of the training split (fixed by seed) picks the weight decay (largest first, each fit
    warm-started from the previous; ties: the larger), then a refit on the whole split is scored on the test split.
    Classes absent from training are never predicted. progress(done) after each of the len(weight_decays) + 1 fits.
    Returns {"top1": test accuracy in [0, 1], "weight_decay": the chosen value, "val_top1": {weight_decay: acc}}."""
    train_x, train_y, test_x, test_y = check_probe_inputs(train_features, train_labels, test_features, test_labels)
    classes = torch.unique(train_y)                                       # sorted; the model predicts only these
    if len(classes) < 2:
        raise ValueError(f"the training labels hold {len(classes)} class; a linear probe needs at least 2")
    if len(weight_decays) == 0 or any(not wd >= 0 for wd in weight_decays):
        raise ValueError(f"weight_decays must be a non-empty list of numbers >= 0, got {weight_decays}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    device = torch.device(device or input_device(train_features))
    x = train_x.to(device, torch.float32)
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1                                                     # constant dimensions stay 0 after centring
    x, x_test = (x - mean) / std, (test_x.to(device, torch.float32) - mean) / std
    if not (torch.isfinite(x).all() and torch.isfinite(x_test).all()):
        raise ValueError("features contain NaN or inf")
    y = torch.searchsorted(classes, train_y).to(device)                   # labels -> 0..len(classes)-1
    classes = classes.to(device)
    val_idx, fit_idx = stratified_split(y.cpu(), val_fraction, seed)
    val_idx, fit_idx = val_idx.to(device), fit_idx.to(device)
    lam, eigvec = torch.linalg.eigh(x.T @ x / len(x))                    # for fit_logistic's preconditioner
    curvature = (lam.clamp_min(0) / len(classes), eigvec)

    def top1(params, features, labels):
        """Accuracy of argmax(x W^T + b), mapped back to the original labels (first maximum on ties)."""
        with torch.no_grad():
            pred = classes[F.linear(features, *params).argmax(1)]
        return int((pred == labels).sum()) / len(labels)  # exact, not a float32 mean

    params = (torch.zeros(len(classes), x.shape[1], device=device), torch.zeros(len(classes), device=device))
    solutions, val_top1 = {}, {}
    x_fit, y_fit, x_val, labels_val = x[fit_idx], y[fit_idx], x[val_idx], classes[y[val_idx]]
    for wd in sorted(weight_decays, reverse=True):                        # strongest regularisation first
        params = solutions[wd] = fit_logistic(x_fit, y_fit, wd, params, curvature, max_iter)
        val_top1[wd] = top1(params, x_val, labels_val)
        if progress:
            progress(len(val_top1))
    best = max(sorted(weight_decays, reverse=True), key=lambda wd: val_top1[wd])  # first maximum: the larger wd
    params = fit_logistic(x, y, best, solutions[best], curvature, max_iter)
    if progress:
        progress(len(val_top1) + 1)
    return {"top1": top1(params, x_test, test_y.to(device)), "weight_decay": best,
            "val_top1": {wd: val_top1[wd] for wd in weight_decays}}


def stratified_split(y, val_fraction, seed):
    """(validation indices, fitting indices), each sorted: shuffle, group by class (a stable sort keeps the shuffle
    inside each class), and send the first round(val_fraction * n_c) samples of each class (keeping at least one
    for fitting) to the validation set."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    perm = perm[y[perm].sort(stable=True).indices]
    counts = torch.bincount(y)
    n_val = (counts * val_fraction).round().long().clamp(max=counts - 1)
    rank_in_class = torch.arange(len(perm)) - (counts.cumsum(0) - counts)[y[perm]]
    is_val = rank_in_class < n_val[y[perm]]
    if not is_val.any():
        raise ValueError(f"val_fraction={val_fraction} leaves no validation samples in {len(y)} training samples")
    return perm[is_val].sort().values, perm[~is_val].sort().values


def fit_logistic(features, labels, weight_decay, start, curvature, max_iter):
    """Minimise L(W, b) of linear_probe from start = (W, b) with full-batch L-BFGS (strong-Wolfe line search,
    float32), stopping after max_iter iterations or when an iteration changes the loss or the parameters by less
    than 1e-6; returns (W [classes, D], b [classes]).

    Preconditioning: the Hessian of L in W is roughly s M + weight_decay I, with M = x^T x / n (x standardised) and
    s ~ 1 / classes the softmax curvature at W = 0; correlated features give it a condition number up to
    s lambda_max(M) / weight_decay, over which plain L-BFGS crawls. So L-BFGS optimises V, with W = V diag(d) E^T
    where M = E diag(lambda) E^T (curvature = (s lambda, E)) and d = (s lambda + weight_decay)^(-1/2): in V that
    quadratic has unit curvature in every direction. A change of variables only: the minimiser is unchanged."""
    lam, eigvec = curvature
    d = (lam + weight_decay).clamp_min(1e-6 * float(lam.max()) or 1.0).rsqrt()  # 1.0: constant features, no decay
    basis = eigvec * d                                                # [D, D]: W = V basis^T
    v, b = start[0] @ (eigvec / d), start[1].clone()                  # V = W E diag(1 / d)
    optimizer = torch.optim.LBFGS([v, b], lr=1, max_iter=max_iter, history_size=10,
                                  tolerance_grad=1e-6, tolerance_change=1e-6, line_search_fn="strong_wolfe")
    rows = torch.arange(len(labels), device=features.device)

    def closure():
        # Loss and exact gradient by hand, without autograd: with p = softmax(x W^T + b), dL/dlogits =
        # (p - onehot(y)) / n, hence dL/db = sum_i dL/dlogits_i, dL/dW = (dL/dlogits)^T x + weight_decay W and,
        # through W = V basis^T, dL/dV = dL/dW basis.
        w = v @ basis.T
        log_p = F.linear(features, w, b).log_softmax(1)                  # [n, classes]
        loss = -log_p[rows, labels].mean() + 0.5 * weight_decay * (w * w).sum()
        dlogits = log_p.exp_()
        dlogits[rows, labels] -= 1
        dlogits /= len(labels)
        v.grad = (dlogits.T @ features + weight_decay * w) @ basis
        b.grad = dlogits.sum(0)
        return loss

    optimizer.step(closure)
    return v @ basis.T, b


# ---- Features and predicted classes of a whole split, no augmentation (also the Python API)
def eval_batches(dataset, size, batch_size, workers):
    """Yield (float images [B, 3, size, size] in [0, 1], labels [B], dataset indices [B]) over a split in order;
    unreadable files are left out. One resize for images in memory and files: none at size x size (CIFAR's usual
    protocol), else the authors' ImageNet evaluation (Resize(256) + CenterCrop(224)): the shorter side to
    size / 0.875, then the centre size x size."""
    shape, shorter_side = (size, size), round(size / 0.875)
    if isinstance(dataset, sc.ImageArray):
        for start in range(0, len(dataset), batch_size):
            images = sc.fit(dataset.images[start:start + batch_size], shape, shorter_side)
            indices = torch.arange(start, start + len(images))
            yield images.float() / 255, dataset.labels[indices.to(dataset.labels.device)], indices
        return
    loader = torch.utils.data.DataLoader(sc.Indexed(dataset, shape, shorter_side), batch_size=batch_size,
                                         num_workers=workers, collate_fn=sc.collate_readable)
    for batch in loader:
        if batch is not None:
            yield batch[0].float() / 255, batch[1], batch[2]


def load_images(files, size):
    """Image files (a list of paths, or a folder: every image under it, sorted) as the model's input: float
    [N, 3, size, size] in [0, 1], resized as the evaluation resizes. An unreadable file is a UserError."""
    if isinstance(files, (str, Path)) and Path(files).is_dir():
        files = [path for path, _ in sc.ImageFiles(files, loader=sc.read_image).samples]
    images = []
    for path in files:
        image = sc.read_image(path)
        if image is None:
            raise sc.UserError(f"cannot read image {path}")
        images.append(sc.fit(v2.functional.pil_to_tensor(image), (size, size), round(size / 0.875)))
    if not images:
        raise sc.UserError(f"no image files in {files}")
    return torch.stack(images).float() / 255


@torch.no_grad()
def extract(model, dataset, size, batch_size=512, workers=8, device="cpu", what="features", dtype=None, row_tau=0.1):
    """Run a split through the model: dict of backbone features [N, F], embeddings [N, D], per head (lists of [N])
    the predicted class and its probability (the row softmax at row_tau, as in the loss), labels [N] and the dataset
    index of each row [N] (unreadable files have none), all on the CPU. The backbone runs in float32 as the authors'
    evaluation, or under autocast to dtype (torch.bfloat16: faster on a GPU, slightly different features)."""
    was_training = model.training
    model.eval()
    heads = range(len(model.heads))
    out = dict(backbone=[], embedding=[], predictions=[[] for _ in heads], probabilities=[[] for _ in heads],
               labels=[], index=[])
    amp = torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)
    progress = sc.Progress(f"extracting {what}", len(dataset), "images")
    for images, labels, indices in eval_batches(dataset, size, batch_size, workers):
        with amp:
            features = model.features(images.to(device, non_blocking=True))
        z = model.embed(features)
        out["backbone"].append(features.float().cpu())
        out["embedding"].append(z.cpu())
        for head, logits in enumerate(model.classify(z)):
            probability, predicted = F.softmax(logits / row_tau, dim=1).max(1)
            out["predictions"][head].append(predicted.cpu())
            out["probabilities"][head].append(probability.cpu())
        out["labels"].append(torch.as_tensor(labels).cpu())
        out["index"].append(indices)
        progress(int(indices[-1]) + 1)
    model.train(was_training)
    return {key: [torch.cat(p) for p in value] if key in ("predictions", "probabilities") else torch.cat(value)
            for key, value in out.items()}


# ---- Training's test-split monitors (handed to selfclassifier.train by its main)
def monitor_test_split(model, train_set, eval_set, cfg, device, dtype, heads=True, knn=True):
    """On the labelled test split, without augmentation, the backbone in the training precision: heads, NMI / ACC /
    ARI of the head(s) whose C is the number of true classes (CIFAR-100: its 20 superclasses, as the evaluation
    scores it); knn, the top-1 of a weighted kNN (k = 20, or all labelled training images if fewer) on backbone
    features, the labelled training images as neighbours. Returns [(log record, log line)]."""
    out = []
    test = extract(model, eval_set, cfg.global_size, cfg.batch_size, cfg.workers, device, "test features", dtype)
    to_true_class = CIFAR100_SUPERCLASS if cfg.dataset == "cifar100" else np.arange(len(eval_set.classes))
    labels = to_true_class[test["labels"].numpy()]
    for c, predicted in zip(cfg.num_classes, test["predictions"]):
        if heads and c == len(np.unique(to_true_class)):
            m = cluster_metrics(labels, predicted.numpy())
            out.append((dict(event="eval", head=c, **m), f"eval head C{c}: NMI {100 * m['nmi']:.1f} "
                        f"ACC {100 * m['acc']:.1f} ARI {100 * m['ari']:.1f}"))
    if knn:
        train = extract(model, train_set, cfg.global_size, cfg.batch_size, cfg.workers, device,
                           "kNN training features", dtype)
        labelled = train["labels"] >= 0
        k = min(20, int(labelled.sum()))
        train_labels = torch.as_tensor(to_true_class[train["labels"][labelled].numpy()])
        top1 = knn_accuracy(train["backbone"][labelled], train_labels, test["backbone"], labels, k=k,
                            device=device)["top1"]
        out.append((dict(event="knn", k=k, top1=top1), f"kNN (k={k}, backbone features) top-1 {100 * top1:.1f}"))
    return out


# ---- Superclasses: score fine-class predictions against coarser labels
def read_class_map(path, class_names):
    """Read a class -> superclass map: a JSON object {"class": "superclass", ...} or a text file of lines
    "class superclass" (# starts a comment). A class is named by its folder name or its index in class_names.
    Returns (superclass index of every class [num_classes], superclass names in order of first appearance)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"cannot read --class-map {path}: {error.strerror}") from None
    if text.lstrip().startswith("{"):
        try:
            pairs = [(str(k), str(v)) for k, v in json.loads(text).items()]
        except json.JSONDecodeError as error:
            raise ValueError(f"--class-map {path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    else:
        lines = [line.split("#")[0].split(None, 1) for line in text.splitlines()]
        if any(len(parts) == 1 for parts in lines):
            raise ValueError(f"--class-map {path}: every line needs 'class superclass'")
        pairs = [(parts[0], parts[1].strip()) for parts in lines if parts]
    index_of = {name: i for i, name in enumerate(class_names)}
    superclasses, mapping = {}, np.full(len(class_names), -1)
    for name, superclass in pairs:
        i = index_of.get(name, int(name) if name.isdigit() and int(name) < len(class_names) else None)
        if i is None:
            raise ValueError(f"--class-map {path} names class {name!r}, which is neither a class folder nor a class "
                             "index")
        if mapping[i] >= 0:
            raise ValueError(f"--class-map {path} names class {class_names[i]!r} twice")
        mapping[i] = superclasses.setdefault(superclass, len(superclasses))
    if (mapping < 0).any():
        missing = class_names[int(np.argmax(mapping < 0))]
        raise ValueError(f"--class-map {path} gives no superclass for class {missing!r}")
    return mapping, list(superclasses)


# ---- Command line
def command_line():
    p = sc.CommandLine(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--checkpoint", help="a checkpoint of selfclassifier.py, or one of the authors' released checkpoints")
    add("--arch", choices=("resnet18", "resnet34", "resnet50"), help="without --checkpoint: baselines on this backbone")
    add("--weights", help="with --arch: backbone state dict (random initialisation when omitted)")
    add("--init-seed", type=int, default=0, help="with --arch and no --weights: seed of the random initialisation")
    add("--stem", choices=("cifar", "imagenet"), help="with --arch (default: cifar up to 64 px, else imagenet)")
    add("--image-size", type=sc.positive_int, help="evaluation image side (default: the checkpoint's, or 32/96/224)")
    add("--dataset", choices=sc.DATASETS, help="default: the checkpoint's dataset")
    add("--data", help="default: the checkpoint's data root")
    add("--download", action="store_true", help="let torchvision download CIFAR / STL-10 into --data")
    add("--class-map", help="score against superclasses: a JSON object {\"class\": \"superclass\", ...} or lines "
        "'class superclass' (# comments); a class is its folder name or index. Default for cifar100: its 20")
    add("--cifar100-fine", action="store_true", help="score CIFAR-100 on its 100 classes, not the 20 superclasses")
    add("--kmeans-seeds", type=sc.non_negative_int, default=3, help="k-means runs per feature kind (0 = none)")
    add("--kmeans-features", choices=("l2", "raw"), default="l2", help="l2-normalised (ours) or raw (the authors')")
    add("--kmeans-train-fraction", type=float, default=1.0, help="of the training split to fit on (the authors: 0.1)")
    add("--kmeans-n-init", type=sc.positive_int, default=1, help="k-means++ restarts per seed (the authors: 10)")
    add("--knn", action=argparse.BooleanOptionalAction, default=True, help="weighted kNN on backbone features")
    add("--knn-k", type=sc.positive_int, nargs="+", default=[20, 200], help="neighbour counts of the kNN rows")
    add("--knn-temperature", type=sc.positive_float, default=KNN_TEMPERATURE, help="T of the vote's exp(cosine / T) "
        "(the authors: 0.1; DINO, solo-learn: 0.07)")
    add("--linear-probe", action=argparse.BooleanOptionalAction, default=True, help="linear probe on backbone features")
    add("--batch-size", type=sc.positive_int, default=512, help="images per forward pass")
    add("--workers", type=sc.non_negative_int, default=min(8, sc.available_cpus()), help="image-decoding processes")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (cpu, cuda, cuda:1)")
    add("--precision", choices=("fp32", "bf16"), default="fp32", help="the backbone's (bf16: faster on a GPU)")
    add("--json", help="also write the numbers to this JSON file")
    add("--grid-dir", help="what each class holds: per head a sheet DIR/C<C>.png of every class's surest members (the "
        "scored head; with --predict every head, and DIR/index.html to browse)")
    add("--grid-per-class", type=sc.positive_int, default=32, help="with --predict: members per class in index.html")
    add("--predict", metavar="DIR", help="instead of scoring: classify every image under DIR (any depth, no labels) "
        "with --checkpoint's heads into --out")
    add("--out", default="predictions.csv", help="with --predict: the CSV (path, per head class and probability)")
    add("--sort-into", metavar="DIR", help="with --predict: a new folder of links to the images, one per class")
    add("--sort-head", type=sc.positive_int, help="with --sort-into: the head of this C (default: the first)")
    add("--copy", action="store_true", help="with --sort-into: copies instead of symbolic links")
    return p


def parse_args(argv=None):
    p = command_line()
    args = p.parse_args(argv)
    if args.predict and not args.checkpoint:
        p.error("--predict classifies with a trained model: it needs --checkpoint")
    if args.predict and not Path(args.out).resolve().parent.is_dir():
        p.error(f"--out {args.out}: the folder {Path(args.out).resolve().parent} does not exist")
    if not args.checkpoint and not args.arch:
        p.error("give --checkpoint, or --arch (with --dataset) for baselines without a checkpoint")
    if not args.checkpoint and not args.dataset:
        p.error("--arch needs --dataset (and --data)")
    if not 0 < args.kmeans_train_fraction <= 1:
        p.error(f"--kmeans-train-fraction must be in (0, 1], got {args.kmeans_train_fraction}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but no CUDA device is visible")
    if (args.sort_into or args.sort_head or args.copy) and not args.predict:
        p.error("--sort-into, --sort-head and --copy sort the images of --predict: they need --predict")
    if args.grid_dir and not args.checkpoint:
        p.error("--grid-dir shows the classes of a checkpoint's head: it needs --checkpoint")
    if args.sort_into and Path(args.sort_into).exists() and (not Path(args.sort_into).is_dir()
                                                             or any(Path(args.sort_into).iterdir())):
        p.error(f"--sort-into {args.sort_into} exists and is not an empty folder: give a new one")
    if args.json and not Path(args.json).parent.is_dir():  # found out now, not after a long evaluation
        p.error(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
    return args


def load_model_and_config(args):
    """The checkpoint's model and config (--dataset / --data override where to evaluate), or a ResNet with --weights
    or a seeded random initialisation for the baselines."""
    if args.checkpoint:
        state = sc.load_checkpoint(args.checkpoint)
        try:
            model, cfg = sc.model_from_checkpoint(state)
        except (RuntimeError, TypeError) as error:
            raise sc.UserError(f"{args.checkpoint} does not match this code's model ({sc.one_line(error)})") from None
        overrides = {k: v for k, v in dict(dataset=args.dataset, data=args.data, download=args.download).items() if v}
        return model, sc.config_from_checkpoint(state, **overrides)
    size = args.image_size or {"stl10": 96, "imagefolder": 224}.get(args.dataset, 32)
    cfg = sc.Config(dataset=args.dataset, data=args.data or "./data", download=args.download, arch=args.arch,
                    stem=sc.resolve_stem(args.stem or "auto", size), global_size=size, num_classes=[])
    with torch.random.fork_rng(devices=[]):  # a reproducible random initialisation; the caller's RNG is left as it was
        torch.manual_seed(args.init_seed)
        model = sc.build_model(cfg, *sc.IMAGENET_MEAN_STD)
    if args.weights:
        load_backbone_weights(model, args.weights, args.arch)
    return model, cfg


def load_backbone_weights(model, path, arch):
    weights = sc.load_torch_file(path, "--weights")
    weights = weights.get("state_dict", weights) if isinstance(weights, dict) else weights
    if not isinstance(weights, dict):
        raise sc.UserError(f"--weights {path} holds a {type(weights).__name__}, not a state_dict")
    weights = {k.removeprefix("backbone."): v for k, v in sc.strip_prefixes(weights).items() if not k.startswith("fc.")}
    try:
        missing, _ = model.backbone.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # tensors of another shape: another architecture
        raise sc.UserError(f"--weights {path} does not fit --arch {arch}: "
                           f"{str(error).splitlines()[-1].strip()}") from None
    if missing:
        raise sc.UserError(f"--weights {path} lacks {len(missing)} {arch} tensors, e.g. {missing[0]}")


def table_cell(value):
    if value is None:
        return f"{'':>12s}"
    if isinstance(value, dict):  # mean and std over k-means seeds
        return f"{100 * value['mean']:6.1f} ±{100 * value['std']:4.1f}"
    return f"{100 * value:12.1f}"


TABLE_COLUMNS = dict(nmi="NMI", ami="AMI", ari="ARI", acc="ACC", acc_majority="ACC-maj",
                     acc_hungarian_majority="ACC-H+maj", acc_via_fine_classes="ACC-via-fine")


def format_table(rows):
    """The clustering rows (mean ± std for k-means; only the columns some row has), then the representation rows."""
    width = max(map(len, rows)) if rows else 0
    columns = {key: title for key, title in TABLE_COLUMNS.items() if any(key in scores for scores in rows.values())}
    lines = [f"{'':{width}s} " + " ".join(f"{title:>12s}" for title in columns.values())]
    lines += [f"{name:{width}s} " + " ".join(table_cell(scores.get(key)) for key in columns)
              for name, scores in rows.items() if "nmi" in scores]
    representation = [(name, scores) for name, scores in rows.items() if "top1" in scores]
    if representation:
        lines.append(f"\n{'':{width}s} {'top-1':>12s} {'top-5':>12s}")
        lines += [f"{name:{width}s} {table_cell(scores['top1'])} {table_cell(scores.get('top5'))}"
                  for name, scores in representation]
    return "\n".join(lines)


# ---- What each class holds: a sheet per head, a page to browse, a folder per class
OUR_GRID_FILE = re.compile(r"C\d+(-\d+)?\.png|index\.html")  # what this program writes into --grid-dir
CLASSES_PER_SHEET, TILES_PER_ROW, CAPTION, PAD = 50, 8, 16, 4


def claim_grid_dir(grid_dir):
    """Ready grid_dir for new output: new, empty, or holding only what this program wrote there, which is removed so
    that old and new classes never mix. A folder with anything else is refused (UserError), before any work."""
    grid_dir = Path(grid_dir)
    if grid_dir.exists() and not grid_dir.is_dir():
        raise sc.UserError(f"--grid-dir {grid_dir} is a file, not a folder")
    entries = list(grid_dir.iterdir()) if grid_dir.exists() else []
    foreign = [e.name for e in entries if not (e.is_file() and OUR_GRID_FILE.fullmatch(e.name))]
    if foreign:
        raise sc.UserError(f"--grid-dir {grid_dir} holds files this program did not write ({foreign[0]}, ...): give "
                           "a new or empty folder, or one that holds only its earlier sheets")
    for entry in entries:
        entry.unlink()
    grid_dir.mkdir(parents=True, exist_ok=True)


def tile_image(dataset, index):
    """Image `index` of a dataset as uint8 [3, h, w], at its own size (files: decoded again)."""
    if isinstance(dataset, sc.ImageArray):
        return dataset.images[index].cpu()
    return v2.functional.pil_to_tensor(sc.read_image(dataset.samples[index][0]))


def draw_sheet(rows, tile):
    """rows: [(caption, [uint8 images [3, h, w]])] -> an RGB PIL image: per row a caption strip, then up to
    TILES_PER_ROW tiles of tile x tile px, each image fitted into its tile (sharp nearest-neighbour when enlarged by
    a whole factor, antialiased otherwise)."""
    from PIL import Image, ImageDraw, ImageFont
    width, band = TILES_PER_ROW * (tile + PAD) + PAD, CAPTION + tile + PAD
    sheet = Image.new("RGB", (width, len(rows) * band), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for r, (caption, images) in enumerate(rows):
        y = r * band
        draw.text((PAD, y + 3), caption, fill=(20, 20, 20), font=font)
        for c, image in enumerate(images[:TILES_PER_ROW]):
            x, (h, w) = PAD + c * (tile + PAD), image.shape[-2:]
            scale = tile / max(h, w)
            nearest = scale >= 1 and scale == int(scale)
            mode = getattr(v2.InterpolationMode, "NEAREST" if nearest else "BILINEAR")
            image = v2.functional.resize(
                image, [max(1, round(h * scale)), max(1, round(w * scale))], interpolation=mode, antialias=True)
            draw.rectangle([x, y + CAPTION, x + tile - 1, y + CAPTION + tile - 1], fill=(224, 224, 224))
            thumb = Image.fromarray(image.permute(1, 2, 0).numpy())
            sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + CAPTION + (tile - thumb.height) // 2))
    return sheet


def class_members(predicted, probability):
    """[(class, its rows sorted by probability, surest first)], largest class first (ties: lower class first)."""
    order = np.lexsort((-probability, predicted))  # one sort: by class, then surest first (ties: lower row first)
    classes, starts, counts = np.unique(predicted[order], return_index=True, return_counts=True)
    return [(int(classes[k]), order[starts[k]:starts[k] + counts[k]]) for k in np.argsort(-counts, kind="stable")]


def write_sheets(grid_dir, name, dataset, indices, members, probability, class_names=None):
    """grid_dir/<name>.png: one row per class of a head (members: from class_members), largest first, captioned with
    its class number, size, share and mean probability, showing the members the head is surest of, tiles of at least
    64 px; heads of more than CLASSES_PER_SHEET classes continue in <name>-2.png, <name>-3.png, ... Returns the files
    written."""
    tile = 64 if max(tile_image(dataset, indices[members[0][1][0]]).shape[-2:]) <= 64 else 128
    rows = [(f"class {k}: {len(of_k):,} images ({100 * len(of_k) / len(probability):.1f} %), mean probability "
             f"{probability[of_k].mean():.2f}" + (f", {class_names[k]}" if class_names and k in class_names else ""),
             [tile_image(dataset, indices[i]) for i in of_k[:TILES_PER_ROW]]) for k, of_k in members]
    files = []
    for page, start in enumerate(range(0, len(rows), CLASSES_PER_SHEET), 1):
        files.append(Path(grid_dir) / (f"{name}.png" if page == 1 else f"{name}-{page}.png"))
        draw_sheet(rows[start:start + CLASSES_PER_SHEET], tile).save(files[-1])
    return files


def write_index_html(path, heads, root):
    """A static page (no script) to browse the classes. heads: [(name, sheet files, [(class, size, share, mean
    probability, [(image file, probability)])])]; images and sheets are linked by relative, URL-quoted paths, each
    image titled with its path under root."""
    folder = Path(path).parent
    link = lambda file: html.escape(urllib.parse.quote(Path(os.path.relpath(file, folder)).as_posix()))
    out = ['<!DOCTYPE html><html><head><meta charset="utf-8"><title>What each class holds</title><style>',
           "body{font-family:sans-serif;margin:1em 2em} h3{font-size:1em;margin:1em 0 .3em} img{background:#e0e0e0;"
           "object-fit:contain;margin:1px}</style></head><body><h1>What each class holds</h1><p>Per head, every class "
           "(largest first) and its members, surest first; hover for the file and its probability, click to open it."
           "</p><p>" + " ".join(f'<a href="#{name}">{name}</a>' for name, _, _ in heads) + "</p>"]
    for name, sheets, classes in heads:
        out.append(f'<h2 id="{name}">{name}</h2><p>' + " ".join(f'<a href="{link(f)}">{Path(f).name}</a>'
                                                              for f in sheets) + "</p>")
        for k, size, share, mean_p, members in classes:
            out.append(f"<h3>class {k}: {size:,} images ({100 * share:.1f} %), mean probability {mean_p:.2f}</h3><p>")
            out += [f'<a href="{link(f)}"><img src="{link(f)}" width="64" height="64" loading="lazy" alt="" '
                    f'title="{html.escape(os.path.relpath(f, root))}, p {p:.2f}"></a>' for f, p in members]
            out.append("</p>")
    Path(path).write_text("\n".join(out + ["</body></html>\n"]), encoding="utf-8")


def sort_into(target, root, paths, predicted, copy=False):
    """target/class<k>/: a symbolic link to (or with copy, a copy of) every image predicted as class k, named as the
    file (as its path under root, '/' -> '__', where two share a name). Returns the number of folders."""
    width, written = len(str(int(predicted.max()))), set()
    for path, k in zip(paths, predicted.tolist()):
        folder = Path(target) / f"class{k:0{width}d}"
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / Path(path).name
        if file in written:
            file = folder / "__".join(Path(path).relative_to(root).parts)
        written.add(file)
        shutil.copy2(path, file) if copy else file.symlink_to(Path(path).resolve())
    return len(np.unique(predicted))


def predict(args):
    """--predict DIR: the predicted class (and its probability, the row softmax at the checkpoint's row_tau) of every
    readable image under DIR, for every head, as a CSV sorted by path, the unreadable files in skipped.txt beside it;
    the class sizes per head; optionally a sheet per head and index.html (--grid-dir), a folder per class
    (--sort-into)."""
    model, cfg = load_model_and_config(args)
    root, size = Path(args.predict), args.image_size or cfg.global_size
    if args.sort_head and args.sort_head not in cfg.num_classes:
        raise sc.UserError(f"--sort-head {args.sort_head}: the checkpoint's heads have {cfg.num_classes} classes")
    if args.grid_dir:
        claim_grid_dir(args.grid_dir)
    images = sc.load_image_folder(root, cfg.in_memory_max_size, args.workers, labelled=False)
    dtype = sc.autocast_dtype(args.precision, torch.device(args.device))  # fp32: None, bf16: autocast
    out = extract(model.to(args.device), images, size, args.batch_size, args.workers, args.device, "predictions",
                     dtype, cfg.row_tau)
    files = images.paths if isinstance(images, sc.ImageArray) else [path for path, _ in images.samples]
    paths = [files[i] for i in out["index"].tolist()]
    skipped = images.skipped or sorted(set(files) - set(paths))
    written = [f"{args.out} ({len(paths):,} images)"]
    if skipped:
        sc.say_skipped(root, skipped, len(paths) + len(skipped))
        skipped_file = Path(args.out).parent / "skipped.txt"
        skipped_file.write_text("".join(f"{path}\n" for path in skipped))
        written.append(f"{skipped_file} ({len(skipped):,} unreadable)")
    heads = range(len(cfg.num_classes))
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"] + [f"{kind}_C{c}" for c in cfg.num_classes for kind in ("class", "probability")])
        for row, path in enumerate(paths):
            writer.writerow([Path(path).relative_to(root)] + [value for head in heads for value in (
                int(out["predictions"][head][row]), f"{float(out['probabilities'][head][row]):.4f}")])
    pages = []
    for c, predicted, probability in zip(cfg.num_classes, out["predictions"], out["probabilities"]):
        predicted, probability = predicted.numpy(), probability.numpy()
        sizes = np.bincount(predicted, minlength=c)
        print(f"head C={c}: {int((sizes > 0).sum())} of {c} classes used; sizes, largest first: "
              + " ".join(f"{k}:{sizes[k]}" for k in np.argsort(-sizes, kind="stable") if sizes[k]))
        if args.grid_dir:
            members = class_members(predicted, probability)
            sheets = write_sheets(args.grid_dir, f"C{c}", images, out["index"].numpy(), members, probability)
            written += [str(sheet) for sheet in sheets]
            classes = [(k, len(of_k), len(of_k) / len(paths), float(probability[of_k].mean()),
                        [(paths[i], float(probability[i])) for i in of_k[:args.grid_per_class]]) for k, of_k in members]
            pages.append((f"C{c}", sheets, classes))
    if args.grid_dir:
        write_index_html(Path(args.grid_dir) / "index.html", pages, root)
        written.append(str(Path(args.grid_dir) / "index.html"))
    if args.sort_into:
        head = cfg.num_classes.index(args.sort_head) if args.sort_head else 0
        folders = sort_into(args.sort_into, root, paths, out["predictions"][head].numpy(), args.copy)
        written.append(f"{args.sort_into}/ ({folders} class folders of head C{cfg.num_classes[head]})")
    print("wrote " + ", ".join(written))
    return out, paths


def mean_and_std(runs):
    return {m: dict(mean=float(np.mean([r[m] for r in runs])), std=float(np.std([r[m] for r in runs])))
            for m in runs[0]}


def true_classes(args, cfg, eval_set):
    """(fine class -> scored class map or None, names of the scored classes): --class-map's superclasses, CIFAR-100's
    20 superclasses unless --cifar100-fine, else the dataset's classes."""
    if args.class_map:  # read before the features are extracted: a bad map fails at once
        return read_class_map(args.class_map, list(eval_set.classes))
    if cfg.dataset == "cifar100" and not args.cifar100_fine:
        return CIFAR100_SUPERCLASS, [f"superclass{i}" for i in range(20)]
    return None, list(eval_set.classes)


def representation_rows(args, train, test, labels, to_superclass):
    """kNN rows and the linear probe on backbone features, the labelled training images as training data."""
    train_labels = train["labels"].numpy()
    labelled = train_labels >= 0  # STL-10's training split includes its unlabelled images
    features, train_labels = train["backbone"][labelled], train_labels[labelled]
    if to_superclass is not None:
        train_labels = to_superclass[train_labels]
    rows, other_t = {}, f", T={args.knn_temperature:g}" if args.knn_temperature != KNN_TEMPERATURE else ""
    for k in args.knn_k if args.knn else ():
        rows[f"kNN k={k}{other_t} (backbone)"] = knn_accuracy(
            features, train_labels, test["backbone"], labels, k=min(k, len(train_labels)),
            temperature=args.knn_temperature, device=args.device,
            progress=sc.Progress(f"kNN k={k}", len(labels), "test images"))
    if args.linear_probe:
        progress = sc.Progress("linear probe", len(PROBE_WEIGHT_DECAYS) + 1, "fits")
        rows["linear probe (backbone)"] = linear_probe(features, train_labels, test["backbone"], labels,
                                                       device=args.device, progress=progress)
    return rows


def evaluate(args):
    """Every head's clustering scores on the evaluation split, the k-means baselines, kNN and linear probe."""
    model, cfg = load_model_and_config(args)
    model, size = model.to(args.device), args.image_size or cfg.global_size
    if args.grid_dir:
        claim_grid_dir(args.grid_dir)
    eval_set = sc.load_split(cfg, train=False)
    if eval_set is None:
        raise sc.UserError(f"{cfg.data} has no evaluation split (test/ or val/ of class folders) to score; --predict "
                           "classifies a folder")
    to_superclass, class_names = true_classes(args, cfg, eval_set)
    dtype = sc.autocast_dtype(args.precision, torch.device(args.device))  # fp32: None, bf16: autocast
    features_of = lambda split, what: extract(model, split, size, args.batch_size, args.workers, args.device, what,
                                             dtype)
    ev = features_of(eval_set, "evaluation-split features")
    fine_labels = ev["labels"].numpy()
    labels = fine_labels if to_superclass is None else to_superclass[fine_labels]
    num_true, rows = len(np.unique(labels)), {}
    for c, pred in zip(cfg.num_classes, ev["predictions"]):
        rows[f"head C={c}"] = cluster_metrics(labels, pred.numpy(), num_clusters=c)
        if to_superclass is not None:  # the authors' superclass ACC beside ours
            rows[f"head C={c}"]["acc_via_fine_classes"] = superclass_accuracy(fine_labels, pred.numpy(), to_superclass)
    if args.kmeans_seeds > 0 or args.knn or args.linear_probe:
        tr = features_of(sc.load_split(cfg, train=True), "training-split features")
    fraction = f", {args.kmeans_train_fraction:g} of train" if args.kmeans_train_fraction < 1 else ""
    features = [("backbone", "backbone"), ("projection", "embedding")][:2 if args.checkpoint else 1]
    for title, key in features if args.kmeans_seeds > 0 else ():
        progress = sc.Progress(f"k-means on {title} features", args.kmeans_seeds, "seeds")
        runs = kmeans_baseline(tr[key], ev[key], labels, num_true, range(args.kmeans_seeds),
                               args.kmeans_features == "l2", args.kmeans_train_fraction, args.kmeans_n_init, progress,
                               args.device)
        name = f"k-means {title} (k={num_true}, {args.kmeans_features}{fraction}, {len(runs)} seeds)"
        rows[name] = mean_and_std(runs)
    if args.knn or args.linear_probe:
        rows.update(representation_rows(args, tr, ev, labels, to_superclass))
    report(args, cfg, rows, len(labels), num_true)
    if args.grid_dir and cfg.num_classes:  # the head whose C is nearest the number of classes
        head = min(range(len(cfg.num_classes)), key=lambda h: abs(cfg.num_classes[h] - num_true))
        predicted = ev["predictions"][head].numpy()
        _, matched = hungarian_accuracy(contingency_matrix(labels, predicted))  # position of cluster -> of class
        clusters, classes = np.unique(predicted), np.unique(labels)
        name = lambda label: class_names[label] if label < len(class_names) else str(label)
        names = {int(clusters[p]): f"matched to {name(classes[c])}" for p, c in matched.items()}
        probability = ev["probabilities"][head].numpy()
        sheets = write_sheets(args.grid_dir, f"C{cfg.num_classes[head]}", eval_set, ev["index"].numpy(),
                              class_members(predicted, probability), probability, names)
        print("wrote " + ", ".join(map(str, sheets)))
    return rows


def report(args, cfg, rows, images, num_true):
    source = args.checkpoint or f"{args.arch} ({args.weights or f'random init, seed {args.init_seed}'})"
    print(f"{source} on {cfg.dataset} evaluation split ({images} images, {num_true} classes)")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(source=source, dataset=cfg.dataset, images=images,
                                                   num_classes=num_true, scores=rows), indent=2))


def main(argv=None):
    args = parse_args(argv)
    try:
        return predict(args) if args.predict else evaluate(args)
    except (sc.UserError, ValueError, OSError) as error:  # OSError: e.g. --json or --grid-dir not writable
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)  # 2: argparse's, for the command line
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
