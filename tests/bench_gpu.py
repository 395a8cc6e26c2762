"""Benchmark (not collected by pytest): the pieces of one training step on a randomly initialised Qwen3.

    python tests/bench_gpu.py --shape 1.7b                          # one GPU (fp32 masters, bf16 autocast)
    torchrun --nproc_per_node 8 tests/bench_gpu.py --shape 8b       # 8 GPUs, FSDP2
    python tests/bench_gpu.py --shape tiny                          # CPU smoke run (what CI can do)
    python tests/bench_gpu.py --shape 1.7b --response_len 8192 --sequences 8 --micro_batch_tokens 16384

The first GPU session runs `tests/gpu_smoke.py` instead (README, "Memory per GPU and the CUDA
path"): it takes SHAPES, PEAK_TFLOPS, peak_tflops and count_params from here, loads through the real
loading path, and checks what this benchmark only times. `--shape 8b` needs several GPUs here (fp32
weights, gradients and AdamW state of 8.2 B parameters are 131 GB); gpu_smoke's 8b-slice measures
8B-wide layers on one GPU.

No download: the model is `Qwen3ForCausalLM(Qwen3Config(...))` with the published Qwen3 shapes
(`SHAPES`), random weights, seed 0 on every rank. Everything runs through the project's own code,
as the training scripts do: `common.load_plan` places it as `load_model` would (one process: plain
model, bf16 autocast on CUDA; torchrun: FSDP2 `_fully_shard`, fp32 shards, bf16 compute on CUDA), `HFEngine.generate` (weights gathered once per
call), `response_logprobs` under `micro_batches(--micro_batch_tokens)`, AdamW. Pieces, each timed
after one warm-up run on this rank's `--sequences` sequences (prompt `--prompt_len` random tokens,
response `--response_len` random tokens):
  generation        HFEngine, `--gen_new_tokens` new tokens per sequence, no stop token (all run to
                    the limit); tokens/s = generated tokens / seconds
  teacher pass      no-grad `response_logprobs` (the frozen-teacher / behaviour-policy pass)
  student fwd+bwd   `response_logprobs` with gradient, token-mean loss, backward
  optimizer step    AdamW step + zero_grad (sharded fp32 state)
Peak memory is `torch.cuda.max_memory_allocated` (and `max_memory_reserved`) of each piece (CPU:
the process's peak RSS so far, printed as such).
MFU of forward+backward = 6 x parameters x tokens / seconds / peak bf16 FLOP/s of
the GPU (`PEAK_TFLOPS` by device name, or --peak_tflops); parameters exclude the input embedding
(a lookup, no matmul) but include the output projection (also when tied); 6 N T ignores attention's
T^2 term and activation checkpointing's recomputation (as MFU conventionally does), so it
understates the hardware's work at long context. Timings are rank 0's (ranks do equal work).
"""

import argparse
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402  (sets PYTORCH_CUDA_ALLOC_CONF before CUDA starts)

# Published configs: Qwen/Qwen3-0.6B, -1.7B, -8B config.json (hidden, intermediate, layers, heads,
# kv heads, head_dim 128, vocab 151936; 0.6B and 1.7B tie the embeddings). tiny: a CPU smoke shape.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1024, tie_word_embeddings=False),
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}
# dense bf16 peak TFLOP/s per GPU (vendor data sheets, without sparsity), matched by device-name substring
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
               "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0, "L4": 121.0}


def peak_tflops(override: float) -> float | None:
    if override > 0:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def build_model(shape: str, dist_info, activation_checkpointing: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)  # the same random weights on every rank
    with torch.device(dist_info.device):  # fp32 masters built on the device (no host copy per rank)
        model = Qwen3ForCausalLM(config)
    plan = common.load_plan(dist_info.device.type, dist_info.world_size, trainable=True)  # as load_model places it
    if activation_checkpointing:
        common._enable_activation_checkpointing(model)
    if plan.shard:  # torchrun: FSDP2, fp32 shards, bf16 compute on CUDA
        common._fully_shard(model, dist_info, bf16_compute=plan.bf16_compute)
    elif plan.bf16_compute:  # one GPU: plain model, bf16 autocast
        common._autocast_forward(model, dist_info.device.type)
    return model


