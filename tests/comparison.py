"""Shared by the toy comparisons (tests/compare_*.py): run a method's script for several seeds,
read the metrics back, summarise over seeds and draw the eval curves and the careful-strategy share."""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import read_metrics  # noqa: E402  (the records as the run stands, resumes applied)

EVAL_KEY = "eval/avg@4"


def parse_args(description: str, name: str) -> argparse.Namespace:
    """The options every comparison takes; runs go to runs/<name>/, the figure to <name>.png there."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_steps", type=int, default=60)
    parser.add_argument("--output_dir", default=f"runs/{name}")
    parser.add_argument("--png", default="", help=f"figure path (default <output_dir>/{name}.png)")
    parser.add_argument("--quiet", action="store_true", help="hide the runs' own output")
    args = parser.parse_args()
    args.png = Path(args.png or Path(args.output_dir) / f"{name}.png")
    return args


def finished(records: list[dict], num_steps: int) -> bool:
    return any(r["step"] == num_steps and EVAL_KEY in r for r in records)


def run(script: str, method: str, flags: list[str], seed: int, num_steps: int, output_dir: str,
        quiet: bool = False) -> list[dict]:
    """`script` with the method's flags, `--eval_every 10`, under `output_dir/<method>_s<seed>`;
    a run whose metrics already hold its final evaluation is not run again."""
    run_dir = Path(output_dir) / f"{method.replace(' ', '_')}_s{seed}"
    if not finished(read_metrics(run_dir), num_steps):
        command = [sys.executable, script, *flags, "--seed", str(seed), "--num_steps", str(num_steps),
                   "--eval_every", "10", "--output_dir", output_dir, "--run_name", run_dir.name,
                   *(["--overwrite"] if run_dir.exists() else [])]
        print(f"[compare] {method} seed {seed}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL if quiet else None)
    return read_metrics(run_dir)


def curve(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def last(records: list[dict], key: str, n: int = 5) -> float:
    """Mean of the last n logged values of `key`."""
    values = curve(records, key)[1][-n:]
    return sum(values) / len(values)


def smooth(values: list[float], window: int = 5) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def steps_to_reach(runs: list[list[dict]], target: float) -> str:
    """Mean first eval step at which a run's accuracy reaches `target`, and how many runs do."""
    reached = [next((s for s, v in zip(*curve(r, EVAL_KEY)) if v >= target), None) for r in runs]
    hit = [s for s in reached if s is not None]
    return f"{sum(hit) / len(hit):.0f} ({len(hit)}/{len(runs)} reached)" if hit else f"never (0/{len(runs)})"


def reference_accuracy(script: str, model: str, seeds: list[int], output_dir: str,
                       quiet: bool = False) -> float:
    """`model`'s eval avg@4 (mean over `seeds`) under the comparison's own evaluation: one
    `script --eval_only --model <model>` per seed under `output_dir/reference_<model>_s<seed>`
    (no training; a finished one is read back, not run again). The teacher's line in the figure."""
    values = []
    for seed in seeds:
        run_dir = Path(output_dir) / f"reference_{model}_s{seed}"
        measured = [r[EVAL_KEY] for r in read_metrics(run_dir) if EVAL_KEY in r]
        if not measured:
            command = [sys.executable, script, "--eval_only", "--model", model, "--seed", str(seed),
                       "--output_dir", output_dir, "--run_name", run_dir.name,
                       *(["--overwrite"] if run_dir.exists() else [])]
            print(f"[compare] reference {model} seed {seed}: {' '.join(command[1:])}", flush=True)
            subprocess.run(command, cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL if quiet else None)
            measured = [r[EVAL_KEY] for r in read_metrics(run_dir) if EVAL_KEY in r]
        values.append(measured[-1])
    return sum(values) / len(values)


