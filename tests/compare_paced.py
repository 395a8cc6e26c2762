"""Comparison on the toy task (not collected by pytest): PACED vs unweighted vs hard filter vs AKL,
all in `--mode distill` (the `toy` student from the `toy-large` teacher).

    python tests/compare_paced.py                     # 4 methods x 3 seeds, 60 steps each
    python tests/compare_paced.py --seeds 1 --quiet   # one seed (run seeds as parallel processes)

Every run is `paced.py` with its defaults (16 problems x k 8 per step, forward KL, lr 2e-4) plus the
method's flags and `--eval_every 10`, under `--output_dir` (default runs/compare_paced). A run whose
metrics already hold its final evaluation is not run again, so a finished comparison only redraws.
Prints a table (initial, final and best eval avg@4, mean and range over seeds; steps until a run first
reaches the unweighted baseline's mean final accuracy; problems trained per step and the careful
share over the last 5 steps) and writes one PNG of the eval curves and the careful-strategy share.
The teacher's accuracy, a reference line in the PNG, is measured the same way: one
`--eval_only --model toy-large` per seed under `--output_dir` (no training; cached likewise).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import (EVAL_KEY, curve, draw, last, parse_args,  # noqa: E402
                        reference_accuracy, run, spread, steps_to_reach)

METHODS = {"unweighted": ["--weighting", "none"], "PACED": [], "hard filter": ["--weighting", "hard"],
           "AKL": ["--weighting", "none", "--kl", "akl"]}

TEACHER = "toy-large"  # the scripts' default --teacher_model, drawn as a reference line


def main():
    args = parse_args(__doc__, "compare_paced")

    results = {method: [run("paced.py", method, flags, seed, args.num_steps, args.output_dir, args.quiet)
                        for seed in args.seeds] for method, flags in METHODS.items()}
    target = sum(curve(r, EVAL_KEY)[1][-1] for r in results["unweighted"]) / len(args.seeds)

    print(f"\n{len(args.seeds)} seeds x {args.num_steps} steps; eval avg@4 on the 256 toy test problems "
          f"(T 0.7, top-p 0.95); mean [min, max] over seeds")
    columns = ["method", "eval start", "eval end", "eval best", "steps to unweighted final", "problems trained",
               "careful share end"]
    widths = [12, 22, 22, 22, 26, 22, 22]
    header = " ".join(f"{c:{w}}" for c, w in zip(columns, widths))
    print(header + "\n" + "-" * len(header))
    for method, runs in results.items():
        evals = [curve(r, EVAL_KEY)[1] for r in runs]
        cells = [method, spread([v[0] for v in evals]), spread([v[-1] for v in evals]),
                 spread([max(v) for v in evals]), steps_to_reach(runs, target),
                 spread([last(r, "problems_trained") for r in runs]), spread([last(r, "careful_frac") for r in runs])]
        print(" ".join(f"{c:{w}}" for c, w in zip(cells, widths)))
    print(f"(unweighted's mean final accuracy, the target: {target:.3f}; steps are eval points, every 10; "
          "problems trained (of 16) and careful share: mean of the last 5 steps)")
    teacher = reference_accuracy("paced.py", TEACHER, args.seeds, args.output_dir, args.quiet)
    print(f"(the teacher {TEACHER}, evaluated alike (--eval_only, same seeds): {teacher:.3f})")
    draw(results, args.png, len(args.seeds),
         {f"teacher {TEACHER} (--eval_only, mean of {len(args.seeds)} seeds)": teacher})


if __name__ == "__main__":
    main()
