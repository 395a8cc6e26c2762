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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import EVAL_KEY, curve, draw, last, parse_args, run, spread, steps_to_reach  # noqa: E402

METHODS = {"GRPO": ["--lambda_max", "0"], "AntiSD": [], "SD": ["--signal", "sd"]}


def main():
    args = parse_args(__doc__, "compare_antisd")

    results = {method: [run("antisd.py", method, flags, seed, args.num_steps, args.output_dir, args.quiet)
                        for seed in args.seeds] for method, flags in METHODS.items()}
    target = sum(curve(r, EVAL_KEY)[1][-1] for r in results["GRPO"]) / len(args.seeds)

    print(f"\n{len(args.seeds)} seeds x {args.num_steps} steps; eval avg@4 on the 256 toy test problems "
          f"(T 0.7, top-p 0.95); mean [min, max] over seeds")
    header = f"{'method':8} {'eval start':22} {'eval end':22} {'steps to GRPO final':22} {'careful share end':22}"
    print(header + "\n" + "-" * len(header))
    for method, runs in results.items():
        starts = [curve(r, EVAL_KEY)[1][0] for r in runs]
        finals = [curve(r, EVAL_KEY)[1][-1] for r in runs]
        careful = [last(r, "careful_frac") for r in runs]
        print(f"{method:8} {spread(starts):22} {spread(finals):22} {steps_to_reach(runs, target):22} "
              f"{spread(careful):22}")
    print(f"(GRPO's mean final accuracy, the target of 'steps to GRPO final': {target:.3f}; "
          "steps are eval points, every 10; careful share: mean of the last 5 steps)")
    draw(results, args.png, len(args.seeds))


if __name__ == "__main__":
    main()
