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
from comparison import compare, parse_args  # noqa: E402

METHODS = {"OPD": ["--iw", "none"], "IW-OPD": [], "OPD first30": ["--iw", "none", "--token_slice", "first30"],
           "OPD last30": ["--iw", "none", "--token_slice", "last30"]}


def main():
    compare("iw_opd.py", METHODS, parse_args(__doc__, "compare_iw_opd"),
            {"gap first third": "gap_first_third", "gap last third": "gap_last_third",
             "careful share end": "careful_frac"}, teacher="toy-large")


if __name__ == "__main__":
    main()
