"""Benchmark on the toy task (not collected by pytest): what a TRACE step costs next to a GRPO step.

    OMP_NUM_THREADS=1 python tests/bench_trace.py                    # oracle annotator, ~5 min on 2 cores
    OMP_NUM_THREADS=1 python tests/bench_trace.py --annotator self   # the policy annotates (generation)

One process runs `trace.py` in-process with the same seed and sizes, alternating GRPO (--lambda_0 0)
and TRACE (--kl_hold H --kl_end E) `--repeats` times each, so that a slow spell of a shared machine hits
both. Step k of a TRACE run is compared with step k of the GRPO runs (the responses' lengths drift alike
over training): the KL window is steps 1..E-1 (step 0, the first, is warm-up and skipped), the
GRPO-only part steps E..N-1. Prints the median step time of each part divided by GRPO's (medians: other work on a shared
machine makes single steps slow), and the same
per response token (which removes the difference in response lengths). Target after kl_end: <= 1.1x.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
              "--seed", "0"]
    configs = {"GRPO": ["--lambda_0", "0"],
               "TRACE": ["--annotator", args.annotator, "--kl_hold", str(args.kl_hold), "--kl_end", str(args.kl_end)]}
    steps = {name: [] for name in configs}  # per run: list of (step_seconds, tokens)
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.repeats):
            for name, flags in configs.items():
                run_dir = Path(out) / f"{name}_{repeat}"
                trace.main([*common, *flags, "--output_dir", out, "--run_name", run_dir.name])
                records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                steps[name].append([(r["step_seconds"], r["response_len"] * args.num_problems * 8) for r in records])

    def part(name, first, last):
        seconds = [run[k][0] for run in steps[name] for k in range(first, last)]
        per_token = [run[k][0] / run[k][1] for run in steps[name] for k in range(first, last)]
        return statistics.median(seconds), statistics.median(per_token)

    window, after = (1, args.kl_end), (args.kl_end, args.num_steps)
    print(f"\n{args.repeats} x GRPO and {args.repeats} x TRACE (--annotator {args.annotator}, kl_hold {args.kl_hold}, "
          f"kl_end {args.kl_end}), {args.num_steps} steps of {args.num_problems} problems x 8 rollouts, alternating")
    for label, (first, last) in [("KL window", window), ("after kl_end", after)]:
        grpo, traced = part("GRPO", first, last), part("TRACE", first, last)
        print(f"{label:13} steps {first}-{last - 1}: GRPO {grpo[0]:.3f} s/step, TRACE {traced[0]:.3f} s/step -> "
              f"ratio {traced[0] / grpo[0]:.2f}x step time, {traced[1] / grpo[1]:.2f}x time per response token")


if __name__ == "__main__":
    main()
