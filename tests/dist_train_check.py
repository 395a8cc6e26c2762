"""Helper for test_antisd_e2e (not a test itself): run antisd.main under torchrun and check, at
every checkpoint, that the full (gathered) parameters are identical on all ranks.

    torchrun --nproc_per_node 2 tests/dist_train_check.py [antisd.py arguments]
"""

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import antisd  # noqa: E402
import common  # noqa: E402

original_save = common.save_checkpoint


def save_and_compare(run_dir, step, model, *args, **kwargs):
    checksum = sum(float(p.full_tensor().double().sum()) * (i + 1) if hasattr(p, "full_tensor")
                   else float(p.double().sum()) * (i + 1) for i, p in enumerate(model.parameters()))
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, checksum)
    assert len(set(sums)) == 1, f"parameters differ across ranks at step {step}: {sums}"
    print(f"PARAMS-EQUAL rank {dist.get_rank()} step {step} checksum {checksum!r}", flush=True)
    return original_save(run_dir, step, model, *args, **kwargs)


common.save_checkpoint = save_and_compare
antisd.main(sys.argv[1:])
