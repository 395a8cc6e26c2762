"""The rollout engine and the batching budgets: generation batches under a KV-cache token budget,
weights gathered once per generation phase under FSDP2 (2 CPU ranks), the sampler's log-probs,
a model's own generation_config never overriding the requested sampling, the temperature in the
training log-probs, and micro-batches under a padded-token budget."""

import copy
import random

import pytest
import torch

import common
from conftest import run_script, torchrun


def manual_greedy(model, prompt, max_new_tokens, stop_ids):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in stop_ids:
                break
    return out


def naive_logprobs(model, prompt, response, temperature=1.0):
    """log_softmax(logits / T) of one full forward, at the positions that predict the response."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt) + list(response)])).logits[0].double()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1: len(prompt) - 1 + len(response)]
    return logprobs, logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0]


def naive_sampler_logprobs(model, prompt, response, params):
    """The sampler's distribution by Hugging Face's own warpers (temperature, top-k, top-p, in that
    order) on a naive forward, log-softmaxed, at the sampled tokens; greedy: log_softmax(logits)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt) + list(response)])).logits[0].float()
    logits = logits[len(prompt) - 1: len(prompt) - 1 + len(response)]
    if params.temperature > 0:
        logits = TemperatureLogitsWarper(params.temperature)(None, logits)
        if params.top_k:
            logits = TopKLogitsWarper(params.top_k)(None, logits)
        if params.top_p < 1:
            logits = TopPLogitsWarper(params.top_p)(None, logits)
    return torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


# ---- generation batches under a budget ----------------------------------------------------------


def test_generation_batches_respect_both_budgets_and_keep_order():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(0, 30))]
        new, size, budget = rng.randint(1, 30), rng.randint(1, 8), rng.choice([0, 1, 50, 120, 400])
        batches = common.generation_batches(lengths, new, size, budget)
        assert [i for b in batches for i in b] == list(range(len(lengths)))  # every prompt once, in order
        for b in batches:
            assert 1 <= len(b) <= size
            cache = len(b) * (max(lengths[i] for i in b) + new)
            assert budget == 0 or cache <= budget or len(b) == 1  # an over-long prompt goes alone
        for b, nxt in zip(batches, batches[1:]):  # greedy: the next prompt did not fit
            grown = b + nxt[:1]
            assert len(grown) > size or (budget and len(grown) * (max(lengths[i] for i in grown) + new) > budget)
    assert common.generation_batches([3, 3, 3, 3], 5, 64, 16) == [[0, 1], [2, 3]]  # 2 x (3 + 5) = 16
    assert common.generation_batches([3, 3, 3], 5, 64, 0) == [[0, 1, 2]]


def test_greedy_is_identical_under_any_budget(toy_model, toy_tokenizer):
    rows = common.make_toy_rows(5, seed=3)
    prompts = [common.build_prompt(toy_tokenizer, r["problem"]) for r in rows]
    params = common.SamplingParams(temperature=0, max_new_tokens=30)
    reference = common.HFEngine(toy_model, toy_tokenizer, batch_size=64).generate(prompts, params)
    for size, tokens in [(1, 0), (2, 0), (64, 1), (64, 2 * (max(map(len, prompts)) + 30))]:
        assert common.HFEngine(toy_model, toy_tokenizer, size, tokens).generate(prompts, params) == reference


def test_sampled_rollouts_equal_the_unbudgeted_engine_when_the_budget_keeps_the_batches(toy_model, toy_tokenizer):
    """Same seed, same batches -> the same samples: a budget that does not bind changes nothing."""
    prompts = [common.build_prompt(toy_tokenizer, r["problem"]) for r in common.make_toy_rows(4, seed=8)]
    params = common.SamplingParams(temperature=1.0, max_new_tokens=20)
    torch.manual_seed(3)
    plain = common.HFEngine(toy_model, toy_tokenizer, 64).generate(prompts, params)
    torch.manual_seed(3)
    budget = 4 * (max(map(len, prompts)) + 20)
    assert common.HFEngine(toy_model, toy_tokenizer, 64, budget).generate(prompts, params) == plain


# ---- FSDP2: one all-gather per unit per generation phase, no lockstep ------------------------------


