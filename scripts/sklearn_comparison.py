"""eval_clustering.py's metrics, k-means, weighted kNN and linear probe against scikit-learn: time and value.

Needs scikit-learn, for this comparison only (it is not a dependency of the project):

    pip install scikit-learn
    python scripts/sklearn_comparison.py

Prints one line per measurement of the table "Our metrics against scikit-learn" in docs/results.md: AMI on 50,000
random labels of 1,000 classes and 1,000 clusters; k-means on 50,000 x 128 well-separated and overlapping points and
on 50,000 x 512 with k = 100; a k = 200 weighted kNN and the linear probe on 50,000 + 10,000 samples of 10
overlapping classes, the probe beside scikit-learn's LogisticRegression at the penalty the probe chose.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # eval_clustering.py is in the repo root
from eval_clustering import cluster_metrics, kmeans, knn_accuracy, linear_probe  # noqa: E402


def timed(fn, *args, **kwargs):
    """(fn's result, seconds it took)."""
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t


def inertia(x, labels, centroids):
    return float(((x - centroids[labels]) ** 2).sum())


def compare_ami():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 1000, 50_000), rng.integers(0, 1000, 50_000)
    ref, t_sk = timed(adjusted_mutual_info_score, y_true, y_pred)
    ours, t_ours = timed(cluster_metrics, y_true, y_pred)  # NMI, AMI, ARI and ACC together against AMI alone
    print(f"AMI 50k x 1000 x 1000: scikit-learn {t_sk:.3f} s (AMI only), ours {t_ours:.3f} s (NMI+AMI+ARI+ACC), "
          f"speed-up {t_sk / t_ours:.0f}x, |diff| {abs(ref - ours['ami']):.1e}")


def compare_kmeans(x, k, what):
    (labels, c), t_ours = timed(kmeans, x, k, n_init=3, seed=0, device="cpu")
    km, t_sk = timed(KMeans(k, n_init=3, random_state=0).fit, x.numpy())
    print(f"k-means {what}: ours {t_ours:.2f} s inertia {inertia(x, labels, c):.2f}; "
          f"scikit-learn {t_sk:.2f} s inertia {km.inertia_:.2f}")


def compare_kmeans_128():
    for name, spread in (("well-separated", 1.0), ("overlapping", 8.0)):
        g = torch.Generator().manual_seed(1)
        centres = torch.randn(10, 128, generator=g) * 4
        x = centres[torch.randint(10, (50_000,), generator=g)] + spread * torch.randn(50_000, 128, generator=g)
        compare_kmeans(torch.nn.functional.normalize(x, dim=1), 10, f"50000 x 128, k=10, 3 restarts, {name}")


def compare_kmeans_512():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(100, 512, generator=g)[torch.randint(100, (50_000,), generator=g)]
         + 0.08 * torch.randn(50_000, 512, generator=g))
    compare_kmeans(torch.nn.functional.normalize(x, dim=1), 100, "50000 x 512, k=100, 3 restarts, overlapping")


def compare_knn_and_probe():
    g = torch.Generator().manual_seed(3)  # 10 overlapping classes, 50,000 + 10,000 samples of 512 features
    centres, scales = torch.randn(10, 512, generator=g), torch.rand(512, generator=g) * 3 + 0.1
    y_train, y_test = torch.randint(10, (50_000,), generator=g), torch.randint(10, (10_000,), generator=g)
    x_train = (centres[y_train] + 12 * torch.randn(50_000, 512, generator=g)) * scales
    x_test = (centres[y_test] + 12 * torch.randn(10_000, 512, generator=g)) * scales
    knn, t_knn = timed(knn_accuracy, x_train, y_train, x_test, y_test, k=200, device="cpu")
    probe, t_probe = timed(linear_probe, x_train, y_train, x_test, y_test, device="cpu")
    # scikit-learn at the penalty our probe chose, on the same standardised features (their standardisation timed
    # too, as the probe's time includes its own): its C is 1 / (weight decay * n)
    mean, std = x_train.mean(0), x_train.std(0)
    lr = LogisticRegression(C=1 / (probe["weight_decay"] * 50_000), max_iter=1000)
    _, t_sk = timed(lambda: lr.fit(((x_train - mean) / std).numpy(), y_train.numpy()))
    sk_top1 = (lr.predict(((x_test - mean) / std).numpy()) == y_test.numpy()).mean()
    print(f"kNN k=200, 50000 x 512 -> 10000: {t_knn:.2f} s, top-1 {knn['top1']:.4f}")
    print(f"linear probe (5 weight decays + refit): {t_probe:.2f} s, top-1 {probe['top1']:.4f} "
          f"(wd {probe['weight_decay']:g}); scikit-learn LogisticRegression, the chosen penalty only: {t_sk:.2f} s, "
          f"top-1 {sk_top1:.4f}")


if __name__ == "__main__":
    compare_ami()
    compare_kmeans_128()
    compare_kmeans_512()
    compare_knn_and_probe()
