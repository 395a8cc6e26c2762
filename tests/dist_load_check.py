"""Helper for test_cuda_path (not a test itself): under torchrun, `common.load_model` builds the
sharded model on the meta device and only rank 0 reads the weights. Check that every rank's model
equals a plain single-process `from_pretrained` model exactly: full weights (tied embeddings
included), buffers (rotary inv_freq, in no state dict), logits, for a trainable and a frozen
(`trainable=False`) load, and `copy_weights` between the two.

    torchrun --nproc_per_node 2 tests/dist_load_check.py [a bf16 copy of the toy model]
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def check_equal(model, reference, ids, what):
    # every parameter and buffer, gathered, bit for bit; tied embeddings still one parameter
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, want in reference.named_parameters(remove_duplicate=False):
        got = full(params[name].detach())
        assert got.dtype == want.dtype and torch.equal(got, want.detach()), f"{what}: parameter {name} differs"
    assert model.lm_head.weight is model.model.embed_tokens.weight, f"{what}: embeddings are no longer tied"
    buffers = dict(model.named_buffers())
    assert buffers.keys() == dict(reference.named_buffers()).keys() and buffers, f"{what}: buffers differ"
    for name, want in reference.named_buffers():
        assert torch.equal(buffers[name], want), f"{what}: buffer {name} differs"
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers())), f"{what}: meta left"
    assert model.generation_config.eos_token_id == reference.generation_config.eos_token_id
    assert model.training == reference.training
    assert all(isinstance(p, DTensor) for p in model.parameters()), f"{what}: not sharded"
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    model.reshard()  # FSDP2 keeps the root gathered after a forward; back to shards for what follows
    assert torch.equal(got, want), f"{what}: logits differ by {(got - want).abs().max()}"
    print(f"LOAD-EQUAL rank {dist.get_rank()} {what}", flush=True)


def main():
    from transformers import AutoModelForCausalLM

    dist_info = common.init_distributed()
    assert dist_info.world_size == 2
    path = common.build_toy_model("toy")
    reference = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(3, reference.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    policy = common.load_model("toy", dist_info)
    check_equal(policy, reference, ids, "trainable")
    assert all(p.requires_grad for p in policy.parameters())
    frozen = common.load_model("toy", dist_info, trainable=False)
    check_equal(frozen, reference, ids, "frozen")
    assert not any(p.requires_grad for p in frozen.parameters())
    # copy_weights: change the policy, copy it into the frozen copy, compare with the same change made plainly
    with torch.no_grad():
        for (name, param), (_, plain) in zip(policy.named_parameters(), reference.named_parameters()):
            param.mul_(1.5)
            plain.mul_(1.5)
    common.copy_weights(frozen, policy)
    check_equal(frozen, reference, ids, "copy_weights")
    if len(sys.argv) > 1:  # a bf16 checkpoint: rank 0 reads it in bf16, the fp32 shards hold the exact upcast
        bf16_dir = sys.argv[1]
        plain = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)
        check_equal(common.load_model(bf16_dir, dist_info), plain, ids, "bf16 checkpoint")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
