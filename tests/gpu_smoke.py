"""GPU smoke test (not collected by pytest): one offline command that proves or breaks the README's
CUDA claims in a few minutes of GPU time, so that it can run twice in a short GPU lease.

    python tests/gpu_smoke.py --prepare                   # once, with PyPI: toy models + wheels
    python tests/gpu_smoke.py --out smoke.jsonl           # on the GPU machine, offline (~7 min)
    python tests/gpu_smoke.py --device cpu --out s.jsonl  # tiny shapes (CI: test_gpu_smoke.py)

`--prepare` copies the toy models into `tests/.smoke/toy` (built first if needed) and downloads
the math-verify wheels for CPython 3.12 x86-64 into `tests/.smoke/wheels`; `tests/.smoke/` is
ignored by git and travels with the repository to the GPU machine (the device tool's `carry`),
where the run installs the wheels into its work folder when math-verify is missing and reads the
toy models from there (RLVR_TOY_CACHE).

Each check runs in its own process (torchrun --nproc_per_node 1 where it needs a process group)
with its own timeout, under a global deadline (`--deadline`, default 420 s): a hang or an
out-of-memory loses that check only. One JSON line per check is appended to `--out`; a table sums
up at the end; the exit status is 1 when a check failed or timed out. `--only a,b` runs some of them
again. Random weights from a config (no download); shapes are the published Qwen3 ones
(`bench_gpu.SHAPES`) on CUDA and `tiny` on CPU, where memory and MFU figures are null.

  env         GPU, free memory, torch / transformers / NCCL versions, which SDPA kernels run in
              bf16, the allocator config, whether math-verify, datasets and vllm import
  script-*    each script, 3 toy steps with a checkpoint at step 2 (and the end), then the step-2
              checkpoint resumed for step 3: exit codes, finite losses, step 3 equal to the
              uninterrupted run, the HF export's dtype (bf16 on CUDA) and the DCP state's (fp32).
              On CPU only antisd runs (each script's resume is tested in its own test file)
  fsdp        torchrun, one rank (NCCL on CUDA): `_load_sharded` from an HF folder of a random
              Qwen3 (0.6B shape), equal to from_pretrained; one `HFEngine.generate` with gathered
              weights (KV-cache dtype); forward+backward; AdamW; `save_checkpoint` (DCP + export)
              and `load_checkpoint` into a fresh model: weights and AdamW state equal
  logprob     |d log p| and |d entropy| of the bf16 paths (one-GPU fp32 masters under autocast; the
              frozen bf16 teacher) against all-fp32, for the toy on its own samples and a random
              Qwen3-1.7B on random tokens
  1.7b        one GPU, `load_model` of a random Qwen3-1.7B: forward+backward of one 33,280-token
              sequence (MFU, peak allocated / reserved against the README's table), the AdamW step,
              then a generation batch (tokens/s, ms per decode step, KV bytes per position, dtypes)
  8b-score    a frozen bf16 Qwen3-8B (as `load_plan` places a teacher) scoring 16,384 tokens
  8b-slice    torchrun, one rank, FSDP2 bf16 compute: Qwen3-8B width with 2 and 4 decoder layers,
              forward+backward at 33,280 tokens: activation memory per layer and time per layer,
              extrapolated to 36 layers (memory, MFU) against the README

MFU = 6 N T / t / peak bf16 FLOP/s (`bench_gpu.PEAK_TFLOPS`), N without the input embedding; it
ignores attention's T^2 term and checkpointing's recompute, so it understates the work at 33K.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / "tests" / ".smoke"  # --prepare writes it; carried to the GPU machine; git-ignored
# math-verify and what it needs beyond the GPU machine's packages (sympy is there): the versions
# installed here, else these (math-verify 0.9.0 pins latex2sympy2_extended 1.11.0)
WHEELS = {"math-verify": "0.9.0", "latex2sympy2_extended": "1.11.0",
          "antlr4-python3-runtime": "4.13.2"}
GIB = 2**30

# name -> (timeout on CUDA, timeout on CPU, launcher); run in this order, the scripts side by side
CHECKS = {
    "env": (60, 30, "python"),
    "script-antisd": (200, 60, "python"),
    "script-trace": (200, 60, "python"),
    "script-paced": (200, 60, "python"),
    "script-iw_opd": (200, 60, "python"),
    "fsdp": (150, 60, "torchrun"),
    "logprob": (120, 40, "python"),
    "1.7b": (180, 40, "python"),
    "8b-score": (120, 40, "python"),
    "8b-slice": (180, 60, "torchrun"),
}
# checks skipped with --device cpu (CI time), and why
CPU_SKIPS = {f"script-{name}": "CPU: antisd stands for the four (each script's resume is tested in "
                               "its own tests/test_*.py); all four run on CUDA"
             for name in ("trace", "paced", "iw_opd")}
# the README's derived figures each check measures (section "Memory per GPU and the CUDA path")
README = {
    "1.7b_training_gib": 44.0,          # one 80 GB GPU, 33,280-token sequence, training total
    "1.7b_kv_bytes_per_position": 112 * 1024,
    "1.7b_decode_ms_per_step": 25.0,    # floor 5-6 ms + assumed 20 ms launch overhead
    "8b_act_bytes_per_token_layer": 8 * 1024,  # checkpointed layer input, bf16
    "8b_activation_terms_gib": 21.0,    # 9.1 checkpointed + 9.1 recomputed + 2.0 logits + 0.8 final
}


class Expect:
    """Figures of a check plus the expectations that failed (the check fails if any did)."""

    def __init__(self):
        self.figures, self.failed = {}, []

    def __call__(self, ok: bool, what: str) -> None:
        if not ok:
            self.failed.append(what)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the checks (they run in the child processes)
# ---------------------------------------------------------------------------------------------


def device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak():
    import torch

    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peaks() -> dict:
    """Peak allocated / reserved GiB since the last reset_peak (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    sync()
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}


