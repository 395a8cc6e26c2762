"""Contract of common.VLLMEngine against a stand-in `vllm` package that records every call.

vLLM cannot be installed or run here (no GPU), so this checks what the engine asks of vLLM, not
vLLM itself: weights pushed before the next generation, under the model's own names, complete and
one tensor at a time; the prefix cache reset after each push; sleep/wake order (level 1 and 2, never
sampling from discarded weights); sampler log-probs aligned with the returned tokens."""

import sys
import textwrap
from unittest import mock

import pytest
import torch

import common

FAKE_VLLM = textwrap.dedent('''
    """Stand-in for vllm: records calls in LOG; samples deterministic fake tokens."""
    import math
    from types import SimpleNamespace

    import torch

    LOG = []


    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            LOG.append(("SamplingParams", kwargs))


    class Logprob:
        def __init__(self, logprob):
            self.logprob = logprob


    class Runner:
        def __init__(self, llm):
            self.llm = llm

        def load_weights(self, weights):
            weights = list(weights)
            for name, tensor in weights:
                if self.llm.asleep["weights"]:
                    raise AssertionError("load_weights into sleeping (offloaded) weights")
                self.llm.weights[name] = tensor.detach().clone()
                self.llm.garbage = False  # (a partial push is caught by the tests' weight comparison)
                LOG.append(("load_weights", name, len(weights)))
            return {name for name, _ in weights}


    class LLM:
        def __init__(self, model, **kwargs):
            LOG.append(("init", dict(model=model, **kwargs)))
            self.weights, self.garbage = {}, False  # it loaded the weights of model_path itself
            self.asleep = {"weights": False, "kv_cache": False}
            runner = Runner(self)
            self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
                worker=SimpleNamespace(model_runner=SimpleNamespace(model=runner)))))

        def sleep(self, level=1):
            LOG.append(("sleep", level))
            self.asleep = {"weights": True, "kv_cache": True}
            if level == 2:  # weights discarded: whatever is there after wake_up is garbage
                self.weights, self.garbage = {}, True

        def wake_up(self, tags=None):
            LOG.append(("wake_up", tuple(tags or ["weights", "kv_cache"])))
            for tag in tags or ["weights", "kv_cache"]:
                self.asleep[tag] = False

        def reset_prefix_cache(self):
            LOG.append(("reset_prefix_cache",))
            return True

        def generate(self, prompts, sampling_params, use_tqdm=True):
            if any(self.asleep.values()):
                raise AssertionError(f"generate while asleep: {self.asleep}")
            if self.garbage:
                raise AssertionError("generate from discarded (level-2) weights")
            LOG.append(("generate", [list(p["prompt_token_ids"]) for p in prompts],
                        {name: value.clone() for name, value in self.weights.items()}))
            outputs = []
            for i, prompt in enumerate(prompts):
                tokens = [(7 * i + j) % 11 + 3 for j in range(2 + i % 3)]
                logprobs = [{token: Logprob(-0.1 * (j + 1) - i), 99: Logprob(-5.0)} for j, token in enumerate(tokens)]
                outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(tokens), logprobs=logprobs)]))
            return outputs
''')


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_VLLM)
    (package / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm

    yield vllm
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def model_and_tokenizer():
    tokenizer = common.load_tokenizer("toy")
    model = common.load_model("toy", common.init_distributed())
    return model, tokenizer


def make(model, tokenizer, **options):
    # --rollout vllm is refused without CUDA; the stand-in needs none, so that check is told yes
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        return common.make_engine("vllm", model, tokenizer, model_path="/models/toy", dist_info=common.init_distributed(),
                                  vllm_options=options)


def events(log, *kinds):
    return [entry for entry in log if entry[0] in kinds]


def short(log):
    """The call sequence, with each push's load_weights calls folded into one ("push", count)."""
    out = []
    for entry in log:
        if entry[0] == "load_weights":
            if out and out[-1][0] == "push":
                out[-1] = ("push", out[-1][1] + 1)
            else:
                out.append(("push", 1))
        elif entry[0] in ("sleep", "wake_up"):
            out.append(entry)
        elif entry[0] in ("reset_prefix_cache", "generate", "init"):
            out.append((entry[0],))
    return out


def train_step(model):
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)


def test_engine_setup_and_sampling_params(fake_vllm, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = make(model, tokenizer, gpu_memory_utilization=0.35, seed=5)
    (init,) = events(fake_vllm.LOG, "init")
    assert init[1]["distributed_executor_backend"] == "external_launcher" and init[1]["tensor_parallel_size"] == 1
    assert init[1]["gpu_memory_utilization"] == 0.35 and init[1]["logprobs_mode"] == "processed_logprobs"
    assert init[1]["model"] == "/models/toy" and init[1]["enable_sleep_mode"] is False and init[1]["seed"] == 5
    prompts = [[1, 2, 3], [4, 5]]
    engine.generate(prompts, common.SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12))
    params = events(fake_vllm.LOG, "SamplingParams")[-1][1]
    assert params == dict(n=1, temperature=0.7, top_p=0.9, top_k=-1, max_tokens=12, logprobs=0, detokenize=False,
                          stop_token_ids=common.stop_token_ids(tokenizer, model))
    assert events(fake_vllm.LOG, "generate")[-1][1] == prompts  # generation from token ids
    engine.generate(prompts, common.SamplingParams(temperature=0.0, max_new_tokens=4))
    greedy = events(fake_vllm.LOG, "SamplingParams")[-1][1]
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, -1)


