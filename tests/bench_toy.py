"""Measure the toy testbed (not collected by pytest): build time and every built-in premise.

    python tests/bench_toy.py                       # uses the toy cache (builds what is missing)
    python tests/bench_toy.py --fresh               # builds both toy models from nothing, timed

For `toy` and `toy-large`, over `--seeds` sampling seeds, 4 samples per test problem: eval avg@4 at
the scripts' eval setting (T 0.7, top-p 0.95) and at the rollout setting (T 1.0); the careful-strategy
share and the accuracy of careful and shortcut responses, overall and per level. Then the premises:
on correct `toy` rollouts, the self-teacher signal u = log pi(y|x,c) - log pi(y|x) on work and answer
tokens and at the strategy-deciding token (AntiSD); |log p_toy-large - log p_toy| on the first and
last thirds of `toy` rollouts (IW-OPD). Prints mean [min, max] over seeds.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from toy_premises import sample, self_teacher_u, strategy_accuracy, teacher_gap_by_third  # noqa: E402

NAMES = ["toy", "toy-large"]


def spread(values):
    return f"{statistics.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fresh", action="store_true", help="build both toy models in an empty cache, timed")
    args = parser.parse_args()

    if args.fresh:  # each build in its own process, as a first run would do it
        cache = tempfile.mkdtemp(prefix="toy-cache-")
        os.environ["RLVR_TOY_CACHE"] = cache
        for name in NAMES:
            started = time.time()
            subprocess.run([sys.executable, "-c", f"import common; common.build_toy_model({name!r})"],
                           cwd=Path(__file__).resolve().parents[1], check=True, stdout=subprocess.DEVNULL)
            print(f"build {name}: {time.time() - started:.0f} s (fresh cache {cache}, interpreter start included)")

    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer("toy")
    models = {name: common.load_model(name, dist_info, trainable=False) for name in NAMES}
    rows = common.load_problems("toy", "test")
    grader = common.Grader()
    levels = range(1, common.TOY_MAX_OPS + 1)
    for name, model in models.items():
        for temperature in (0.7, 1.0):
            tables, shares = [], []
            for seed in args.seeds:
                _, _, texts = sample(model, tokenizer, rows, seed, temperature)
                rewards, _ = grader.grade(texts, [r["answer"] for r in rows for _ in range(4)])
                tables.append(strategy_accuracy(rows, texts, rewards))
                shares.append(sum(map(common.writes_work, texts)) / len(texts))
            get = lambda key: [t.get(key, float("nan")) for t in tables]
            print(f"\n{name} at T {temperature}: avg@4 {spread(get(('all', 0)))}; careful share {spread(shares)}")
            for strategy in ("careful", "shortcut", "all"):
                per_level = "  ".join(f"L{level} {statistics.mean(get((strategy, level))):.2f}" for level in levels)
                print(f"  {strategy:9} {spread(get((strategy, 0)))}   per level (mean): {per_level}")

    # the premises on toy rollouts at the rollout temperature, 128 test problems x 4
    student, subset = models["toy"], rows[:128]
    premise, gaps = {}, {"first third": [], "last third": []}
    for seed in args.seeds:
        prompts, responses, texts = sample(student, tokenizer, subset, seed, 1.0)
        for key, (value, _) in self_teacher_u(student, tokenizer, subset, prompts, responses, texts).items():
            premise.setdefault(key, []).append(value)
        first, last = teacher_gap_by_third(student, models["toy-large"], tokenizer, prompts, responses)
        gaps["first third"].append(first)
        gaps["last third"].append(last)
    grader.close()
    print("\nAntiSD premise, mean u on correct toy rollouts (T 1.0, teacher shown the verified answer):")
    for key, values in premise.items():
        print(f"  u on {key:16} {spread(values)}")
    print("IW-OPD premise, mean |log p_toy-large - log p_toy| per token of toy rollouts (T 1.0):")
    for key, values in gaps.items():
        print(f"  {key:12} {spread(values)}")


if __name__ == "__main__":
    main()
