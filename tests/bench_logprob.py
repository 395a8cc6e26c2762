"""Benchmark (not collected by pytest): chunked vs naive per-token log-prob + full-vocabulary entropy.

    python tests/bench_logprob.py                      # vocab 151,936, 4,096 positions, hidden 512
    python tests/bench_logprob.py --hidden 1024 --chunk 256

Each variant runs in a fresh subprocess on the CPU. "Peak extra memory" is the process's peak
resident memory during the computation minus its resident memory just before (inputs excluded);
time is the second of two runs. Two paths: no-grad (teacher / behaviour log-probs) and
forward+backward (the student's loss). Prints the ratios chunked / naive; targets: memory <= 1/4,
time <= 1.25x.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def naive(hidden, weight, targets):
    logprobs = torch.log_softmax(hidden @ weight.T, dim=-1)
    return logprobs.gather(-1, targets[:, None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)


def child(variant: str, grad: bool, vocab: int, positions: int, hidden_size: int, chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(positions, hidden_size, requires_grad=grad)
    weight = (0.02 * torch.randn(vocab, hidden_size)).requires_grad_(grad)
    targets = torch.randint(0, vocab, (positions,))
    mask = torch.ones(1, positions, dtype=torch.bool)

    def run():
        with torch.set_grad_enabled(grad):
            if variant == "naive":
                logp, entropy = naive(hidden, weight, targets)
            else:
                logp, entropy = common.token_logprob_entropy(lambda h: h @ weight.T, hidden[None], targets[None],
                                                             mask, chunk_size=chunk)
            if grad:
                (logp.sum() + 0.1 * entropy.sum()).backward()
                hidden.grad = weight.grad = None

    before = rss_bytes()
    run()
    peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    started = time.perf_counter()
    run()
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_extra_bytes": peak_extra}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--child", choices=["naive", "chunked"])
    parser.add_argument("--grad", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        return child(args.child, bool(args.grad), args.vocab, args.positions, args.hidden, args.chunk)
    print(f"vocab {args.vocab}, positions {args.positions}, hidden {args.hidden}, chunk {args.chunk}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for grad in (0, 1):
        results = {}
        for variant in ("naive", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--grad", str(grad), "--vocab",
                                  str(args.vocab), "--positions", str(args.positions), "--hidden", str(args.hidden),
                                  "--chunk", str(args.chunk)], capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        n, c = results["naive"], results["chunked"]
        label = "forward+backward" if grad else "no-grad forward"
        print(f"{label:17s} naive {n['peak_extra_bytes'] / 2**30:6.2f} GiB {n['seconds']:6.2f} s | chunked "
              f"{c['peak_extra_bytes'] / 2**30:6.2f} GiB {c['seconds']:6.2f} s | memory ratio "
              f"{c['peak_extra_bytes'] / n['peak_extra_bytes']:.3f}, time ratio {c['seconds'] / n['seconds']:.2f}")


if __name__ == "__main__":
    main()