def test_fsdp_generation_gathers_weights_once_per_phase(tmp_path, toy_tokenizer):
    """2 CPU ranks: during a generate call each FSDP unit all-gathers once (not once per token) and no
    other collective runs, so ranks with different numbers of prompts finish on their own; greedy
    output equals the unsharded model's under every budget; the reshard-after-forward settings
    (root: no, layers: yes) are restored and a training backward works right after."""
    run_script(torchrun(2) + ["tests/dist_gen_check.py", str(tmp_path)], timeout=300,
               env={"OMP_NUM_THREADS": "1"})
    plain = common.load_model("toy", common.init_distributed(), trainable=False)
    stop_ids = set(common.stop_token_ids(toy_tokenizer, plain))
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["units"] == 4  # 3 decoder layers + the root
        assert result["tokens"] > 4 * len(result["prompts"])  # many decode steps ...
        assert result["all_gathers"] == result["units"]  # ... yet one all-gather per unit
        assert result["other_collectives"] == 0
        expected = [manual_greedy(plain, p, 40, stop_ids) for p in result["prompts"]]
        assert result["greedy"] == expected
        assert all(out == expected for out in result["budgets"].values())
        assert result["settings_after"] == [False] + [True] * (result["units"] - 1)
        assert result["grad_ok"] and result["sharded_after"]
        sampled = common.SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=40)
        for prompt, response, logprobs in zip(result["prompts"], result["sampled"], result["sampler_logprobs"]):
            chosen = naive_sampler_logprobs(plain, prompt, response, sampled)
            assert torch.allclose(torch.tensor(logprobs, dtype=torch.float64), chosen, atol=1e-4)


# ---- sampler log-probs -----------------------------------------------------------------------------


def test_sampler_logprobs_align_with_the_sampled_tokens(toy_model, toy_tokenizer):
    """logprobs=True: one float per response token, the log-prob under the distribution sampled from
    (logits / T, top-k, top-p, renormalised: vLLM's processed_logprobs; greedy: T = 1) by Hugging Face's
    warpers on a naive forward of prompt + response, also for rows that stopped early and under a
    budget; without filtering it equals log_softmax(logits / T), what training recomputes."""
    prompts = [common.build_prompt(toy_tokenizer, r["problem"]) for r in common.make_toy_rows(6, seed=4)]
    for params, budget in [(common.SamplingParams(0.7, 0.9, 5, 25), 0), (common.SamplingParams(1.0, 1.0, 0, 25), 90),
                           (common.SamplingParams(0.0, 1.0, 0, 25), 0)]:
        torch.manual_seed(1)
        responses, logprobs = common.HFEngine(toy_model, toy_tokenizer, 3, budget).generate(
            prompts, params, logprobs=True)
        torch.manual_seed(1)
        assert common.HFEngine(toy_model, toy_tokenizer, 3, budget).generate(prompts, params) == responses
        assert [len(x) for x in logprobs] == [len(r) for r in responses]
        for prompt, response, values in zip(prompts, responses, logprobs):
            values = torch.tensor(values, dtype=torch.float64)
            assert torch.allclose(values, naive_sampler_logprobs(toy_model, prompt, response, params), atol=1e-4)
            _, unfiltered = naive_logprobs(toy_model, prompt, response, params.temperature or 1.0)
            if params.top_k or params.top_p < 1:  # renormalised over the kept tokens: higher
                assert (values >= unfiltered - 1e-6).all() and (values > unfiltered + 1e-3).any()
            else:
                assert torch.allclose(values, unfiltered, atol=1e-4)
    assert common.HFEngine(toy_model, toy_tokenizer).generate([], params, logprobs=True) == ([], [])


# ---- a model's generation_config does not change the requested sampling ---------------------------


@pytest.fixture
def qwen_like_model(toy_model):
    """The toy model with Qwen3's shipped sampling defaults in its generation_config."""
    model = copy.deepcopy(toy_model)
    model.generation_config.update(temperature=0.6, top_p=0.95, top_k=20, do_sample=True)
    return model


