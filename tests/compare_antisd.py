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
from comparison import compare, parse_args  # noqa: E402

METHODS = {"GRPO": ["--lambda_max", "0"], "AntiSD": [], "SD": ["--signal", "sd"]}


def main():
    compare("antisd.py", METHODS, parse_args(__doc__, "compare_antisd"),
            {"careful share end": "careful_frac"})


if __name__ == "__main__":
    main()