def count_params(model) -> int:
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is embedding
    return total if tied else total - embedding.numel()  # tied: the matrix is used as the output projection


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak_gib = (torch.cuda.max_memory_allocated() if self.cuda
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        self.reserved_gib = torch.cuda.max_memory_reserved() / 2**30 if self.cuda else None
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--sequences", type=int, default=8, help="sequences per rank")
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--response_len", type=int, default=1024, help="response tokens scored / trained")
    parser.add_argument("--gen_new_tokens", type=int, default=256, help="tokens generated per sequence")
    parser.add_argument("--gen_batch_tokens", type=int, default=262144, help="as the scripts' --gen_batch_tokens")
    parser.add_argument("--micro_batch_tokens", type=int, default=16384, help="as the scripts' --micro_batch_tokens")
    parser.add_argument("--logprob_chunk_size", type=int, default=512)
    parser.add_argument("--no_activation_checkpointing", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="peak bf16 TFLOP/s per device (MFU)")
    args = parser.parse_args()

    dist_info = common.init_distributed()
    device = dist_info.device
    if args.shape == "8b" and dist_info.world_size == 1 and device.type == "cuda":
        print("error: --shape 8b on one GPU needs 131 GB for fp32 weights, gradients and AdamW "
              "state: use torchrun --nproc_per_node 8, or tests/gpu_smoke.py --only 8b-slice",
              file=sys.stderr)
        sys.exit(2)
    model = build_model(args.shape, dist_info, not args.no_activation_checkpointing)
    params = count_params(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    vocab = SHAPES[args.shape]["vocab_size"]
    generator = torch.Generator().manual_seed(1 + dist_info.rank)
    prompts = [torch.randint(1, vocab, (args.prompt_len,), generator=generator).tolist()
               for _ in range(args.sequences)]
    responses = [torch.randint(1, vocab, (args.response_len,), generator=generator).tolist()
                 for _ in range(args.sequences)]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)  # no stop token: every row runs to the limit
    engine = common.HFEngine(model, tokenizer, batch_size=max(1, args.sequences),
                             batch_tokens=args.gen_batch_tokens)
    sampling = common.SamplingParams(temperature=1.0, max_new_tokens=args.gen_new_tokens)
    batches = common.micro_batches(range(args.sequences), lengths, args.sequences, args.micro_batch_tokens,
                                   same_count=True)
    tokens = sum(lengths)
    response_tokens = args.sequences * args.response_len

    def generation():
        engine.generate(prompts, sampling, desc="bench generate")

    def teacher_pass():
        with torch.no_grad():
            for batch in batches:
                common.response_logprobs(model, [prompts[i] for i in batch], [responses[i] for i in batch], 0,
                                         args.logprob_chunk_size)

    def student_pass():
        model.train()
        for batch in batches:
            logprobs, _, mask = common.response_logprobs(model, [prompts[i] for i in batch],
                                                         [responses[i] for i in batch], 0, args.logprob_chunk_size)
            (-(logprobs * mask).sum() / response_tokens * dist_info.world_size).backward()

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows = []
    for name, fn, count in [("generation", generation, args.sequences * args.gen_new_tokens),
                            ("teacher pass (no grad)", teacher_pass, tokens),
                            ("student fwd+bwd", student_pass, tokens),
                            ("optimizer step", optimizer_step, 0)]:
        if name == "optimizer step":
            student_pass()  # gradients to step on (the warm-up step below consumes them)
        fn()  # warm-up: allocator, kernels, FSDP lazy init
        if name == "optimizer step":
            student_pass()
        with Timer(device) as timer:
            fn()
        rows.append((name, timer.seconds, count, timer.peak_gib, timer.reserved_gib))

    peak = peak_tflops(args.peak_tflops)
    fwd_bwd_seconds = rows[2][1]
    mfu = 6 * params * tokens / fwd_bwd_seconds / (peak * 1e12) if peak else None
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS so far (CPU)"
    common.print0(f"[bench_gpu] shape {args.shape}: {params / 1e6:.2f} M parameters (without the input embedding), "
                  f"{dist_info.world_size} rank(s) on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
                  f"activation checkpointing {'off' if args.no_activation_checkpointing else 'on'}; per rank: "
                  f"{args.sequences} sequences x ({args.prompt_len} prompt + {args.response_len} response) tokens, "
                  f"{len(batches)} micro-batch(es) under --micro_batch_tokens {args.micro_batch_tokens}; "
                  f"generation {args.gen_new_tokens} new tokens per sequence")
    common.print0(f"{'piece':<24} {'seconds':>9} {'tokens':>9} {'tokens/s':>10} {'peak GiB':>9} "
                  f"{'reserved':>9}   ({memory})")
    for name, seconds, count, gib, reserved in rows:
        rate = f"{count / seconds:10.1f}" if count else f"{'-':>10}"
        reserved = f"{reserved:9.2f}" if reserved is not None else f"{'-':>9}"
        common.print0(f"{name:<24} {seconds:9.3f} {count if count else '-':>9} {rate} {gib:9.2f} "
                      f"{reserved}")
    common.print0("MFU of forward+backward: " + (f"{100 * mfu:.1f}% (6 N T / t / {peak:g} TFLOP/s)" if mfu is not None
                                                  else "n/a (no peak FLOP/s known for this device: pass --peak_tflops)"))
    if dist_info.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