def test_generation_config_defaults_do_not_override_requested_sampling(qwen_like_model, toy_tokenizer):
    model, tok = qwen_like_model, toy_tokenizer
    prompts = [common.build_prompt(tok, r["problem"]) for r in common.make_toy_rows(8, seed=9)]
    stop_ids = set(common.stop_token_ids(tok, model))
    engine = common.HFEngine(model, tok)
    # greedy is greedy (the config's do_sample=True is not applied)
    greedy = engine.generate(prompts, common.SamplingParams(0.0, 1.0, 0, 30))
    assert greedy == [manual_greedy(model, p, 30, stop_ids) for p in prompts]
    # sampling at T = 2: the log-probs are those of logits / 2, not / 0.6 (hot enough that the
    # peaked toy samples some tokens outside the config's top-20 and nucleus)
    torch.manual_seed(0)
    responses, logprobs = engine.generate(prompts * 8, common.SamplingParams(2.0, 1.0, 0, 30), logprobs=True)
    outside_top20 = outside_nucleus = 0
    for prompt, response, values in zip(prompts * 8, responses, logprobs):
        full, chosen = naive_logprobs(model, prompt, response, 2.0)
        assert torch.allclose(torch.tensor(values, dtype=torch.float64), chosen, atol=1e-4)
        _, raw = naive_logprobs(model, prompt, response, 1.0)
        ranks = (full > chosen[:, None]).sum(-1)  # rank of each sampled token (0 = most likely)
        outside_top20 += int((ranks >= 20).sum())
        probs = full.exp()  # the config's nucleus (T 0.6, top-p 0.95) would never keep these:
        cold = torch.softmax(full * 2.0 / 0.6, -1)
        sorted_cold, _ = cold.sort(-1, descending=True)
        cutoff = (sorted_cold.cumsum(-1) - sorted_cold < 0.95).sum(-1)
        cold_chosen = cold.gather(-1, torch.tensor(response)[:, None])[:, 0]
        cold_rank = (cold > cold_chosen[:, None]).sum(-1)
        outside_nucleus += int((cold_rank >= cutoff).sum())
        assert probs.shape[-1] == len(tok)
    assert outside_top20 > 0 and outside_nucleus > 0  # top_k 0 and top_p 1 were used, not 20 / 0.95
    # requested top-k is applied: every sampled token within the top 2
    torch.manual_seed(0)
    responses = engine.generate(prompts, common.SamplingParams(1.0, 1.0, 2, 30))
    for prompt, response in zip(prompts, responses):
        full, chosen = naive_logprobs(model, prompt, response)
        assert ((full > chosen[:, None]).sum(-1) < 2).all()


def test_evaluate_samples_as_requested_despite_generation_config(qwen_like_model, toy_tokenizer, monkeypatch):
    """evaluate -> engine: greedy eval decodes the argmax continuation; the budget applies there too."""
    model, tok = qwen_like_model, toy_tokenizer
    rows = common.make_toy_rows(5, seed=12)
    seen = []
    budget = 2 * (max(len(common.build_prompt(tok, r["problem"])) for r in rows) + 30)  # about 2 rows
    engine = common.HFEngine(model, tok, batch_size=64, batch_tokens=budget)
    generate = engine.generate

    def recording(prompts, params, desc="generate", logprobs=False):
        seen.append((prompts, generate(prompts, params, desc, logprobs)))
        return seen[-1][1]

    batches = []
    sample = common.HFEngine._sample
    monkeypatch.setattr(common.HFEngine, "_sample", lambda self, p, *rest: batches.append(len(p)) or
                        sample(self, p, *rest))
    engine.generate = recording
    grader = common.Grader()
    try:
        metrics = common.evaluate(engine, tok, rows, grader, common.SamplingParams(0.0, 1.0, 0, 30), 2,
                                  common.init_distributed())
    finally:
        grader.close()
    prompts, responses = seen[0]
    stop_ids = set(common.stop_token_ids(tok, model))
    assert responses == [manual_greedy(model, p, 30, stop_ids) for p in prompts]
    assert batches == [len(b) for b in common.generation_batches(list(map(len, prompts)), 30, 64, budget)]
    assert len(batches) >= 5 and max(batches) <= 3
    assert metrics["eval/avg@2"] == metrics["eval/pass@2"]  # greedy: both samples alike


# ---- temperature in the training log-probs -----------------------------------------------------------


def test_response_logprobs_apply_the_temperature(toy_model, toy_tokenizer):
    """response_logprobs(..., temperature=0.5) = log_softmax(logits / 0.5) of a naive forward, and the
    entropy is that distribution's; temperature 1 (the default) is exactly the untempered result."""
    rows = common.make_toy_rows(3, seed=6)
    prompts = [common.build_prompt(toy_tokenizer, r["problem"]) for r in rows]
    responses = [toy_tokenizer(r["solution"], add_special_tokens=False).input_ids[: 5 + 3 * i]
                 for i, r in enumerate(rows)]
    pad = toy_tokenizer.pad_token_id
    with torch.no_grad():
        cold, cold_entropy, mask = common.response_logprobs(toy_model, prompts, responses, pad, 7, temperature=0.5)
        default, _, _ = common.response_logprobs(toy_model, prompts, responses, pad, 7)
        one, _, _ = common.response_logprobs(toy_model, prompts, responses, pad, 7, temperature=1.0)
    assert torch.equal(default, one)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        full, chosen = naive_logprobs(toy_model, prompt, response, 0.5)
        assert torch.allclose(cold[i][mask[i]].double(), chosen, atol=1e-5)
        assert torch.allclose(cold_entropy[i][mask[i]].double(), -(full.exp() * full).sum(-1), atol=1e-5)
        _, warm = naive_logprobs(toy_model, prompt, response, 1.0)
        assert torch.allclose(default[i][mask[i]].double(), warm, atol=1e-5)
        assert not torch.allclose(cold[i][mask[i]].double(), warm, atol=1e-2)


