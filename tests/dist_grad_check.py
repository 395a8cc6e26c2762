"""Helper for test_antisd_e2e (not a test itself): gradients of AntiSD's loss on a fixed batch.

    python tests/dist_grad_check.py OUT.pt MICRO            # 1 process, plain model
    torchrun --nproc_per_node 2 tests/dist_grad_check.py OUT.pt MICRO   # 2 ranks, FSDP2 (gloo)

Each rank takes half of 8 fixed sequences and `MICRO` sequences per backward; the loss is the
global token-mean, as in antisd.py. Rank 0 saves the full gradients, then one AdamW step is taken
and every rank checks that the gathered full parameters are identical on all ranks.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import antisd  # noqa: E402
import common  # noqa: E402


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main(out_path, micro):
    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer("toy")
    model = common.load_model("toy", dist_info)
    rows = common.make_toy_rows(8, seed=11)
    prompts = [common.build_prompt(tokenizer, r["problem"]) for r in rows]
    responses = [tokenizer(r["solution"], add_special_tokens=False).input_ids[: 3 + i] + [tokenizer.eos_token_id]
                 for i, r in enumerate(rows)]
    advantages = torch.linspace(-1.0, 1.0, 8)
    teacher_logprobs = -torch.rand(8, max(len(r) for r in responses), generator=torch.Generator().manual_seed(0))
    per_rank = 8 // dist_info.world_size
    mine = range(dist_info.rank * per_rank, (dist_info.rank + 1) * per_rank)
    num_tokens = common.all_reduce_sum(sum(len(responses[i]) for i in mine)).item()
    for start in range(mine.start, mine.stop, micro):
        batch = list(range(start, min(start + micro, mine.stop)))
        hidden, targets, mask = common.response_hidden(model, [prompts[i] for i in batch],
                                                       [responses[i] for i in batch], tokenizer.pad_token_id)
        logprobs, _ = common.token_logprob_entropy(common.output_head(model), hidden, targets, mask, chunk_size=5)
        u = torch.where(mask, teacher_logprobs[batch, : mask.shape[1]] - logprobs.detach(), 0.0)
        token_adv = advantages[batch][:, None] + 0.5 * antisd.token_signal(u)
        loss = antisd.policy_loss(logprobs, logprobs.detach(), token_adv, mask, num_tokens)
        (loss * dist_info.world_size).backward()
    grads = {name: full(p.grad).detach().clone() for name, p in model.named_parameters()}
    if dist_info.is_main:
        torch.save(grads, out_path)
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    checksum = sum(float(full(p.detach()).double().sum()) * (i + 1) for i, p in enumerate(model.parameters()))
    if dist.is_initialized():
        sums = [None] * dist_info.world_size
        dist.all_gather_object(sums, checksum)
        assert len(set(sums)) == 1, f"parameters differ across ranks: {sums}"
        dist.destroy_process_group()
    print(f"OK rank {dist_info.rank} checksum {checksum}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
