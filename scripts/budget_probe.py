"""Time budgeted runs with the test suite's settings (test_selfclassifier.BUDGET, --minutes 0.1: a 6 s budget) and
print when each planned its schedule and when it ended: how closely a --minutes run keeps its budget (the table
"Time budgets" in docs/results.md).

    python scripts/budget_probe.py [--pace-margin 0.2] [--runs 6] [extra selfclassifier.py flags...]
"""
import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import selfclassifier as sc  # noqa: E402
from test_selfclassifier import BUDGET, budget_run_records, train  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--pace-margin", type=float, default=sc.PACE_MARGIN)
parser.add_argument("--runs", type=int, default=6)
parser.add_argument("--minutes", type=float, default=0.1)
args, extra = parser.parse_known_args()
sc.PACE_MARGIN = args.pace_margin
ends = []
for run in range(args.runs):
    with tempfile.TemporaryDirectory() as out_dir:
        started = time.time()
        train(sc.parse_config(BUDGET + extra + ["--minutes", str(args.minutes), "--out-dir", out_dir,
                                                "--log-every", "1000"]), started)
        ends.append(time.time() - started)
        (plan,), _ = budget_run_records(pathlib.Path(out_dir))
    print(f"run {run}: planned at step {plan['planned_at_step']} after {plan['elapsed']:.2f} s, "
          f"{plan['total_steps']} steps, ended after {ends[-1]:.2f} s; one pass of the heads monitor "
          f"{plan['costs']['heads']:.2f} s, of the kNN monitor {plan['costs']['knn']:.2f} s", flush=True)
print(f"budget {60 * args.minutes:.0f} s, pace margin {args.pace_margin:g}: {len(ends)} runs ended in "
      f"{min(ends):.1f} to {max(ends):.1f} s, {sum(e > 60 * args.minutes for e in ends)} over")