# ---- micro-batches under a padded-token budget --------------------------------------------------------


def test_micro_batches_token_budget_and_sum_invariance():
    rng = random.Random(1)
    values = torch.randn(40, dtype=torch.float64)
    for _ in range(300):
        n = rng.randint(1, 40)
        indices = rng.sample(range(40), n)
        lengths = {i: rng.randint(1, 60) for i in indices}
        size, budget = rng.randint(1, 16), rng.choice([0, 1, 30, 100, 500])
        batches = common.micro_batches(indices, lengths, size, budget)
        assert sorted(i for b in batches for i in b) == sorted(indices)
        for b in batches:
            assert 1 <= len(b) <= size
            assert budget == 0 or len(b) * max(lengths[i] for i in b) <= budget or len(b) == 1
        total = sum(float(values[b].sum()) for b in batches)
        assert abs(total - float(values[indices].sum())) < 1e-9
    lengths = {0: 5, 1: 50, 2: 6, 3: 7}
    assert common.micro_batches(range(4), lengths, 64) == [[0, 2, 3, 1]]  # no budget: as before
    assert common.micro_batches(range(4), lengths, 64, 20) == [[0, 2], [3], [1]]  # 3 x 7 > 20; 50 alone
    assert common.micro_batches(range(4), lengths, 2) == [[0, 2], [3, 1]]


def test_micro_batches_same_count_splits_the_largest(monkeypatch):
    """same_count: every rank gets the most micro-batches any rank has, by splitting its largest ones."""
    monkeypatch.setattr(common, "_distributed", lambda: True)
    monkeypatch.setattr(common, "all_gather_cat", lambda t: torch.tensor([float(t[0]), 5.0]))
    lengths = {i: 10 + i for i in range(6)}
    batches = common.micro_batches(range(6), lengths, 64, 0, same_count=True)
    assert len(batches) == 5 and sorted(i for b in batches for i in b) == list(range(6))
    monkeypatch.setattr(common, "all_gather_cat", lambda t: torch.tensor([float(t[0]), 7.0]))
    with pytest.raises(RuntimeError, match="cannot make 7"):
        common.micro_batches(range(6), lengths, 64, 0, same_count=True)


# ---- the scripts pass their rollout temperature and budgets on ----------------------------------------


@pytest.mark.parametrize("script", ["antisd", "iw_opd"])
def test_scripts_score_at_the_rollout_temperature(tmp_path, monkeypatch, script):
    """Every log-prob pass of a step (policy, behaviour policy, teacher) runs at --temperature, and
    every micro-batch stays within --micro_batch_tokens; the engine gets --gen_batch_tokens."""
    module = __import__(script)
    calls, engines = [], []
    score, make_engine = common.response_logprobs, common.make_engine

    def recording_score(model, prompts, responses, pad_id, chunk_size=512, **kwargs):
        calls.append((kwargs.get("temperature", 1.0), len(prompts),
                      max(len(p) + len(r) for p, r in zip(prompts, responses))))
        return score(model, prompts, responses, pad_id, chunk_size, **kwargs)

    def recording_engine(*args, **options):
        engines.append(args[3:])
        return make_engine(*args, **options)

    monkeypatch.setattr(common, "response_logprobs", recording_score)
    monkeypatch.setattr(common, "make_engine", recording_engine)
    flags = ["--num_steps", "1", "--num_problems", "2", "--eval_dataset", "", "--max_new_tokens", "16",
             "--temperature", "0.5", "--num_minibatches", "2", "--micro_batch_tokens", "120",
             "--gen_batch_tokens", "500", "--output_dir", str(tmp_path), "--run_name", "t"]
    if script == "antisd":
        flags += ["--num_generations", "4", "--gate", "none"]
    else:
        flags += ["--num_rollouts", "4"]
    module.main(flags)
    assert engines == [(256, 500)]
    assert calls and all(t == 0.5 for t, _, _ in calls)
    assert all(rows * longest <= 120 or rows == 1 for _, rows, longest in calls)
    assert any(rows > 1 for _, rows, _ in calls)


def test_importing_common_sets_expandable_segments_unless_the_user_chose():
    import os
    import subprocess
    import sys

    code = "import os, common; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=common.__file__.rsplit("/", 1)[0],
                         capture_output=True, text=True, check=True).stdout.split()[-1]
    assert out == "expandable_segments:True"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"},
                         cwd=common.__file__.rsplit("/", 1)[0], capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    assert out == "max_split_size_mb:64"
