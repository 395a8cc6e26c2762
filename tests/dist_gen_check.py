"""Helper for test_generation (not a test itself): HFEngine on an FSDP2-sharded toy model under torchrun.

    torchrun --nproc_per_node 2 tests/dist_gen_check.py OUT_DIR

Per rank it counts FSDP2 all-gathers (each unit's `foreach_all_gather`) and every other collective
during one `generate` call, generates greedily under several batch budgets with a different number of
prompts on each rank (rank r gets 6 - 4r prompts: a rank in lockstep with the other would hang or
differ), samples with a fixed seed and sampler log-probs, then runs one training forward/backward to
show the reshard-after-forward settings came back. Writes OUT_DIR/rank{R}.pt.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

counts = {"all_gather": 0, "other": 0}
foreach_all_gather = _fsdp_param_group.foreach_all_gather


def counting_all_gather(*args, **kwargs):
    counts["all_gather"] += 1
    return foreach_all_gather(*args, **kwargs)


_fsdp_param_group.foreach_all_gather = counting_all_gather
for name in ["all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "reduce_scatter_tensor"]:
    def counting(*args, _original=getattr(dist, name), **kwargs):
        counts["other"] += 1
        return _original(*args, **kwargs)
    setattr(dist, name, counting)


def fsdp_units(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard_settings(model):
    return [any(g.post_forward_mesh_info is not None for g in m._get_fsdp_state()._fsdp_param_groups)
            for m in fsdp_units(model)]


def main(out_dir: Path):
    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer("toy")
    model = common.load_model("toy", dist_info)
    rows = common.make_toy_rows(8, seed=5)
    prompts = [common.build_prompt(tokenizer, r["problem"]) for r in rows][: 6 - 4 * dist_info.rank]
    units = len(fsdp_units(model))
    result = {"units": units, "prompts": prompts}

    greedy = common.SamplingParams(temperature=0, max_new_tokens=40)
    counts.update(all_gather=0, other=0)
    result["greedy"] = common.HFEngine(model, tokenizer, batch_size=64).generate(prompts, greedy)
    result["all_gathers"], result["other_collectives"] = counts["all_gather"], counts["other"]
    result["tokens"] = sum(len(r) for r in result["greedy"])
    result["budgets"] = {}
    for batch_size, batch_tokens in [(1, 0), (2, 0), (64, 150), (64, 1)]:
        engine = common.HFEngine(model, tokenizer, batch_size=batch_size, batch_tokens=batch_tokens)
        result["budgets"][(batch_size, batch_tokens)] = engine.generate(prompts, greedy)
    torch.manual_seed(7 + dist_info.rank)
    sampled = common.SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=40)
    result["sampled"], result["sampler_logprobs"] = common.HFEngine(model, tokenizer).generate(
        prompts, sampled, logprobs=True)
    result["settings_after"] = reshard_settings(model)
    # a training step right after generation: sharded again, the root not resharded after forward
    model.train()
    logprobs, _, mask = common.response_logprobs(model, prompts[:1], result["greedy"][:1], tokenizer.pad_token_id)
    (logprobs[mask].sum()).backward()
    result["grad_ok"] = all(p.grad is not None for p in model.parameters())
    result["sharded_after"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(result, out_dir / f"rank{os.environ['RANK']}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
