"""Comparison on the toy task (not collected by pytest): GRPO vs AntiSD vs default self-distillation.

    python tests/compare_antisd.py                    # 3 methods x 3 seeds, 60 steps each (~25 min on 2 cores)
    python tests/compare_antisd.py --seeds 0 --num_steps 30

Every run is `antisd.py` with its defaults plus the method's flags and `--eval_every 10`, one after
the other, under `--output_dir` (default runs/compare_antisd). A run whose metrics already hold its
final evaluation is not run again, so an interrupted comparison continues where it stopped and a
finished one only redraws. Prints a table (initial and final eval avg@4, mean and range over seeds;
steps until a run first reaches GRPO's mean final accuracy, the AntiSD paper's "fewer steps"
headline; the final share of careful rollouts) and writes one PNG of the eval curves and the
careful-strategy share over steps.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"GRPO": ["--lambda_max", "0"], "AntiSD": [], "SD": ["--signal", "sd"]}
EVAL_KEY = "eval/avg@4"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finished(records: list[dict], num_steps: int) -> bool:
    return any(r["step"] == num_steps and EVAL_KEY in r for r in records)


def run(method: str, seed: int, args) -> list[dict]:
    run_dir = Path(args.output_dir) / f"{method}_s{seed}"
    if not finished(read_metrics(run_dir), args.num_steps):
        command = [sys.executable, "antisd.py", *METHODS[method], "--seed", str(seed), "--num_steps",
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_steps", type=int, default=60)
    parser.add_argument("--output_dir", default="runs/compare_antisd")
    parser.add_argument("--png", default="", help="figure path (default <output_dir>/compare_antisd.png)")
    parser.add_argument("--quiet", action="store_true", help="hide the runs' own output")
    args = parser.parse_args()

    results = {method: [run(method, seed, args) for seed in args.seeds] for method in METHODS}
    grpo_final = [curve(r, EVAL_KEY)[1][-1] for r in results["GRPO"]]
    target = sum(grpo_final) / len(grpo_final)

    print(f"\n{len(args.seeds)} seeds x {args.num_steps} steps; eval avg@4 on the 256 toy test problems "
          f"(T 0.7, top-p 0.95); mean [min, max] over seeds")
    header = f"{'method':8} {'eval start':22} {'eval end':22} {'steps to GRPO final':22} {'careful share end':22}"
    print(header + "\n" + "-" * len(header))
    for method, runs in results.items():
        starts = [curve(r, EVAL_KEY)[1][0] for r in runs]
        finals = [curve(r, EVAL_KEY)[1][-1] for r in runs]
        reached = []
        for records in runs:
            steps, values = curve(records, EVAL_KEY)
            reached.append(next((s for s, v in zip(steps, values) if v >= target), None))
        hit = [s for s in reached if s is not None]
        reach_text = (f"{sum(hit) / len(hit):.0f} ({len(hit)}/{len(runs)} reached)" if hit else f"never (0/{len(runs)})")
        careful = [sum(curve(r, "careful_frac")[1][-5:]) / 5 for r in runs]
        print(f"{method:8} {spread(starts):22} {spread(finals):22} {reach_text:22} {spread(careful):22}")
    print(f"(GRPO's mean final accuracy, the target of 'steps to GRPO final': {target:.3f}; "
          "steps are eval points, every 10)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (method, runs), colour in zip(results.items(), ["tab:gray", "tab:red", "tab:blue"]):
        for axis, key, window in [(left, EVAL_KEY, 1), (right, "careful_frac", 5)]:
            curves = [curve(r, key) for r in runs]
            steps = curves[0][0]
            values = [smooth(v, window) for _, v in curves]
            columns = list(zip(*values))
            axis.plot(steps, [sum(c) / len(c) for c in columns], color=colour, label=method)
            axis.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=colour, alpha=0.15)
    left.set(title=f"eval avg@4 (mean, band = min-max over {len(args.seeds)} seeds)", xlabel="step", ylabel="accuracy")
    right.set(title="careful-strategy share of rollouts (5-step mean)", xlabel="step", ylabel="share")
    left.legend()
    figure.tight_layout()
    png = Path(args.png or Path(args.output_dir) / "compare_antisd.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=120)
    print(f"[compare] figure: {png}")


if __name__ == "__main__":
    main()