def compare(script: str, methods: dict[str, list[str]], args: argparse.Namespace,
            columns: dict[str, str], teacher: str = "") -> None:
    """Run every method for every seed; print a table (eval avg@4 at the start, the end and its
    best, the steps to the first method's final accuracy, then `columns`: heading -> metric, the
    mean of its last 5 steps) and draw the figure, `teacher`'s eval-only accuracy as a line."""
    results = {method: [run(script, method, flags, seed, args.num_steps, args.output_dir,
                            args.quiet) for seed in args.seeds] for method, flags in methods.items()}
    baseline = next(iter(methods))
    target = sum(curve(r, EVAL_KEY)[1][-1] for r in results[baseline]) / len(args.seeds)
    print(f"\n{len(args.seeds)} seeds x {args.num_steps} steps; eval avg@4 on the 256 toy test "
          "problems (T 0.7, top-p 0.95); mean [min, max] over seeds")
    headings = ["eval start", "eval end", "eval best", f"steps to {baseline} final", *columns]
    header = f"{'method':12} " + " ".join(f"{h:26}" for h in headings)
    print(header + "\n" + "-" * len(header))
    for method, runs in results.items():
        evals = [curve(r, EVAL_KEY)[1] for r in runs]
        cells = [spread([v[0] for v in evals]), spread([v[-1] for v in evals]),
                 spread([max(v) for v in evals]), steps_to_reach(runs, target),
                 *(spread([last(r, key) for r in runs]) for key in columns.values())]
        print(f"{method:12} " + " ".join(f"{c:26}" for c in cells))
    print(f"({baseline}'s mean final accuracy, the target: {target:.3f}; steps are eval points, "
          f"every 10; {', '.join(columns)}: mean of the last 5 steps)")
    references = {}
    if teacher:
        accuracy = reference_accuracy(script, teacher, args.seeds, args.output_dir, args.quiet)
        print(f"(the teacher {teacher}, evaluated alike (--eval_only, same seeds): {accuracy:.3f})")
        references[f"teacher {teacher} (--eval_only, mean of {len(args.seeds)} seeds)"] = accuracy
    draw(results, args.png, len(args.seeds), references)


# The first method is the baseline: on top, black and dashed with open markers, so no curve hides
# it and it hides none; every method has its own colour, line style and marker.
STYLES = [dict(color="black", linestyle="--", marker="o", linewidth=2, fillstyle="none",
               markersize=7),
          dict(color="tab:red", linestyle="-", marker="s"),
          dict(color="tab:blue", linestyle="-.", marker="^"),
          dict(color="tab:green", linestyle=":", marker="D"),
          dict(color="tab:orange", linestyle=(0, (5, 1, 1, 1)), marker="v"),
          dict(color="tab:purple", linestyle=(0, (3, 1)), marker="P")]


def draw(results: dict[str, list[list[dict]]], png: Path, num_seeds: int,
         references: dict[str, float] | None = None):
    """One PNG: eval avg@4 (mean, min-max band over seeds) and the careful share (5-step mean), the
    first method (the baseline) on top; `references` ({label: accuracy}, e.g. the teacher's,
    measured) as horizontal lines on the accuracy panel. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for rank, ((method, runs), style) in enumerate(zip(results.items(), STYLES)):
        z = 10 if rank == 0 else 3 + rank * 0.1  # the baseline above every other curve
        for axis, key, window in [(left, EVAL_KEY, 1), (right, "careful_frac", 5)]:
            curves = [curve(r, key) for r in runs]
            steps = curves[0][0]
            columns = list(zip(*[smooth(v, window) for _, v in curves]))
            axis.plot(steps, [sum(c) / len(c) for c in columns], label=method, zorder=z,
                      markevery=max(1, len(steps) // 6), **{"markersize": 4, **style})
            axis.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns],
                              color=style["color"], alpha=0.1, zorder=1)
    for (label, value), colour in zip((references or {}).items(), ["tab:brown", "tab:olive"]):
        left.axhline(value, color=colour, linestyle=(0, (1, 1)), linewidth=1.5, zorder=2,
                     label=f"{label}: {value:.3f}")
    if references:  # room above the highest reference line, so it does not sit on the frame
        low, high = left.get_ylim()
        left.set_ylim(low, max(high, max(references.values()) + 0.1 * (high - low)))
    left.set(title=f"eval avg@4 (mean, band = min-max over {num_seeds} seeds)", xlabel="step",
             ylabel="accuracy")
    right.set(title="careful-strategy share of rollouts (5-step mean)", xlabel="step", ylabel="share")
    # one legend below both panels: inside, it would cover curves
    figure.legend(*left.get_legend_handles_labels(), loc="lower center", fontsize=8, frameon=False,
                  ncol=len(results) + len(references or {}))
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=120)
    print(f"[compare] figure: {png}")
    plt.close(figure)
    return figure
