"""The CUDA path's decisions, checked on CPU (no GPU here): one process never needs a process group,
torchrun loads sharded weights that only rank 0 read, and the lm_head gradient adds up its chunks in
fp32 under bf16 compute."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
from conftest import run_script, torchrun

FP32, BF16 = torch.float32, torch.bfloat16


def test_load_plan():
    plan = common.LoadPlan
    assert common.load_plan("cuda", 1, True) == plan(shard=False, dtype=FP32, bf16_compute=True,
                                                     activation_checkpointing=True)
    assert common.load_plan("cuda", 8, True) == plan(shard=True, dtype=FP32, bf16_compute=True,
                                                     activation_checkpointing=True)
    assert common.load_plan("cuda", 1, False) == plan(shard=False, dtype=BF16, bf16_compute=False,
                                                      activation_checkpointing=False)
    assert common.load_plan("cpu", 1, True) == plan(shard=False, dtype=FP32, bf16_compute=False,
                                                    activation_checkpointing=False)
    assert common.load_plan("cpu", 2, False) == plan(shard=True, dtype=FP32, bf16_compute=False,
                                                     activation_checkpointing=False)


def test_one_process_with_the_cuda_plan_needs_no_process_group(monkeypatch):
    """Plain `python antisd.py` on one GPU used to call fully_shard, whose device mesh tried
    init_process_group(env://) and raised. Here load_model runs the CUDA plan on CPU (autocast works
    on CPU too) with every way into a process group made to raise."""
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp

    def refuse(*args, **kwargs):
        raise AssertionError("one process must not need a process group")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    monkeypatch.setattr(device_mesh, "init_device_mesh", refuse)
    monkeypatch.setattr(fsdp, "fully_shard", refuse)
    cuda_plan = common.load_plan
    monkeypatch.setattr(common, "load_plan", lambda device, world, trainable: cuda_plan("cuda", world, trainable))
    model = common.load_model("toy", common.Dist(0, 1, 0, torch.device("cpu")))
    assert {p.dtype for p in model.parameters()} == {FP32}  # fp32 masters
    assert all(layer.gradient_checkpointing for layer in model.model.layers)  # on by default with CUDA's plan
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()
    logits = model(input_ids=ids).logits
    assert logits.dtype == BF16  # computed in bf16
    logits.float().logsumexp(-1).mean().backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    assert {p.grad.dtype for p in model.parameters()} == {FP32}
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {FP32}
    assert not dist.is_initialized()
    frozen = common.load_model("toy", common.Dist(0, 1, 0, torch.device("cpu")), trainable=False)
    assert {p.dtype for p in frozen.parameters()} == {BF16} and not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("plan_device", ["cuda", "cpu"])
def test_generation_caches_keys_in_the_compute_dtype(monkeypatch, plan_device):
    """One GPU (fp32 masters under bf16 autocast; autocast on CPU here): Qwen3's k_norm multiplies
    the bf16 keys by its fp32 weight, and the cache used to keep them in fp32 beside bf16 values
    (1.5x the README's KV bytes per position). The plain fp32 path stays fp32."""
    from transformers import DynamicCache

    seen, update = set(), DynamicCache.update

    def record(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = update(self, key_states, value_states, layer_idx, *args, **kwargs)
        seen.add((keys.dtype, values.dtype))
        return keys, values

    monkeypatch.setattr(DynamicCache, "update", record)
    plan = common.load_plan
    monkeypatch.setattr(common, "load_plan",
                        lambda device, world, trainable: plan(plan_device, world, trainable))
    model = common.load_model("toy", common.Dist(0, 1, 0, torch.device("cpu")))
    engine = common.HFEngine(model, common.load_tokenizer("toy"))
    greedy = common.SamplingParams(temperature=0, max_new_tokens=4)
    responses = engine.generate([[5, 6, 7], [8, 9]], greedy)
    assert [len(r) for r in responses] == [4, 4]
    assert seen == ({(BF16, BF16)} if plan_device == "cuda" else {(FP32, FP32)})


def test_torchrun_sharded_load_equals_from_pretrained(tmp_path):
    """Meta-device build + rank 0's weights broadcast into the shards: full weights, tied embeddings,
    rotary buffers and logits equal a plain from_pretrained model, trainable and frozen; copy_weights;
    a bf16 checkpoint (as hub models are) read in bf16 by rank 0 and upcast into fp32 shards."""
    from transformers import AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_pretrained(common.build_toy_model("toy"), dtype=BF16)
    bf16.save_pretrained(tmp_path / "bf16")
    result = run_script(torchrun(2) + ["tests/dist_load_check.py", str(tmp_path / "bf16")], timeout=300)
    for rank in (0, 1):
        for what in ("trainable", "frozen", "copy_weights", "bf16 checkpoint"):
            assert f"LOAD-EQUAL rank {rank} {what}" in result.stdout


class _Head:
    def __init__(self, head):
        self.head = head

    def get_output_embeddings(self):
        return self.head


def test_lm_head_gradient_adds_chunks_in_fp32():
    """bf16 head weight (FSDP2's compute copy of an fp32 master), 100 position chunks. Summed in bf16
    chunk by chunk the gradient is off by ~1e-2; upcast once, it is the exact gradient rounded to
    bf16 once (that single rounding, ~1.6e-3 relative, is inherent in bf16 compute weights)."""
    torch.manual_seed(0)
    positions, width, vocab, chunks = 4000, 64, 512, 100
    head = torch.nn.Linear(width, vocab, bias=False).to(BF16)
    hidden = torch.randn(1, positions, width).to(BF16)
    targets, mask = torch.randint(0, vocab, (1, positions)), torch.ones(1, positions, dtype=torch.bool)
    coef = torch.randn(1, positions)

    def gradient(logits_fn):
        head.weight.grad = None
        logprobs, entropy = common.token_logprob_entropy(logits_fn, hidden, targets, mask, positions // chunks)
        ((logprobs * coef).sum() + entropy.sum()).backward()
        return head.weight.grad.double()

    weight = head.weight.detach().double().requires_grad_()
    logprobs = torch.log_softmax(hidden[0].double() @ weight.T, -1)
    loss = (logprobs.gather(-1, targets[0][:, None])[:, 0] * coef[0].double()).sum() \
        - (logprobs.exp() * logprobs).sum()
    (exact,) = torch.autograd.grad(loss, weight)
    rounded = exact.to(BF16).double()

    def error(grad, reference):
        return float((grad - reference).norm() / exact.norm())

    new = gradient(common.output_head(_Head(head)))
    assert head.weight.grad.dtype == BF16
    assert error(new, rounded) < 1e-4  # measured 7.6e-6
    assert error(new, exact) < 1.01 * error(rounded, exact)
    old = gradient(lambda h: F.linear(h, head.weight))  # the previous output_head: bf16 sums over chunks
    assert error(old, rounded) > 5e-3  # measured 1.2e-2


FAST = ["--num_problems", "4", "--num_generations", "4", "--eval_dataset", "", "--max_new_tokens", "24"]
TIMING = {"step_seconds", "tokens_per_second"}


def test_torchrun_resume_is_exact_with_sharded_checkpoints(tmp_path):
    """2 ranks: 4 steps straight equal 2 steps + --resume for 2 more (metrics and final weights).
    Each rank writes its own shard file of the training state; the HF export loads with from_pretrained."""
    import json

    from safetensors.torch import load_file

    def run(name, steps, *extra):  # an evaluation right before each checkpoint: FSDP2's root is gathered then
        run_script(torchrun(2) + ["antisd.py", *FAST[:4], "--max_new_tokens", "24", "--eval_dataset", "toy", "--eval_limit", "4", "--eval_k",
                                  "1", "--eval_every", "2", "--output_dir", str(tmp_path), "--run_name", name,
                                  "--save_every", "2", "--num_steps", str(steps), *extra], timeout=600)
        return tmp_path / name

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, "--resume")

    def records(run_dir):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in records(straight)] == [0, 1, 2, 2, 3, 4, 4]  # evaluations at 0, 2, 4
    assert records(resumed) == records(straight)
    final = [run_dir / "checkpoints" / "step_000004" for run_dir in (straight, resumed)]
    weights = [load_file(path / "model.safetensors") for path in final]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    shards = sorted(p.name for p in (final[1] / "train_state").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert common.check_checkpoint(final[1]) is None
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(final[1])
    assert all(torch.equal(p, weights[1][name]) for name, p in exported.state_dict().items() if name in weights[1])


def one_step_toy():
    """One process, the toy model after one AdamW step (so weights and optimizer state are not the
    base model's): (dist_info, model, optimizer)."""
    dist_info = common.Dist(0, 1, 0, torch.device("cpu"))
    model = common.load_model("toy", dist_info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    return dist_info, model, optimizer


def test_one_process_checkpoint_round_trip(tmp_path, toy_tokenizer):
    """Without a process group DCP writes and reads alone: weights and AdamW state come back exactly."""
    dist_info, model, optimizer = one_step_toy()
    path = common.save_checkpoint(tmp_path, 1, model, toy_tokenizer, optimizer, {"k": 1}, dist_info)
    assert common.check_checkpoint(path) is None and not dist.is_initialized()
    fresh = common.load_model("toy", dist_info)  # the base weights: the checkpoint must replace them
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert common.load_checkpoint(path, fresh, fresh_optimizer, dist_info) == \
        {"step": 1, "state": {"k": 1}, "frozen": []}
    for (name, want), got in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(got, want), name
    for want, got in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert all(torch.equal(got[key], want[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    # a frozen model (a teacher copy: the weights before the update) goes along on request
    teacher = common.load_model("toy", dist_info, trainable=False)
    path = common.save_checkpoint(tmp_path, 2, model, toy_tokenizer, optimizer, {}, dist_info,
                                  frozen={"teacher": teacher})
    assert common.check_checkpoint(path) is None
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(1.0)  # not the saved copy any more
    restored = common.load_checkpoint(path, fresh, fresh_optimizer, dist_info,
                                      frozen={"teacher": teacher})
    assert restored["frozen"] == ["teacher"]
    base = common.load_model("toy", dist_info)
    for (name, want), got in zip(base.named_parameters(), teacher.parameters()):
        assert torch.equal(got, want) and not got.requires_grad, name


def test_checkpoint_export_in_bf16_keeps_the_training_state_fp32(tmp_path, toy_tokenizer):
    """The HF export is bf16 on CUDA (`export_dtype` None there; asked for explicitly here, on CPU):
    weights and config say bf16 and equal the fp32 masters rounded once; the DCP training state
    stays fp32 and a resume restores the masters exactly. On CPU the default export stays fp32."""
    from safetensors import safe_open

    dist_info, model, optimizer = one_step_toy()
    path = common.save_checkpoint(tmp_path / "bf16", 1, model, toy_tokenizer, optimizer, {}, dist_info,
                                  export_dtype=BF16)
    default = common.save_checkpoint(tmp_path / "default", 1, model, toy_tokenizer, optimizer, {},
                                     dist_info)
    masters = dict(model.named_parameters())
    for folder, dtype in ((path, BF16), (default, FP32)):
        assert common.check_checkpoint(folder) is None
        assert json.loads((folder / "config.json").read_text())["dtype"] == str(dtype)[6:]
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            assert set(weights.keys()) == set(masters)  # tied embeddings once, as before
            for name in weights.keys():
                assert torch.equal(weights.get_tensor(name), masters[name].detach().to(dtype)), name
    fresh = common.load_model("toy", dist_info)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    common.load_checkpoint(path, fresh, fresh_optimizer, dist_info)
    for (name, want), got in zip(model.named_parameters(), fresh.parameters()):
        assert got.dtype == FP32 and torch.equal(got, want), name


def test_dapo_rows_are_deduplicated_while_reading(tmp_path, capsys):
    """DAPO-Math-17k on the hub holds each problem ~100 times; a local parquet in its format with 3
    problems x 5 copies (one problem also under a second answer) keeps 4, in first-seen order."""
    import pandas as pd

    def row(problem, answer, index):
        content = (f"{common.DAPO_PREFIX} The last line of your response should be of the form Answer: $Answer\n\n"
                   f"{problem}\n\n{common.DAPO_SUFFIX} \"Answer:\".")
        return {"data_source": "math_dapo", "prompt": [{"content": content, "role": "user"}], "ability": "MATH",
                "reward_model": {"ground_truth": answer, "style": "rule"}, "extra_info": {"index": str(index)}}

    problems = [("What is $2+3$?", "5"), ("What is $7-4$?", "3"), ("What is $2 \\cdot 6$?", "12")]
    frame = [row(p, a, 10 * copy + i) for copy in range(5) for i, (p, a) in enumerate(problems)]
    frame.append(row("What is $2+3$?", "6", 99))  # same text, another answer: kept apart
    frame.append(row("What is $1+1$?", "", 100))  # no answer: counted as such, not as a duplicate
    pd.DataFrame(frame).to_parquet(tmp_path / "train.parquet")
    capsys.readouterr()
    rows = common.load_problems(str(tmp_path / "train.parquet"))
    assert rows == [{"problem": p, "answer": a, "solution": ""} for p, a in problems + [("What is $2+3$?", "6")]]
    out = capsys.readouterr().out
    assert "deduplicated 17 rows -> 4 problems" in out and "skipped 1 rows without an answer" in out
    raw = common._read_rows(str(tmp_path / "train.parquet"), "train")
    assert not isinstance(raw, list) and len(raw) == 17  # a memory-mapped Dataset, iterated, not copied


def test_torchrun_with_the_cuda_plan_on_cpu():
    """FSDP2 with bf16 compute over fp32 shards, fp32 reduction, activation checkpointing and a bf16
    frozen teacher, run on 2 CPU ranks: dtypes at every stage; gradients against one process."""
    result = run_script(torchrun(2) + ["tests/dist_cuda_plan_check.py"], timeout=300)
    assert "CUDA-PLAN-OK rank 0" in result.stdout and "CUDA-PLAN-OK rank 1" in result.stdout


def test_one_gpu_plan_trains_and_resumes_exactly_on_cpu(tmp_path, monkeypatch):
    """antisd.main end to end with the one-GPU plan (autocast bf16 over fp32 masters, activation
    checkpointing, no process group), on CPU: 2 steps straight equal 1 step + --resume for 1."""
    import json

    import antisd

    cuda_plan = common.load_plan
    monkeypatch.setattr(common, "load_plan", lambda device, world, trainable: cuda_plan("cuda", world, trainable))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pg")))

    def run(name, steps, *extra):
        antisd.main(FAST + ["--gate", "none", "--save_every", "1", "--output_dir", str(tmp_path), "--run_name", name,
                            "--num_steps", str(steps), *extra])
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    straight = run("straight", 2)
    run("resumed", 1)
    assert run("resumed", 2, "--resume") == straight and [r["step"] for r in straight] == [1, 2]
    assert straight[1]["loss"] != 0 and not dist.is_initialized()
