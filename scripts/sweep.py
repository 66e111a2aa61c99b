"""Sweep runner: trains several variants of selfclassifier.py at once on one machine (e.g. one GPU), scores each
with eval_clustering.py as soon as its training ends, and prints one table ranked by the ACC of the head whose
C equals the number of true classes.

    python scripts/sweep.py --out-dir out/sweep --minutes 6 --base "--dataset imagefolder --data data/cifar10-jpeg" \
        --variant "defaults=" --variant "lr0.6=--lr 0.6" --variant "crop08=--global-scale 0.08 1" \
        [--eval-flags "--kmeans-seeds 1"] [--bench-batch-sizes 512 1024 2048] [--json out/sweep/table.json]
    python scripts/sweep.py --summarise out/cifar10-gpu [--ledger-command "..." --ledger-minutes 6]  # one run dir

What it does:
  1. with --bench-batch-sizes: first, alone on the machine, scripts/bench_step.py with the base flags (and
     --bench-flags) for those batch sizes; its output goes to OUT/bench.txt and OUT/bench.json.
  2. every variant NAME=FLAGS at once: `python selfclassifier.py BASE FLAGS --minutes M --out-dir OUT/NAME`
     (--minutes only when given here; without it the runs follow --epochs / --max-steps), output in
     OUT/NAME/train.txt. The CPU threads are split evenly: OMP_NUM_THREADS and --workers are the CPUs this
     process may use // variants (at least 1); flags given in BASE or FLAGS win.
  3. a variant whose training exits 0 with OUT/NAME/ckpt.pt: `python eval_clustering.py --checkpoint
     OUT/NAME/ckpt.pt --json OUT/NAME/scores.json EVAL_FLAGS`, output in OUT/NAME/eval.txt, while the others train.
  4. every --progress-every seconds (15) one line per variant, from OUT/NAME/log.jsonl.
  5. at the end one table, also written as JSON (--json, default OUT/table.json): a list of rows with the fields
     below plus the full scores. A variant that fails (non-zero exit, no checkpoint, no scores) is a row
     "failed: <last line of its output>" and never stops the others. Ctrl-C (or SIGTERM) stops every child (training
     saves a checkpoint), then prints the table. Exit code 0 once the table is written, 130 after Ctrl-C.

--summarise DIR reads one run directory (log.jsonl, train.txt, scores.json), prints its row as JSON and, with
--ledger-command, writes DIR/summary.json and DIR/ledger-row.md (a Markdown table row: date | GPU | commit |
command | minutes | epochs | images/s | ACC / NMI of the head C = classes | kNN k=20 | probe); used by
scripts/cifar10_gpu.sh. Standard library only (no torch import: the children do the work).
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAME = re.compile(r"[A-Za-z0-9._-]+$")  # a variant's name is a folder name


# =====================================================================================================
# Commands
# =====================================================================================================
def train_command(base, flags, out_dir, minutes=None, workers=None):
    """The training command of one variant. --workers comes first so that BASE or FLAGS can override it (argparse
    keeps the last value); the time budget is only passed when a sweep has one."""
    cmd = [sys.executable, str(REPO / "selfclassifier.py")]
    cmd += ["--workers", str(workers)] if workers else []
    cmd += base + flags
    cmd += ["--minutes", f"{minutes:g}"] if minutes is not None else []
    return cmd + ["--out-dir", str(out_dir)]


def eval_command(out_dir, eval_flags, workers=None):
    cmd = [sys.executable, str(REPO / "eval_clustering.py"), "--checkpoint", str(out_dir / "ckpt.pt"),
           "--json", str(out_dir / "scores.json")]
    return cmd + (["--workers", str(workers)] if workers else []) + eval_flags


def bench_command(base, batch_sizes, bench_flags, out_dir):
    return ([sys.executable, str(REPO / "scripts" / "bench_step.py")] + base + ["--batch-sizes"]
            + [str(b) for b in batch_sizes] + bench_flags + ["--json", str(out_dir / "bench.json")])


def last_line(path):
    """The last non-empty line of a child's output: what a failed row shows."""
    try:
        lines = [l.strip() for l in Path(path).read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "(no output)"
    return lines[-1] if lines else "(no output)"


# =====================================================================================================
# Reading a run directory
# =====================================================================================================
def read_log(path):
    """The JSON records of log.jsonl; a line still being written (no newline yet, broken JSON) is skipped."""
    records = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def steps_per_epoch(records, train_text):
    """From a log record that names it, else from the training output's 'N steps per epoch' line."""
    for r in records:
        if isinstance(r.get("steps_per_epoch"), int) and r["steps_per_epoch"] > 0:
            return r["steps_per_epoch"]
    found = re.findall(r"(\d+) steps per epoch", train_text)
    return int(found[-1]) if found else None


def summarise(run_dir):
    """One run directory as a row: epochs reached, img/s, the scores of the head C = true classes, over-clustering
    ACC-H+maj, kNN, linear probe (None for what the run has not written)."""
    run_dir = Path(run_dir)
    records = read_log(run_dir / "log.jsonl")
    train = [r for r in records if r.get("event") == "train"]
    try:
        train_text = (run_dir / "train.txt").read_text(errors="replace")
    except OSError:
        train_text = ""
    per_epoch = steps_per_epoch(records, train_text)
    last = train[-1] if train else None
    row = dict(out_dir=str(run_dir), step=last["step"] if last else None,
               epochs=round(last["step"] / per_epoch, 2) if last and per_epoch else None,
               loss=last["loss"] if last else None,
               images_per_s=statistics.median(r["images_per_s"] for r in train) if train else None,
               head=None, nmi=None, ari=None, acc=None, acc_h_maj={}, knn_row=None, knn_top1=None, probe_top1=None,
               num_classes=None, images=None, scores=None)
    try:
        scored = json.loads((run_dir / "scores.json").read_text())
    except (OSError, json.JSONDecodeError):
        return row
    scores = scored.get("scores", {})
    heads = {int(m.group(1)): s for name, s in scores.items() if (m := re.fullmatch(r"head C=(\d+)", name))}
    row.update(scores=scores, num_classes=scored.get("num_classes"), images=scored.get("images"))
    if heads:
        # the head with C = the number of true classes; a JSON without num_classes (older code): the smallest head
        c = row["num_classes"] if row["num_classes"] in heads else min(heads)
        row.update(head=c, nmi=heads[c]["nmi"], ari=heads[c]["ari"], acc=heads[c]["acc"],
                   acc_h_maj={h: s["acc_hungarian_majority"] for h, s in sorted(heads.items())
                              if h > c and "acc_hungarian_majority" in s})
    knn = [name for name in scores if name.startswith("kNN k=")]
    if knn:  # k = 20 as in the training monitor, else the first k the evaluation ran
        row["knn_row"] = "kNN k=20 (backbone)" if "kNN k=20 (backbone)" in scores else knn[0]
        row["knn_top1"] = scores[row["knn_row"]]["top1"]
    if "linear probe (backbone)" in scores:
        row["probe_top1"] = scores["linear probe (backbone)"]["top1"]
    return row


# =====================================================================================================
# The table
# =====================================================================================================
def pct(value):
    return "-" if value is None else f"{100 * value:.1f}"


def ranked(rows):
    """Best ACC first; rows without an ACC (failed, interrupted) last, in their given order."""
    return sorted(rows, key=lambda r: -r["acc"] if r.get("acc") is not None else float("inf"))


def format_table(rows):
    over = sorted({c for r in rows for c in r.get("acc_h_maj", {})})
    knn_rows = {r["knn_row"] for r in rows if r.get("knn_row")}
    knn_title = knn_rows.pop().replace(" (backbone)", "") if len(knn_rows) == 1 else "kNN"
    heads = {r["head"] for r in rows if r.get("head")}
    head = f" C={heads.pop()}" if len(heads) == 1 else ""
    columns = (["variant", "flags", "epochs", "img/s", f"NMI{head}", f"ARI{head}", f"ACC{head}"]
               + [f"H+maj C={c}" for c in over] + [knn_title, "probe", "wall s", "status"])
    table = [columns]
    for r in rows:
        epochs = "-" if r.get("epochs") is None else f"{r['epochs']:g}"
        speed = "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.0f}"
        wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
        table.append([r["name"], r["flags"] or "(base)", epochs, speed, pct(r.get("nmi")), pct(r.get("ari")),
                      pct(r.get("acc"))] + [pct(r.get("acc_h_maj", {}).get(c)) for c in over]
                     + [pct(r.get("knn_top1")), pct(r.get("probe_top1")), wall, r["status"]])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    # the last column (status) is not padded: a failure's message may be long
    return "\n".join("  ".join(cell.ljust(w) if i < len(columns) - 1 else cell
                               for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in table)


# =====================================================================================================
# Running the variants
# =====================================================================================================
class Variant:
    """One variant's state: 'training' -> 'evaluating' -> 'done', or 'failed: ...' / 'interrupted'."""

    def __init__(self, name, flags, out_dir):
        self.name, self.flags, self.out_dir = name, flags, out_dir
        self.status, self.process, self.log_file = "waiting", None, None
        self.t_start = self.t_trained = self.t_end = None
        self.returncodes, self.commands = {}, {}

    def start(self, cmd, output, env, status):
        self.log_file = open(self.out_dir / output, "w")
        self.process = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.status, self.commands[status] = status, shlex.join(cmd)

    def finish_process(self):
        rc = self.process.wait()
        self.log_file.close()
        self.process = None
        return rc

    def progress(self, now):
        if self.status == "training":
            train = [r for r in read_log(self.out_dir / "log.jsonl") if r.get("event") == "train"]
            where = (f"epoch {train[-1]['epoch']} step {train[-1]['step']} loss {train[-1]['loss']:.4f} "
                     f"{train[-1]['images_per_s']:.0f} img/s" if train else "starting")
            return f"{self.name}: training, {where} ({now - self.t_start:.0f} s)"
        if self.status == "evaluating":
            return f"{self.name}: evaluating ({now - self.t_trained:.0f} s)"
        return f"{self.name}: {self.status}"


def parse_variant(text):
    name, sep, flags = text.partition("=")
    if not sep or not NAME.match(name):
        raise argparse.ArgumentTypeError(
            f"a variant is NAME=FLAGS with NAME of letters, digits, '.', '_', '-', got {text!r}")
    return name, flags.strip()


STRING_FLAGS = ("--base", "--eval-flags", "--bench-flags", "--ledger-command")  # each takes one string of flags


def join_string_flags(argv):
    """argparse reads '--eval-flags --no-knn' as two options; '--eval-flags=--no-knn' as an option and its value."""
    out, it = [], iter(argv)
    for a in it:
        out.append(f"{a}={next(it, '')}" if a in STRING_FLAGS else a)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--out-dir", default="out/sweep", help="one folder per variant goes here")
    p.add_argument("--base", default="", help="selfclassifier.py flags shared by every variant (one string)")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=FLAGS",
                   help="a variant: its folder name and its extra flags (repeatable; 'defaults=' for the base alone)")
    p.add_argument("--minutes", type=float, help="training time budget per variant, passed as --minutes M "
                   "(default: none, the runs follow --epochs / --max-steps)")
    p.add_argument("--eval-flags", default="", help="extra eval_clustering.py flags (one string)")
    p.add_argument("--bench-batch-sizes", type=int, nargs="+",
                   help="first run scripts/bench_step.py for these batch sizes")
    p.add_argument("--bench-flags", default="", help="extra scripts/bench_step.py flags, e.g. '--bench-steps 20'")
    p.add_argument("--json", help="the table as JSON (default: OUT_DIR/table.json)")
    p.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    p.add_argument("--threads", type=int, help="CPU threads per variant (default: usable CPUs // variants, at least 1)")
    p.add_argument("--summarise", metavar="DIR", help="instead of a sweep: print the row of one run directory")
    p.add_argument("--ledger-command", help="with --summarise: the training command, for DIR/ledger-row.md")
    p.add_argument("--ledger-minutes", default="", help="with --summarise: the time budget, for the ledger row")
    p.add_argument("--ledger-commit", help="with --summarise: the commit (default: git's; for a copy without .git)")
    p.add_argument("--train-seconds", type=float, help="with --summarise: measured training time, for the ledger row")
    p.add_argument("--eval-seconds", type=float, help="with --summarise: measured evaluation time, for the ledger row")
    args = p.parse_args(join_string_flags(sys.argv[1:] if argv is None else argv))
    if args.summarise:
        return args
    if not args.variant:
        p.error("give at least one --variant NAME=FLAGS")
    names = [name for name, _ in args.variant]
    if len(set(names)) < len(names):
        p.error(f"variant names must differ, got {' '.join(names)}")
    if args.minutes is not None and args.minutes <= 0:
        p.error(f"--minutes must be > 0, got {args.minutes:g}")
    try:
        for text in [args.base, args.eval_flags, args.bench_flags] + [flags for _, flags in args.variant]:
            shlex.split(text)
    except ValueError as error:  # an unclosed quote
        p.error(f"cannot split flags: {error}")
    return args


def run_bench(args, base, out_dir):
    """bench_step.py alone on the machine (every CPU, the whole GPU); its output shown and kept in OUT/bench.txt."""
    cmd = bench_command(base, args.bench_batch_sizes, shlex.split(args.bench_flags), out_dir)
    print("bench: " + shlex.join(cmd), flush=True)
    with open(out_dir / "bench.txt", "w") as log:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            for line in process.stdout:
                if not line.startswith("RESULT "):  # the table and progress on screen; every line in the file
                    print(("  " + line) if line.strip() else line, end="", flush=True)
                log.write(line)
            rc = process.wait()
        except KeyboardInterrupt:  # stop the bench too, then the sweep
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    if rc != 0:
        print(f"bench failed (exit {rc}): {last_line(out_dir / 'bench.txt')}; the sweep goes on", flush=True)


def sweep(args):
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base, eval_flags = shlex.split(args.base), shlex.split(args.eval_flags)
    # Ctrl-C and SIGTERM raise KeyboardInterrupt, even when started in the background (which ignores SIGINT). Set
    # before any child starts: a child inherits an ignored SIGINT, but a handled one is reset to the default.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_signal)
    if args.bench_batch_sizes:
        run_bench(args, base, out_dir)

    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // len(args.variant))  # the CPUs this process may use
    # each child gets its share of the cores: math libraries read OMP_NUM_THREADS, loaders get --workers
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    variants = [Variant(name, flags, out_dir / name) for name, flags in args.variant]
    print(f"{len(variants)} variants at once, {threads} CPU thread(s) each, into {out_dir}", flush=True)
    for v in variants:
        v.out_dir.mkdir(parents=True, exist_ok=True)
        v.t_start = time.time()
        v.start(train_command(base, shlex.split(v.flags), v.out_dir, args.minutes, threads),
                "train.txt", env, "training")
        print(f"  {v.name}: {v.commands['training']}", flush=True)

    interrupted = False
    try:
        last_progress = time.time()
        while any(v.process for v in variants):
            time.sleep(0.5)
            for v in variants:
                if v.process is None or v.process.poll() is None:
                    continue
                rc = v.finish_process()
                v.returncodes[v.status] = rc
                if v.status == "training":
                    v.t_trained = time.time()
                    if rc != 0:
                        v.status, v.t_end = f"failed: {last_line(v.out_dir / 'train.txt')}", time.time()
                    elif not (v.out_dir / "ckpt.pt").exists():
                        v.status = f"failed: training exited 0 but wrote no {v.out_dir / 'ckpt.pt'}"
                        v.t_end = time.time()
                    else:
                        (v.out_dir / "scores.json").unlink(missing_ok=True)  # never score an old evaluation
                        v.start(eval_command(v.out_dir, eval_flags, threads), "eval.txt", env, "evaluating")
                elif v.status == "evaluating":
                    v.t_end = time.time()
                    if rc != 0:
                        v.status = f"failed: {last_line(v.out_dir / 'eval.txt')}"
                    elif not (v.out_dir / "scores.json").exists():
                        v.status = "failed: evaluation exited 0 but wrote no scores.json"
                    else:
                        v.status = "done"
                print(f"  {v.progress(time.time())}", flush=True)
            if time.time() - last_progress >= args.progress_every:
                last_progress = time.time()
                print(f"[{time.strftime('%H:%M:%S')}]", flush=True)
                for v in variants:
                    print(f"  {v.progress(last_progress)}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        stop_all(variants)

    rows = []
    for v in variants:
        row = dict(name=v.name, flags=v.flags, status=v.status, **summarise(v.out_dir))
        if row["status"] != "done":  # no scores for a run that did not finish: a scores.json there is an old one
            row.update(head=None, nmi=None, ari=None, acc=None, acc_h_maj={}, knn_row=None, knn_top1=None,
                       probe_top1=None, scores=None)
        row.update(train_s=(v.t_trained or v.t_end or time.time()) - v.t_start,
                   eval_s=((v.t_end or time.time()) - v.t_trained) if "evaluating" in v.commands else None,
                   wall_s=(v.t_end or time.time()) - v.t_start, returncodes=v.returncodes,
                   commands=v.commands)
        rows.append(row)
    rows = ranked(rows)
    print("\n" + format_table(rows), flush=True)
    table_path = Path(args.json) if args.json else out_dir / "table.json"
    table_path.write_text(json.dumps(rows, indent=2))
    print(f"wrote {table_path}", flush=True)
    return 130 if interrupted else 0


def stop_signal(signum, frame):
    raise KeyboardInterrupt


def stop_all(variants, grace_s=60):
    """Ctrl-C: SIGINT to every child still running (training saves a checkpoint and exits 130), then SIGKILL for
    those that have not exited after grace_s."""
    print("\ninterrupted: stopping every child", file=sys.stderr, flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not leave children behind
        signal.signal(sig, signal.SIG_IGN)
    running = [v for v in variants if v.process]
    for v in running:
        v.process.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reached them already; a `kill -INT` did not
    deadline = time.time() + grace_s
    for v in running:
        try:
            v.process.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            v.process.kill()
        v.returncodes[v.status] = v.finish_process()
        v.status, v.t_end = "interrupted", time.time()


# =====================================================================================================
# One run directory: summary and ledger row (scripts/cifar10_gpu.sh)
# =====================================================================================================
def machine(commit=None):
    """GPU name (nvidia-smi), torch version (its installed package, without importing it), the commit (given, else
    git's); 'unknown' for what cannot be found."""
    gpu = "no NVIDIA GPU"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        names = [l.strip() for l in out.stdout.splitlines() if l.strip()]
        if out.returncode == 0 and names:
            gpu = names[0] if len(names) == 1 else f"{len(names)} x {names[0]}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "unknown"
    if not commit:
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                                 timeout=30)
            commit = out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return dict(gpu=gpu, torch=torch_version, commit=commit or "unknown")


LEDGER_HEADER = ("| date | GPU | commit | command | minutes | epochs | images/s | ACC / NMI (head C=classes) "
                 "| kNN k=20 | probe |\n|---|---|---|---|---|---|---|---|---|---|")


def ledger_row(row, info, command, minutes, train_s=None, eval_s=None):
    times = ", ".join(t for t in [f"train {train_s:.0f} s" if train_s is not None else "",
                                  f"eval {eval_s:.0f} s" if eval_s is not None else ""] if t)
    cells = [datetime.date.today().isoformat(), f"{info['gpu']}, torch {info['torch']}", info["commit"],
             f"`{command}`", f"{minutes or '-'}" + (f" ({times})" if times else ""),
             "-" if row["epochs"] is None else f"{row['epochs']:g}",
             "-" if row["images_per_s"] is None else f"{row['images_per_s']:.0f}",
             f"{pct(row['acc'])} / {pct(row['nmi'])}" + (f" (C={row['head']})" if row["head"] else ""),
             pct(row["knn_top1"]) + ("" if row["knn_row"] in (None, "kNN k=20 (backbone)") else f" ({row['knn_row']})"),
             pct(row["probe_top1"])]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def summarise_command(args):
    run_dir = Path(args.summarise)
    if not run_dir.is_dir():
        print(f"error: --summarise {run_dir}: no such directory", file=sys.stderr)
        return 2
    row = summarise(run_dir)
    if args.ledger_command is None:
        print(json.dumps({k: v for k, v in row.items() if k != "scores"}, indent=2))
        return 0
    info = machine(args.ledger_commit)
    line = ledger_row(row, info, args.ledger_command, args.ledger_minutes, args.train_seconds, args.eval_seconds)
    (run_dir / "ledger-row.md").write_text(LEDGER_HEADER + "\n" + line + "\n")
    (run_dir / "summary.json").write_text(json.dumps(dict(row, **info, command=args.ledger_command,
                                                          minutes=args.ledger_minutes, train_s=args.train_seconds,
                                                          eval_s=args.eval_seconds), indent=2))
    print(LEDGER_HEADER + "\n" + line)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        raise SystemExit(summarise_command(args) if args.summarise else sweep(args))
    except KeyboardInterrupt:  # before the variants started (the bench); afterwards sweep() stops them itself
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
