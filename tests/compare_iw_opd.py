"""Comparison on the toy task (not collected by pytest): OPD vs IW-OPD vs OPD on the first / last 30%.

    python tests/compare_iw_opd.py                    # 4 methods x 3 seeds, 60 steps each
    python tests/compare_iw_opd.py --seeds 0 --num_steps 30

The `toy` student learns from the `toy-large` teacher. Every run is `iw_opd.py` with its defaults
(64 prompts x 1 rollout per step) plus the method's flags and `--eval_every 10`, one after the
other, under `--output_dir` (default runs/compare_iw_opd). A run whose metrics already hold its
final evaluation is not run again, so an interrupted comparison continues where it stopped and a
finished one only redraws. Prints a table (initial, final and best eval avg@4, mean and range over
seeds; steps until a run first reaches OPD's mean final accuracy; the student-teacher gap |a_t| on
the first and last third of the rollouts over the last 5 steps; the final careful-strategy share)
and writes one PNG of the eval curves and the careful-strategy share over steps.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"OPD": ["--iw", "none"], "IW-OPD": [], "OPD first30": ["--iw", "none", "--token_slice", "first30"],
           "OPD last30": ["--iw", "none", "--token_slice", "last30"]}
EVAL_KEY = "eval/avg@4"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finished(records: list[dict], num_steps: int) -> bool:
    return any(r["step"] == num_steps and EVAL_KEY in r for r in records)


def run(method: str, seed: int, args) -> list[dict]:
    run_dir = Path(args.output_dir) / f"{method.replace(' ', '_')}_s{seed}"
    if not finished(read_metrics(run_dir), args.num_steps):
        command = [sys.executable, "iw_opd.py", *METHODS[method], "--seed", str(seed), "--num_steps",
                   str(args.num_steps), "--eval_every", "10", "--output_dir", args.output_dir,
                   "--run_name", run_dir.name, *(["--overwrite"] if run_dir.exists() else [])]
        print(f"[compare] {method} seed {seed}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
    return read_metrics(run_dir)


def curve(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def smooth(values: list[float], window: int = 5) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def last(records: list[dict], key: str, n: int = 5) -> float:
    values = curve(records, key)[1][-n:]
    return sum(values) / len(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_steps", type=int, default=60)
    parser.add_argument("--output_dir", default="runs/compare_iw_opd")
    parser.add_argument("--png", default="", help="figure path (default <output_dir>/compare_iw_opd.png)")
    parser.add_argument("--quiet", action="store_true", help="hide the runs' own output")
    args = parser.parse_args()

    results = {method: [run(method, seed, args) for seed in args.seeds] for method in METHODS}
    opd_final = [curve(r, EVAL_KEY)[1][-1] for r in results["OPD"]]
    target = sum(opd_final) / len(opd_final)

    print(f"\n{len(args.seeds)} seeds x {args.num_steps} steps; eval avg@4 on the 256 toy test problems "
          f"(T 0.7, top-p 0.95); mean [min, max] over seeds")
    columns = ["method", "eval start", "eval end", "eval best", "steps to OPD final", "gap first third",
               "gap last third", "careful share end"]
    widths = [12, 22, 22, 22, 20, 22, 22, 22]
    header = " ".join(f"{c:{w}}" for c, w in zip(columns, widths))
    print(header + "\n" + "-" * len(header))
    for method, runs in results.items():
        evals = [curve(r, EVAL_KEY) for r in runs]
        reached = [next((s for s, v in zip(*e) if v >= target), None) for e in evals]
        hit = [s for s in reached if s is not None]
        reach_text = f"{sum(hit) / len(hit):.0f} ({len(hit)}/{len(runs)})" if hit else f"never (0/{len(runs)})"
        cells = [method, spread([v[0] for _, v in evals]), spread([v[-1] for _, v in evals]),
                 spread([max(v) for _, v in evals]), reach_text,
                 spread([last(r, "gap_first_third") for r in runs]), spread([last(r, "gap_last_third") for r in runs]),
                 spread([last(r, "careful_frac") for r in runs])]
        print(" ".join(f"{c:{w}}" for c, w in zip(cells, widths)))
    print(f"(OPD's mean final accuracy, the target of 'steps to OPD final': {target:.3f}; steps are eval points, "
          "every 10; gaps and careful share: mean of the last 5 steps)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (method, runs), colour in zip(results.items(), ["tab:gray", "tab:red", "tab:blue", "tab:green"]):
        for axis, key, window in [(left, EVAL_KEY, 1), (right, "careful_frac", 5)]:
            curves = [curve(r, key) for r in runs]
            steps = curves[0][0]
            values = [smooth(v, window) for _, v in curves]
            columns_ = list(zip(*values))
            axis.plot(steps, [sum(c) / len(c) for c in columns_], color=colour, label=method)
            axis.fill_between(steps, [min(c) for c in columns_], [max(c) for c in columns_], color=colour, alpha=0.15)
    left.set(title=f"eval avg@4 (mean, band = min-max over {len(args.seeds)} seeds)", xlabel="step", ylabel="accuracy")
    right.set(title="careful-strategy share of rollouts (5-step mean)", xlabel="step", ylabel="share")
    left.legend()
    figure.tight_layout()
    png = Path(args.png or Path(args.output_dir) / "compare_iw_opd.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=120)
    print(f"[compare] figure: {png}")


if __name__ == "__main__":
    main()
