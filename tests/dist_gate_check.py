"""Helper for test_antisd_e2e (not a test itself): run antisd.main under torchrun and save, per rank
and step, the token entropies of every teacher-pass row (the no-grad rows of a run with one
minibatch), so that a test can recompute the gate's statistics over the global batch.

    torchrun --nproc_per_node 2 tests/dist_gate_check.py OUT_DIR [antisd.py arguments]

Writes OUT_DIR/rank{R}.pt: a list over steps of lists of 1-D entropy tensors.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import antisd  # noqa: E402
import common  # noqa: E402

steps = [[]]
score, log = common.response_logprobs, common.RunLogger.log


def recording_score(model, prompts, responses, pad_id, chunk_size=512, **kwargs):
    logprobs, entropy, mask = score(model, prompts, responses, pad_id, chunk_size, **kwargs)
    if not torch.is_grad_enabled():
        steps[-1] += [row[row_mask].detach().clone() for row, row_mask in zip(entropy, mask)]
    return logprobs, entropy, mask


def counting_log(logger, step, metrics, prefix="step"):
    log(logger, step, metrics, prefix)
    if prefix == "step":
        steps.append([])


common.response_logprobs, common.RunLogger.log = recording_score, counting_log
out_dir = Path(sys.argv[1])
antisd.main(sys.argv[2:])
out_dir.mkdir(parents=True, exist_ok=True)
torch.save(steps[:-1], out_dir / f"rank{os.environ['RANK']}.pt")
