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
from comparison import compare, parse_args  # noqa: E402

METHODS = {"unweighted": ["--weighting", "none"], "PACED": [], "hard filter": ["--weighting", "hard"],
           "AKL": ["--weighting", "none", "--kl", "akl"]}


def main():
    compare("paced.py", METHODS, parse_args(__doc__, "compare_paced"),
            {"problems trained": "problems_trained", "careful share end": "careful_frac"},
            teacher="toy-large")


if __name__ == "__main__":
    main()
