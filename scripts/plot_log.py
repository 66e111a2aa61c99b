"""Draw a training run's log.jsonl (selfclassifier.py's) as a PNG of three panels over epochs: the loss; per head the
entropy of its class sizes / ln C (the collapse monitor); the test split's ACC / NMI and the kNN monitor's top-1.
Drawn with PIL, which torchvision already needs.

    python scripts/plot_log.py out/cifar10/log.jsonl curves.png
"""
import argparse
import json
import sys
from pathlib import Path

PLOT_MARGIN = dict(left=56, right=16, top=22, bottom=26)  # pixels around each panel's plot area
PLOT_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def training_curves(log_path):
    """log.jsonl of selfclassifier.py -> three panels [(title, y range or None, [(name, [(epoch, value)])])]: the
    loss; per head the entropy of its class sizes over the epoch so far / ln C (1: all classes used equally, 0:
    collapse to one class); the test split's ACC and NMI (%) of the evaluated head(s) and the kNN monitor's top-1."""
    try:
        records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
        train = [r for r in records if r.get("event") == "train"]
        if not train:
            raise ValueError(f"{log_path} holds no training log lines")
        steps_per_epoch = max(r["step"] / (r["epoch"] + 1) for r in train)  # a line is logged at every epoch end
        heads = sorted({int(c) for r in train for c in r["heads"]})
        monitor = [(f"C={c}", [(r["step"] / steps_per_epoch,
                                r["heads"][str(c)]["entropy"] / r["heads"][str(c)]["log_c"])
                               for r in train if str(c) in r["heads"]]) for c in heads]
        evals = [r for r in records if r.get("event") == "eval"]
        test = [(f"{metric.upper()} C={c}", [(r["epoch"] + 1, 100 * r[metric]) for r in evals if r["head"] == c])
                for c in sorted({r["head"] for r in evals}) for metric in ("acc", "nmi")]
        knn = [(r["epoch"] + 1, 100 * r["top1"]) for r in records if r.get("event") == "knn"]
        loss = [(r["step"] / steps_per_epoch, r["loss"]) for r in train]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        raise ValueError(f"{log_path} is not a log.jsonl of selfclassifier.py") from None
    return [("loss", None, [("loss", loss)]),
            ("collapse monitor: entropy of class sizes / ln C", (0.0, 1.05), monitor),
            ("test split, %", (0.0, 100.0), test + ([("kNN top-1", knn)] if knn else []))]


def plot_training_log(log_path, png_path=None, width=960, panel_height=230):
    """Draw training_curves(log_path) as stacked panels over epochs; save to png_path if given; return the PIL image."""
    from PIL import Image, ImageDraw
    panels = training_curves(log_path)
    x_max = max(x for _, _, series in panels for _, points in series for x, _ in points)
    image = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    m = PLOT_MARGIN
    for index, (title, y_range, series) in enumerate(panels):
        top, bottom = index * panel_height + m["top"], (index + 1) * panel_height - m["bottom"]
        left, right = m["left"], width - m["right"]
        values = [y for _, points in series for _, y in points]
        low, high = y_range or (min(values, default=0.0), max(values, default=1.0))
        high = high if high > low else low + 1

        def at(x, y):
            return left + (right - left) * x / x_max, bottom - (bottom - top) * (y - low) / (high - low)

        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, top - 16), title, fill="black")
        for k in range(5):  # y ticks
            y = low + (high - low) * k / 4
            draw.text((4, at(0, y)[1] - 6), f"{y:.3g}", fill="black")
            draw.line([left - 4, at(0, y)[1], left, at(0, y)[1]], fill="black")
        tick = max(1, round(x_max / 10))
        for x in range(0, int(x_max) + 1, tick):  # x ticks, in epochs
            draw.line([at(x, low)[0], bottom, at(x, low)[0], bottom + 4], fill="black")
            draw.text((at(x, low)[0] - 4, bottom + 6), str(x), fill="black")
        draw.text((4, bottom + 6), "epoch", fill="black")
        legend_x = right - 8
        for (name, points), colour in reversed(list(zip(series, PLOT_COLOURS * 4))):
            legend_x -= 8 + 7 * len(name)
            draw.text((legend_x, top - 16), name, fill=colour)
            xy = [at(x, y) for x, y in points]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy[-1:]:  # the last value (or a lone point) as a dot
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    if png_path:
        image.save(png_path)
    return image


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="log.jsonl of a selfclassifier.py run")
    p.add_argument("png", help="the PNG to write")
    args = p.parse_args(argv)
    try:
        plot_training_log(args.log, args.png)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