def test_sampler_logprobs_aligned_with_tokens(fake_vllm, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = make(model, tokenizer)
    prompts = [[1], [2], [3], [4]]
    responses, logprobs = engine.generate(prompts, common.SamplingParams(), logprobs=True)
    assert responses == [[(7 * i + j) % 11 + 3 for j in range(2 + i % 3)] for i in range(4)]
    assert logprobs == [[pytest.approx(-0.1 * (j + 1) - i) for j in range(2 + i % 3)] for i in range(4)]
    assert engine.generate(prompts, common.SamplingParams()) == responses  # logprobs=False: responses only


def test_push_is_complete_named_one_at_a_time_and_resets_the_prefix_cache(fake_vllm, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = make(model, tokenizer)
    prompts = [[1, 2]]
    engine.generate(prompts, common.SamplingParams())
    train_step(model)
    engine.update_weights(model)
    engine.generate(prompts, common.SamplingParams())
    loads = events(fake_vllm.LOG, "load_weights")
    names = [name for name, _ in model.named_parameters()]
    assert [entry[1] for entry in loads] == names  # every parameter once, the model's own (HF) names
    assert {entry[2] for entry in loads} == {1}  # one tensor per load_weights call, never the state dict
    sequence = short(fake_vllm.LOG)
    assert sequence == [("init",), ("generate",), ("push", len(names)), ("reset_prefix_cache",), ("generate",)]
    # the second generation saw the trained weights
    seen = events(fake_vllm.LOG, "generate")[-1][2]
    for name, param in model.named_parameters():
        assert torch.equal(seen[name], param.detach())


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_order(fake_vllm, model_and_tokenizer, level):
    model, tokenizer = model_and_tokenizer
    engine = make(model, tokenizer, sleep_level=level)
    n = len(list(model.parameters()))
    prompts, params = [[1, 2]], common.SamplingParams()
    engine.generate(prompts, params)                     # first rollout
    train_step(model)
    engine.update_weights(model)                         # after the optimizer step
    engine.generate(prompts, params)                     # next rollout
    engine.generate(prompts, params)                     # e.g. an evaluation right after, no push between
    W, K = ("wake_up", ("weights",)), ("wake_up", ("kv_cache",))
    S = ("sleep", level)
    push = [("push", n), ("reset_prefix_cache",)]
    first = [W, K] if level == 1 else [W, *push, K]  # level 2 discarded the weights it loaded: reload them
    again = [W, K] if level == 1 else [W, *push, K]
    assert short(fake_vllm.LOG) == [("init",), S, *first, ("generate",), S,
                                    W, *push,                    # update_weights wakes the weights only
                                    K, ("generate",), S,
                                    *again, ("generate",), S]
    seen = events(fake_vllm.LOG, "generate")[-1][2]
    for name, param in model.named_parameters():  # never stale, never garbage
        assert torch.equal(seen[name], param.detach())
    assert engine.generate(prompts, params, logprobs=True)[1]  # still aligned after sleeping


def test_rollout_auto(fake_vllm, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.resolve_rollout("auto") == "hf"  # no CUDA: hf, even with vllm importable
    assert "[rollout] engine: hf (--rollout auto: no CUDA)" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.resolve_rollout("auto") == "vllm"
    assert "vLLM importable and CUDA available" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(common.UserError, match="--rollout vllm needs a CUDA GPU"):
        common.resolve_rollout("vllm")


def test_missing_vllm_is_a_user_error(monkeypatch, model_and_tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(common.UserError, match="pip install"):
        make(*model_and_tokenizer)


def test_push_gathers_one_full_tensor_at_a_time(fake_vllm, model_and_tokenizer):
    """Under FSDP2 each parameter is a DTensor shard: the push gathers one (`full_tensor()`, a
    collective every rank runs in the same order) and loads it before gathering the next."""
    model, tokenizer = model_and_tokenizer
    engine = make(model, tokenizer)
    order = []

    class Shard:  # stands in for a DTensor parameter
        def __init__(self, name, full):
            self.name, self.full = name, full

        def full_tensor(self):
            order.append(("gather", self.name))
            return self.full

    class Sharded:
        def named_parameters(self):
            return [(name, Shard(name, param.detach() + 1)) for name, param in model.named_parameters()]

    runner = engine._runner_model()
    load = runner.load_weights

    def recording_load(weights):
        weights = list(weights)
        order.extend(("load", name) for name, _ in weights)
        return load(weights)

    runner.load_weights = recording_load
    engine.update_weights(Sharded())
    names = [name for name, _ in model.named_parameters()]
    assert order == [step for name in names for step in (("gather", name), ("load", name))]