def allocated_gib() -> float | None:
    import torch

    return round(torch.cuda.memory_allocated() / GIB, 3) if torch.cuda.is_available() else None


def mfu(flops: float, seconds: float) -> float | None:
    import bench_gpu

    peak = bench_gpu.peak_tflops(0.0)
    return round(flops / seconds / (peak * 1e12), 4) if peak and seconds > 0 else None


def shape_name(cuda_shape: str) -> str:
    return cuda_shape if device().type == "cuda" else "tiny"


def qwen3_config(shape: str, **overrides):
    import bench_gpu
    from transformers import Qwen3Config

    return Qwen3Config(**{**bench_gpu.SHAPES[shape], **overrides}, max_position_embeddings=40960,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, eos_token_id=None, pad_token_id=0)


def random_model(config, dtype, where):
    """A Qwen3 with random weights (seed 0) built directly on `where`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(where):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def random_model_folder(shape: str, workdir: str) -> Path:
    """An HF folder (bf16 safetensors, as hub models are) of a random Qwen3 of `shape` (seed 0),
    made once per work folder: later checks reuse it."""
    import torch

    folder = Path(workdir) / f"random-qwen3-{shape}"
    if (folder / "config.json").is_file():
        return folder
    model = random_model(qwen3_config(shape), torch.bfloat16, device())
    model.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def random_tokens(count: int, vocab: int, seed: int) -> list[int]:
    import torch

    return torch.randint(1, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


class CacheRecorder:
    """Records the dtype and per-position bytes of every KV-cache layer an HF forward writes
    (patches DynamicCache.update, which the engine's cache class calls)."""

    def __enter__(self):
        from transformers import DynamicCache

        self.update, self.layers = DynamicCache.update, {}
        recorder = self

        def update(cache, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = recorder.update(cache, key_states, value_states, layer_idx,
                                           *args, **kwargs)
            per_position = sum(t.shape[1] * t.shape[3] * t.element_size() for t in (keys, values))
            recorder.layers[layer_idx] = (str(keys.dtype), str(values.dtype), per_position)
            return keys, values

        DynamicCache.update = update
        return self

    def __exit__(self, *exc):
        from transformers import DynamicCache

        DynamicCache.update = self.update
        return False

    def figures(self) -> dict:
        return {"kv_key_dtypes": sorted({k for k, _, _ in self.layers.values()}),
                "kv_value_dtypes": sorted({v for _, v, _ in self.layers.values()}),
                "kv_bytes_per_position": sum(b for _, _, b in self.layers.values())}


def no_stop_tokenizer():
    return SimpleNamespace(pad_token_id=0, eos_token_id=None)  # every row runs to the limit


def train_pass(model, prompts, responses) -> tuple[float, int | None]:
    """Token-mean NLL of the responses, backward: the student's forward+backward. Returns the loss
    and the bytes allocated between forward and backward (CUDA): what was resident plus what the
    forward saved for the backward (checkpointed layer inputs, logits chunks, final hidden)."""
    import torch

    import common

    model.train()
    logprobs, _, mask = common.response_logprobs(model, prompts, responses, 0)
    loss = -(logprobs * mask).sum() / mask.sum()
    after_forward = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    loss.backward()
    return float(loss), after_forward


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_env(expect: Expect, args) -> None:
    import importlib.util

    import torch
    import transformers

    import common  # noqa: F401  (sets the allocator config, as the scripts do)

    cuda = torch.cuda.is_available()
    figures = {"python": sys.version.split()[0], "torch": torch.__version__,
               "transformers": transformers.__version__, "cuda": torch.version.cuda,
               "cuda_available": cuda, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
               "toy_cache": os.environ.get("RLVR_TOY_CACHE")}
    for name in ("math_verify", "datasets", "vllm"):
        figures[f"{name}_importable"] = importlib.util.find_spec(name) is not None
    expect(figures["math_verify_importable"],
           "math-verify does not import (run --prepare, carry tests/.smoke)")
    if cuda:
        free, total = torch.cuda.mem_get_info()
        props = torch.cuda.get_device_properties(0)
        figures.update(gpu=torch.cuda.get_device_name(),
                       capability=list(torch.cuda.get_device_capability()),
                       multiprocessors=props.multi_processor_count, total_gib=round(total / GIB, 1),
                       free_gib=round(free / GIB, 1), nccl=str(torch.cuda.nccl.version()),
                       bf16_supported=torch.cuda.is_bf16_supported())
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
                figures[f"sdpa_{backend.name.lower()}"] = True
            except Exception:  # this kernel does not run here (RuntimeError and others)
                figures[f"sdpa_{backend.name.lower()}"] = False
        expect(figures["sdpa_flash_attention"] or figures["sdpa_efficient_attention"],
               "no memory-efficient SDPA kernel runs (the README's memory assumes one)")
        import bench_gpu

        figures["peak_tflops_assumed"] = bench_gpu.peak_tflops(0.0)
    expect.figures.update(figures)


SCRIPT_FLAGS = {"antisd": ["--num_generations", "4"],
                # resumed between two refreshes of the frozen teacher copy (every 10 steps): the
                # copy comes from the checkpoint
                "trace": ["--num_generations", "4", "--annotator", "oracle"],
                "paced": ["--k", "4"],
                "iw_opd": ["--num_rollouts", "4"]}
SCRIPT_COMMON = ["--num_problems", "4", "--max_new_tokens", "24", "--eval_dataset", "",
                 "--rollout", "hf", "--num_steps", "3", "--save_every", "2", "--seed", "0"]
TIMING_KEYS = ("_seconds", "_per_second")  # wall-clock figures, which a resume does not repeat


def check_script(expect: Expect, args, script: str) -> None:
    import torch

    import common
    from safetensors import safe_open
    from torch.distributed.checkpoint import FileSystemReader

    work = Path(args.workdir) / script
    shutil.rmtree(work, ignore_errors=True)
    base = [sys.executable, f"{script}.py", *SCRIPT_COMMON, *SCRIPT_FLAGS[script],
            "--output_dir", str(work)]

    def run(name, *extra):
        started = time.time()
        done = subprocess.run([*base, "--run_name", name, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        print(done.stdout[-3000:], flush=True)
        expect.figures[f"{name}_seconds"] = round(time.time() - started, 1)
        expect(done.returncode == 0, f"{name} run exited {done.returncode}")
        return done

    run("full")
    full = work / "full"
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    expect.figures["losses"] = [r["loss"] for r in steps]
    expect(len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps), "3 finite losses")
    checkpoint = full / "checkpoints" / "step_000002"
    config = json.loads((checkpoint / "config.json").read_text())
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as weights:
        export = sorted({str(weights.get_slice(k).get_dtype()) for k in weights.keys()})
    state = FileSystemReader(str(checkpoint / "train_state")).read_metadata().state_dict_metadata
    trained = sorted({str(m.properties.dtype) for k, m in state.items()
                      if k.startswith("model.") and hasattr(m, "properties")})
    expect.figures.update(export_config_dtype=config.get("dtype"), export_dtypes=export,
                          train_state_dtypes=trained)
    want, tag = ("bfloat16", "BF16") if torch.cuda.is_available() else ("float32", "F32")
    expect(config.get("dtype") == want and export == [tag], f"HF export in {want}")
    expect(trained == ["torch.float32"], "DCP training state in fp32")

    shutil.copytree(full, work / "resumed")
    shutil.rmtree(work / "resumed" / "checkpoints" / "step_000003")
    resumed = run("resumed", "--resume")
    expect("(step 2)" in resumed.stdout, "resumed from the step-2 checkpoint")
    again = common.read_metrics(work / "resumed")  # the resume supersedes the old step 3
    step3 = [r for r in again if r.get("step") == 3 and "loss" in r]
    expect(len(step3) == 1, "one step-3 record after the resume")
    if step3:
        want, got = steps[-1], step3[0]
        keys = [k for k in want if not k.endswith(TIMING_KEYS)]
        both_nan = {k for k in keys if isinstance(want[k], float) and math.isnan(want[k])
                    and isinstance(got.get(k), float) and math.isnan(got[k])}
        diffs = {k: abs(want[k] - got.get(k, math.inf)) for k in keys if k not in both_nan}
        worst = max(diffs, key=diffs.get)
        expect.figures.update(resume_exact=all(d == 0 for d in diffs.values()),
                              resume_worst_key=worst, resume_worst_abs_diff=diffs[worst])
        # CPU: bit for bit (as the tests require); CUDA kernels may reorder sums between processes
        tolerance = 0.0 if not torch.cuda.is_available() else 1e-3
        expect(all(d <= tolerance * max(1.0, abs(want[k])) for k, d in diffs.items()),
               f"step 3 after resume equal to the uninterrupted run (tolerance {tolerance})")


def check_fsdp(expect: Expect, args) -> None:
    import torch
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import common

    dist_info = common.init_distributed()
    cuda = dist_info.device.type == "cuda"
    expect.figures.update(backend=dist.get_backend(), world_size=dist_info.world_size)
    folder = Path(args.workdir) / f"random-qwen3-{shape_name('0.6b')}"
    if dist_info.is_main:
        random_model_folder(shape_name("0.6b"), args.workdir)
    dist.barrier()
    plan = common.LoadPlan(shard=True, dtype=torch.float32, bf16_compute=cuda,
                           activation_checkpointing=cuda)

    def load():
        return common._load_sharded(str(folder), dist_info, plan, plan.activation_checkpointing,
                                    "--model")

    started = time.time()
    model = load()
    expect.figures["load_seconds"] = round(time.time() - started, 1)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    same = all(torch.equal(p.full_tensor().cpu(), reference.get_parameter(name))
               for name, p in model.named_parameters())
    expect.figures["load_equal_from_pretrained"] = same
    expect(same, "sharded load equal to from_pretrained")
    del reference

    vocab = model.config.vocab_size
    prompts = [random_tokens(16 + 4 * i, vocab, i) for i in range(4)]
    engine = common.HFEngine(model, no_stop_tokenizer(), batch_size=4)
    with CacheRecorder() as cache:
        responses = engine.generate(prompts, common.SamplingParams(max_new_tokens=8))
    expect.figures.update(cache.figures())
    expect([len(r) for r in responses] == [8] * 4, "8 tokens generated per prompt")
    expect(cache.figures()["kv_key_dtypes"] == [str(torch.bfloat16 if cuda else torch.float32)],
           "KV cache in the compute dtype")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, _ = train_pass(model, prompts, responses)
    grads_finite = all(bool(torch.isfinite(p.grad.to_local()).all()) for p in model.parameters())
    before = model.model.norm.weight.full_tensor().clone()
    optimizer.step()
    expect.figures.update(loss=loss, grads_finite=grads_finite)
    expect(math.isfinite(loss) and grads_finite, "finite loss and gradients")
    moved = not torch.equal(before, model.model.norm.weight.full_tensor())
    expect(moved, "AdamW moved the weights")

    tokenizer = common.load_tokenizer("toy")  # saved beside the export, as the scripts do
    started = time.time()
    path = common.save_checkpoint(Path(args.workdir) / "fsdp-run", 1, model, tokenizer, optimizer,
                                  {"k": 1}, dist_info)
    expect.figures["save_seconds"] = round(time.time() - started, 1)
    fresh = load()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    started = time.time()
    common.load_checkpoint(path, fresh, fresh_optimizer, dist_info)
    expect.figures["load_checkpoint_seconds"] = round(time.time() - started, 1)
    weights_equal = all(torch.equal(a.full_tensor(), b.full_tensor())
                        for a, b in zip(model.parameters(), fresh.parameters()))
    states_equal = all(torch.equal(a[key].full_tensor(), b[key].full_tensor())
                       for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values())
                       for key in ("exp_avg", "exp_avg_sq"))
    expect.figures.update(weights_equal_after_load=weights_equal,
                          adam_equal_after_load=states_equal)
    expect(weights_equal and states_equal, "weights and AdamW state equal after DCP save and load")
    if dist_info.is_main:
        with safe_open(str(path / "model.safetensors"), "pt") as weights:
            expect.figures["export_dtypes"] = sorted({str(weights.get_slice(k).get_dtype())
                                                      for k in weights.keys()})
        expect(expect.figures["export_dtypes"] == (["BF16"] if cuda else ["F32"]), "export dtype")
    dist.destroy_process_group()


def logprob_gaps(reference, other, prompts, responses) -> dict:
    import torch

    import common

    with torch.no_grad():
        want_lp, want_h, mask = common.response_logprobs(reference, prompts, responses, 0)
        got_lp, got_h, _ = common.response_logprobs(other, prompts, responses, 0)
    lp, h = (got_lp - want_lp).abs()[mask], (got_h - want_h).abs()[mask]
    return {"mean_abs_dlogp": float(lp.mean()), "max_abs_dlogp": float(lp.max()),
            "mean_abs_dentropy": float(h.mean()), "max_abs_dentropy": float(h.max())}


def check_logprob(expect: Expect, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import common

    where = device()
    single = common.Dist(0, 1, 0, where)
    toy = common.build_toy_model("toy")
    folder = random_model_folder(shape_name("1.7b"), args.workdir)
    for label, path in (("toy", toy), ("random_" + shape_name("1.7b"), folder)):
        fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(where).eval()
        if label == "toy":
            tokenizer = common.load_tokenizer("toy")
            prompts = [common.build_prompt(tokenizer, row["problem"])
                       for row in common.make_toy_rows(32, 5)]
            torch.manual_seed(0)
            responses = common.HFEngine(fp32, tokenizer).generate(
                prompts, common.SamplingParams(temperature=1.0, max_new_tokens=32))
        else:
            prompt, response = (64, 448) if where.type == "cuda" else (16, 48)
            vocab = fp32.config.vocab_size
            prompts = [random_tokens(prompt, vocab, 10 + i) for i in range(4)]
            responses = [random_tokens(response, vocab, 20 + i) for i in range(4)]
        # the paths as load_plan places them on CUDA; on CPU the same casts by hand
        if where.type == "cuda":
            autocast = common.load_model(str(path), single)
            frozen = common.load_model(str(path), single, trainable=False)
        else:
            autocast = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            common._autocast_forward(autocast, "cpu")
            frozen = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        for name, model in (("fp32_masters_autocast", autocast), ("frozen_bf16", frozen)):
            gaps = logprob_gaps(fp32, model, prompts, responses)
            expect.figures[f"{label}/{name}"] = {k: round(v, 5) for k, v in gaps.items()}
            # a sanity bound, not a claim: bf16 rounding moves log-probs by ~1e-2, a bug by ~1
            expect(all(math.isfinite(v) for v in gaps.values()) and gaps["mean_abs_dlogp"] < 0.1,
                   f"{label} {name}: finite, mean |d log p| < 0.1")
        del fp32, autocast, frozen
        if where.type == "cuda":
            torch.cuda.empty_cache()


def check_1_7b(expect: Expect, args) -> None:
    import torch

    import bench_gpu
    import common

    where, shape = device(), shape_name("1.7b")
    cuda = where.type == "cuda"
    started = time.time()
    folder = random_model_folder(shape, args.workdir)
    # CUDA: fp32 masters, bf16 autocast, activation checkpointing (load_plan)
    model = common.load_model(str(folder), common.Dist(0, 1, 0, where))
    expect.figures.update(shape=shape, build_and_load_seconds=round(time.time() - started, 1),
                          after_load_gib=allocated_gib())
    vocab, params = model.config.vocab_size, bench_gpu.count_params(model)
    prompt_len, response_len = (512, 32768) if cuda else (32, 224)
    prompt, response = random_tokens(prompt_len, vocab, 1), random_tokens(response_len, vocab, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    train_pass(model, [prompt], [response])  # warm-up, and the AdamW state a training step holds
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    resident = allocated_gib()
    reset_peak()
    started = time.time()
    loss, after_forward = train_pass(model, [prompt], [response])
    sync()
    seconds = time.time() - started
    tokens = prompt_len + response_len
    saved = after_forward / GIB - resident if cuda else None
    expect.figures.update(tokens=tokens, fwd_bwd_seconds=round(seconds, 3), loss=loss,
                          mfu_6NT=mfu(6 * params * tokens, seconds), resident_gib=resident,
                          saved_for_backward_gib=saved and round(saved, 2), **peaks())
    started = time.time()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    expect.figures.update(adamw_seconds=round(time.time() - started, 3),
                          readme_training_gib=README["1.7b_training_gib"] if cuda else None)
    expect(math.isfinite(loss), "finite loss")

    rows, gen_prompt, new = (64, 512, 64) if cuda else (4, 16, 8)
    engine = common.HFEngine(model, no_stop_tokenizer(), batch_size=rows, batch_tokens=262144)
    prompts = [random_tokens(gen_prompt, vocab, 100 + i) for i in range(rows)]
    engine.generate(prompts[:2], common.SamplingParams(max_new_tokens=2))  # warm-up
    sync()
    started = time.time()
    engine.generate(prompts, common.SamplingParams(max_new_tokens=1))
    sync()
    prefill = time.time() - started
    reset_peak()
    with CacheRecorder() as cache:
        started = time.time()
        responses = engine.generate(prompts, common.SamplingParams(max_new_tokens=new))
        sync()
    total = time.time() - started
    kv = cache.figures()
    kv["kv_cache_gib_at_262144"] = round(kv["kv_bytes_per_position"] * 262144 / GIB, 1)
    readme = {"readme_kv_bytes_per_position": README["1.7b_kv_bytes_per_position"],
              "readme_decode_ms_per_step": README["1.7b_decode_ms_per_step"]} if cuda else {}
    expect.figures.update(gen_rows=rows, gen_prompt=gen_prompt, gen_new_tokens=new,
                          gen_seconds=round(total, 3), prefill_seconds=round(prefill, 3),
                          gen_tokens_per_second=round(rows * new / total, 1),
                          decode_ms_per_step=round(1000 * (total - prefill) / max(1, new - 1), 2),
                          **{f"gen_{k}": v for k, v in peaks().items()}, **kv,
                          **readme)
    expect([len(r) for r in responses] == [new] * rows, "every row generated to the limit")
    expect(kv["kv_key_dtypes"] == kv["kv_value_dtypes"], "keys and values cached in one dtype")
    if cuda:
        expect(kv["kv_key_dtypes"] == ["torch.bfloat16"], "KV cache in bf16")


def check_8b_score(expect: Expect, args) -> None:
    import torch

    import bench_gpu
    import common

    where, shape = device(), shape_name("8b")
    plan = common.load_plan(where.type, 1, trainable=False)  # a frozen teacher: bf16 on CUDA
    started = time.time()
    model = random_model(qwen3_config(shape), plan.dtype, where).eval().requires_grad_(False)
    expect.figures.update(shape=shape, dtype=str(plan.dtype),
                          build_seconds=round(time.time() - started, 1),
                          weights_gib=allocated_gib())
    vocab, params = model.config.vocab_size, bench_gpu.count_params(model)
    prompt_len, response_len = (512, 15872) if where.type == "cuda" else (32, 96)
    prompt, response = random_tokens(prompt_len, vocab, 1), random_tokens(response_len, vocab, 2)
    with torch.no_grad():
        common.response_logprobs(model, [prompt[:64]], [response[:960]], 0)  # warm-up
        reset_peak()
        started = time.time()
        logprobs, _, mask = common.response_logprobs(model, [prompt], [response], 0)
        sync()
    seconds, tokens = time.time() - started, prompt_len + response_len
    finite = bool(torch.isfinite(logprobs[mask]).all())
    expect.figures.update(tokens=tokens, seconds=round(seconds, 3),
                          tokens_per_second=round(tokens / seconds),
                          mfu_2NT=mfu(2 * params * tokens, seconds), finite=finite, **peaks())
    expect(finite, "finite log-probs")


def check_8b_slice(expect: Expect, args) -> None:
    import gc

    import torch
    import torch.distributed as dist

    import bench_gpu
    import common

    dist_info = common.init_distributed()
    where, shape = dist_info.device, shape_name("8b")
    cuda = where.type == "cuda"
    plan = common.load_plan(where.type, 8, trainable=True)  # each rank of an 8-GPU run
    full_layers = bench_gpu.SHAPES[shape]["num_hidden_layers"]
    prompt_len, response_len = (512, 32768) if cuda else (32, 224)
    tokens = prompt_len + response_len
    measured = {}
    for layers in (2, 4):
        model = random_model(qwen3_config(shape, num_hidden_layers=layers), torch.float32, where)
        params = bench_gpu.count_params(model)
        if plan.activation_checkpointing:
            common._enable_activation_checkpointing(model)
        common._fully_shard(model, dist_info, bf16_compute=plan.bf16_compute)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        vocab = model.config.vocab_size
        prompt = random_tokens(prompt_len, vocab, 1)
        response = random_tokens(response_len, vocab, 2)
        train_pass(model, [prompt], [response])  # warm-up: FSDP lazy init, AdamW state
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        resident = torch.cuda.memory_allocated() if cuda else 0
        reset_peak()
        started = time.time()
        loss, after_forward = train_pass(model, [prompt], [response])
        sync()
        seconds = time.time() - started
        grads = sum(p.grad.to_local().numel() * p.grad.element_size() for p in model.parameters())
        # saved: what the forward keeps for the backward (checkpointed layer inputs, the root unit
        # gathered); transient: the backward's peak beyond that and all fp32 gradients (a lower
        # bound: at the peak some gradients may not exist yet)
        saved = transient = None
        if cuda:
            saved = (after_forward - resident) / GIB
            transient = max(0, torch.cuda.max_memory_allocated() - after_forward - grads) / GIB
        measured[layers] = (params, seconds, saved, transient)
        expect.figures[f"layers_{layers}"] = {
            "params": params, "fwd_bwd_seconds": round(seconds, 3), "loss": loss,
            "resident_gib": round(resident / GIB, 2), "grads_gib": round(grads / GIB, 2),
            "saved_for_backward_gib": saved and round(saved, 3),
            "backward_transient_gib": transient and round(transient, 2), **peaks()}
        expect(math.isfinite(loss), f"{layers} layers: finite loss")
        del model, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    (p2, t2, saved2, _), (p4, t4, saved4, transient4) = measured[2], measured[4]
    per_layer_params, per_layer_seconds = (p4 - p2) / 2, (t4 - t2) / 2
    params_full = p2 + (full_layers - 2) * per_layer_params
    seconds_full = t2 + (full_layers - 2) * per_layer_seconds
    expect.figures.update(shape=shape, tokens=tokens, full_layers=full_layers,
                          params_extrapolated=int(params_full),
                          fwd_bwd_seconds_extrapolated=round(seconds_full, 3),
                          mfu_6NT_extrapolated=mfu(6 * params_full * tokens, seconds_full))
    if cuda:  # the README's activation terms: saved by the forward + the backward's transient
        per_layer = (saved4 - saved2) / 2
        expect.figures.update(
            activation_gib_per_layer=round(per_layer, 3),
            activation_bytes_per_token_layer=round(per_layer * GIB / tokens),
            readme_bytes_per_token_layer=README["8b_act_bytes_per_token_layer"],
            activation_gib_extrapolated=round(saved2 + (full_layers - 2) * per_layer
                                              + transient4, 2),
            readme_activation_terms_gib=README["8b_activation_terms_gib"])
    dist.destroy_process_group()


CHECK_FUNCTIONS = {"env": check_env, "fsdp": check_fsdp, "logprob": check_logprob,
                   "1.7b": check_1_7b, "8b-score": check_8b_score, "8b-slice": check_8b_slice,
                   **{f"script-{s}": (lambda e, a, s=s: check_script(e, a, s))
                      for s in SCRIPT_FLAGS}}


def run_check(args) -> None:
    """Child process: run one check, write its result (rank 0) as JSON to --result."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    expect, result = Expect(), {}
    try:
        CHECK_FUNCTIONS[args.check](expect, args)
        result["status"] = "fail" if expect.failed else "pass"
        if expect.failed:
            result["reason"] = "; ".join(expect.failed)
    except Exception as error:  # any failure is this check's result; the traceback goes to the log
        traceback.print_exc()
        line = (str(error).strip().splitlines() or [""])[0][:300]
        result = {"status": "fail",
                  "reason": "; ".join([*expect.failed, f"{type(error).__name__}: {line}"])}
    result["figures"] = expect.figures
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(result, default=str))


# ---------------------------------------------------------------------------------------------
# The command: prepare, or run every check in its own process under the global deadline
# ---------------------------------------------------------------------------------------------


def prepare() -> None:
    """Toy models into tests/.smoke/toy, math-verify wheels (CPython 3.12, x86-64) into
    tests/.smoke/wheels."""
    import importlib.metadata

    sys.path.insert(0, str(ROOT))
    import common

    toy = PREPARED / "toy"
    toy.mkdir(parents=True, exist_ok=True)
    for name in common.TOY_SPECS:
        built = common.build_toy_model(name)
        if not (toy / built.name).exists():
            shutil.copytree(built, toy / built.name)
    wheels = PREPARED / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return WHEELS[name]

    pins = [f"{name}=={version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(wheels),
                    *pins], check=True)
    size = sum(p.stat().st_size for p in PREPARED.rglob("*") if p.is_file())
    print(f"[prepare] {PREPARED}: {', '.join(sorted(p.name for p in toy.iterdir()))}; wheels: "
          f"{', '.join(sorted(p.name for p in wheels.iterdir()))}; {size / 2**20:.1f} MiB in all")


def child_env(args, workdir: Path) -> dict:
    import importlib.util

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if (PREPARED / "toy").is_dir():
        env["RLVR_TOY_CACHE"] = str(PREPARED / "toy")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    wheels = sorted((PREPARED / "wheels").glob("*.whl"))
    if importlib.util.find_spec("math_verify") is None and wheels:  # the GPU machine, offline
        site = workdir / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                        "--no-deps", "--no-compile", "--target", str(site), *map(str, wheels)],
                       check=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def launch(name: str, args, workdir: Path, env: dict, timeout: float) -> dict:
    launcher = CHECKS[name][2]
    prefix = [sys.executable] if launcher == "python" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    result, log = workdir / f"{name}.json", workdir / f"{name}.log"
    command = [*prefix, str(Path(__file__).resolve()), "--check", name, "--result", str(result),
               "--workdir", str(workdir), "--device", args.device]
    handle = open(log, "w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                               start_new_session=True)  # own process group: a timeout kills all
    return {"name": name, "process": process, "log": log, "handle": handle, "result": result,
            "started": time.time(), "timeout": timeout}


def finish(job: dict, timed_out: bool) -> dict:
    process = job["process"]
    if timed_out:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    job["handle"].close()
    seconds = round(time.time() - job["started"], 1)
    record = {"check": job["name"], "status": None, "seconds": seconds}
    if timed_out:
        record.update(status="timeout", reason=f"killed after {job['timeout']:.0f} s")
    elif job["result"].is_file():
        record.update(json.loads(job["result"].read_text()))
    else:
        record.update(status="fail", reason=f"exited {process.returncode} without a result")
    if record["status"] not in ("pass", "skip"):
        record["log_tail"] = job["log"].read_text(errors="replace").splitlines()[-15:]
    return record


def summary(record: dict) -> str:
    figures = record.get("figures") or {}
    keys = ["gpu", "free_gib", "nccl", "math_verify_importable", "resume_exact",
            "resume_worst_abs_diff", "export_dtypes", "weights_equal_after_load", "kv_key_dtypes",
            "mfu_6NT", "peak_reserved_gib", "decode_ms_per_step", "kv_bytes_per_position",
            "tokens_per_second", "activation_gib_per_layer",
            "mfu_6NT_extrapolated", "activation_gib_extrapolated"]
    parts = [f"{k}={figures[k]}" for k in keys if figures.get(k) is not None]
    parts += [f"{k}: dlogp {v['mean_abs_dlogp']:.3g}/{v['max_abs_dlogp']:.3g}"
              for k, v in figures.items() if isinstance(v, dict) and "mean_abs_dlogp" in v]
    text = " ".join(parts) if record["status"] == "pass" else record.get("reason", "")
    return text[:160]


def orchestrate(args) -> int:
    started = time.time()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    names = list(CHECKS) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"error: --only {','.join(unknown)}: unknown check; choose from {','.join(CHECKS)}",
              file=sys.stderr)
        return 2
    overrides = dict(item.split("=") for item in args.timeout.split(",")) if args.timeout else {}
    workdir = Path(tempfile.mkdtemp(prefix="gpu_smoke-", dir=args.workdir))
    env = child_env(args, workdir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    print(f"[gpu_smoke] {len(names)} checks on {args.device}, deadline {args.deadline:.0f} s, "
          f"work folder {workdir}, results appended to {out}", flush=True)

    def deadline_left() -> float:
        return args.deadline - (time.time() - started)

    def record(entry: dict) -> None:
        entry.update(device=args.device, utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(out, "a") as stream:
            stream.write(json.dumps(entry, default=str) + "\n")
        records.append(entry)
        print(f"[gpu_smoke] {entry['check']}: {entry['status']} ({entry['seconds']} s) "
              f"{summary(entry)}", flush=True)

    groups = []  # the script checks run side by side (toy models, one GPU), the others one by one
    for name in names:
        if name.startswith("script-") and groups and groups[-1][0].startswith("script-"):
            groups[-1].append(name)
        else:
            groups.append([name])
    for group in groups:
        if deadline_left() < 5:
            for name in group:
                record({"check": name, "status": "not run", "seconds": 0,
                        "reason": f"global deadline of {args.deadline:.0f} s reached"})
            continue
        jobs = []
        for name in group:
            if args.device == "cpu" and name in CPU_SKIPS:
                record({"check": name, "status": "skip", "seconds": 0, "reason": CPU_SKIPS[name]})
                continue
            limit = float(overrides.get(name, CHECKS[name][0 if args.device == "cuda" else 1]))
            jobs.append(launch(name, args, workdir, env, min(limit, deadline_left())))
        while jobs:
            time.sleep(0.2)
            for job in list(jobs):
                late = time.time() - job["started"] > job["timeout"]
                if job["process"].poll() is not None or late:
                    jobs.remove(job)
                    record(finish(job, timed_out=late and job["process"].poll() is None))
    print(f"\n{'check':<15} {'status':<8} {'seconds':>7}  summary")
    for entry in records:
        print(f"{entry['check']:<15} {entry['status']:<8} {entry['seconds']:>7}  {summary(entry)}")
    print(f"[gpu_smoke] {time.time() - started:.0f} s in all; {out}")
    if args.logs:  # every check's output in one file (the last 300 lines of each)
        with open(args.logs, "a") as stream:
            for entry in records:
                log = workdir / f"{entry['check']}.log"
                lines = log.read_text(errors="replace").splitlines()[-300:] if log.is_file() else []
                stream.write(f"===== {entry['check']} ({entry['status']})\n")
                stream.write("".join(line + "\n" for line in lines))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r["status"] in ("pass", "skip") for r in records) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepare", action="store_true",
                        help="build the toy models, download the wheels")
    parser.add_argument("--out", help="append one JSON line per check to this file")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--deadline", type=float, default=420.0, help="global limit, seconds")
    parser.add_argument("--only", default="", help=f"comma list of checks: {','.join(CHECKS)}")
    parser.add_argument("--timeout", default="", help="per-check limits, e.g. 1.7b=300,fsdp=60")
    parser.add_argument("--workdir", default=None, help="where the work folder goes (default: tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, models)")
    parser.add_argument("--logs", help="append every check's output to this file")
    parser.add_argument("--check", help=argparse.SUPPRESS)  # a child process: run this one check
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        run_check(args)
    elif args.prepare:
        prepare()
    elif not args.out:
        parser.error("--out FILE is needed (or --prepare)")
    else:
        sys.exit(orchestrate(args))


if __name__ == "__main__":
    main()
