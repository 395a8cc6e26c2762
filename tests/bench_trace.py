"""Benchmark on the toy task (not collected by pytest): what a TRACE step costs next to a GRPO step.

    OMP_NUM_THREADS=1 python tests/bench_trace.py                    # oracle annotator, ~5 min on 2 cores
    OMP_NUM_THREADS=1 python tests/bench_trace.py --annotator self   # the policy annotates (generation)

One process runs `trace.py` in-process with the same seed and sizes, alternating GRPO (--lambda_0 0)
and TRACE (--kl_hold H --kl_end E) `--repeats` times each, so that a slow spell of a shared machine
hits both. Step k of a TRACE run is compared with step k of the GRPO runs (response lengths drift
alike over training): the KL window is steps 1..E-1 (step 0, the first, is warm-up and skipped), the
GRPO-only part steps E..N-1. Prints the median step time of each part and its ratio to GRPO's, as
wall-clock time and as this process's CPU time (with OMP_NUM_THREADS=1 the CPU time barely depends
on what else runs on a shared machine, the wall time does), and the median response tokens per
step (the runs' responses drift apart in length after the first update). Target after kl_end:
<= 1.1x.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as common_module  # noqa: E402
import trace  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_steps", type=int, default=16)
    parser.add_argument("--kl_hold", type=int, default=4)
    parser.add_argument("--kl_end", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--annotator", default="oracle")
    parser.add_argument("--num_problems", type=int, default=16)
    args = parser.parse_args()
    common = ["--num_steps", str(args.num_steps), "--num_problems", str(args.num_problems), "--eval_dataset", "",
              "--seed", "0", "--annotator_patience", "0"]  # the toy's self annotator never parses
    configs = {"GRPO": ["--lambda_0", "0"],
               "TRACE": ["--annotator", args.annotator, "--kl_hold", str(args.kl_hold), "--kl_end", str(args.kl_end)]}
    steps = {name: [] for name in configs}  # per run: list of (wall seconds, CPU seconds, tokens) per step
    cpu_marks = []
    log = common_module.RunLogger.log

    def marking_log(logger, step, metrics, prefix="step"):  # this process's CPU time at the end of each step
        if prefix == "step":
            cpu_marks.append(time.process_time())
        log(logger, step, metrics, prefix)

    common_module.RunLogger.log = marking_log
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.repeats):
            for name, flags in configs.items():
                run_dir = Path(out) / f"{name}_{repeat}"
                cpu_marks.clear()
                cpu_marks.append(time.process_time())
                trace.main([*common, *flags, "--output_dir", out, "--run_name", run_dir.name])
                records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                cpu = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
                steps[name].append([(r["step_seconds"], c, r["response_len"] * args.num_problems * 8)
                                    for r, c in zip(records, cpu)])

    def part(name, first, last, which):
        return statistics.median(run[k][which] for run in steps[name] for k in range(first, last))

    window, after = (1, args.kl_end), (args.kl_end, args.num_steps)
    print(f"\n{args.repeats} x GRPO and {args.repeats} x TRACE (--annotator {args.annotator}, kl_hold {args.kl_hold}, "
          f"kl_end {args.kl_end}), {args.num_steps} steps of {args.num_problems} problems x 8 rollouts, alternating; "
          "medians over steps and runs")
    for label, (first, last) in [("KL window", window), ("after kl_end", after)]:
        wall = part("GRPO", first, last, 0), part("TRACE", first, last, 0)
        cpu = part("GRPO", first, last, 1), part("TRACE", first, last, 1)
        tokens = part("GRPO", first, last, 2), part("TRACE", first, last, 2)
        print(f"{label:13} steps {first}-{last - 1}: wall GRPO {wall[0]:.3f} s, TRACE {wall[1]:.3f} s "
              f"({wall[1] / wall[0]:.2f}x); CPU GRPO {cpu[0]:.3f} s, TRACE {cpu[1]:.3f} s ({cpu[1] / cpu[0]:.2f}x); "
              f"response tokens per step GRPO {tokens[0]:.0f}, TRACE {tokens[1]:.0f}")


if __name__ == "__main__":
    main()
