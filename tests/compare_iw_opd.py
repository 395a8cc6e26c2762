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
The teacher's accuracy, a reference line in the PNG, is measured the same way: one
`--eval_only --model toy-large` per seed under `--output_dir` (no training; cached likewise).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import (EVAL_KEY, curve, draw, last, parse_args,  # noqa: E402
                        reference_accuracy, run, spread, steps_to_reach)

METHODS = {"OPD": ["--iw", "none"], "IW-OPD": [], "OPD first30": ["--iw", "none", "--token_slice", "first30"],
           "OPD last30": ["--iw", "none", "--token_slice", "last30"]}

TEACHER = "toy-large"  # the scripts' default --teacher_model, drawn as a reference line


def main():
    args = parse_args(__doc__, "compare_iw_opd")

    results = {method: [run("iw_opd.py", method, flags, seed, args.num_steps, args.output_dir, args.quiet)
                        for seed in args.seeds] for method, flags in METHODS.items()}
    target = sum(curve(r, EVAL_KEY)[1][-1] for r in results["OPD"]) / len(args.seeds)

    print(f"\n{len(args.seeds)} seeds x {args.num_steps} steps; eval avg@4 on the 256 toy test problems "
          f"(T 0.7, top-p 0.95); mean [min, max] over seeds")
    columns = ["method", "eval start", "eval end", "eval best", "steps to OPD final", "gap first third",
               "gap last third", "careful share end"]
    widths = [12, 22, 22, 22, 20, 22, 22, 22]
    header = " ".join(f"{c:{w}}" for c, w in zip(columns, widths))
    print(header + "\n" + "-" * len(header))
    for method, runs in results.items():
        evals = [curve(r, EVAL_KEY)[1] for r in runs]
        cells = [method, spread([v[0] for v in evals]), spread([v[-1] for v in evals]),
                 spread([max(v) for v in evals]), steps_to_reach(runs, target),
                 spread([last(r, "gap_first_third") for r in runs]), spread([last(r, "gap_last_third") for r in runs]),
                 spread([last(r, "careful_frac") for r in runs])]
        print(" ".join(f"{c:{w}}" for c, w in zip(cells, widths)))
    print(f"(OPD's mean final accuracy, the target of 'steps to OPD final': {target:.3f}; steps are eval points, "
          "every 10; gaps and careful share: mean of the last 5 steps)")
    teacher = reference_accuracy("iw_opd.py", TEACHER, args.seeds, args.output_dir, args.quiet)
    print(f"(the teacher {TEACHER}, evaluated alike (--eval_only, same seeds): {teacher:.3f})")
    draw(results, args.png, len(args.seeds),
         {f"teacher {TEACHER} (--eval_only, mean of {len(args.seeds)} seeds)": teacher})


if __name__ == "__main__":
    main()
