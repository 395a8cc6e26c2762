"""The built-in toy models: real HF format, chat template, and accuracy in the intended ranges."""

import torch

import common
from toy_premises import sample, self_teacher_u, strategy_accuracy, teacher_gap_by_third

SAMPLES = {}


def toy_samples(name, temperature=0.7):
    """4 samples per toy test problem: (rows, texts, rewards), 4 consecutive entries per problem."""
    if (name, temperature) not in SAMPLES:
        tokenizer = common.load_tokenizer(name)
        model = common.load_model(name, common.init_distributed(), trainable=False)
        rows = common.load_problems("toy", "test")
        _, _, texts = sample(model, tokenizer, rows, 0, temperature)
        grader = common.Grader()
        rewards, _ = grader.grade(texts, [r["answer"] for r in rows for _ in range(4)])
        grader.close()
        SAMPLES[name, temperature] = rows, texts, rewards
    return SAMPLES[name, temperature]


def accuracy(name, temperature=0.7, strategy="all", level=0):
    return strategy_accuracy(*toy_samples(name, temperature))[strategy, level]


def careful_share(name, temperature=0.7):
    _, texts, _ = toy_samples(name, temperature)
    return sum(map(common.writes_work, texts)) / len(texts)


def test_toy_model_is_a_hf_qwen3_with_chat_template():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = common.build_toy_model("toy")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("12+3=15", add_special_tokens=False, return_offsets_mapping=True)
    assert len(ids.input_ids) == 7 and ids.offset_mapping[3] == (3, 4)  # character level
    assert common.stop_token_ids(tokenizer, model) == [tokenizer.eos_token_id]
    # think tags are single, non-special tokens (as in Qwen3): decoding keeps them
    think = tokenizer("<think>\n</think>", add_special_tokens=False).input_ids
    assert len(think) == 3 and tokenizer.decode(think, skip_special_tokens=True) == "<think>\n</think>"


def test_toy_leaves_headroom_and_mostly_takes_the_shortcut():
    assert 0.2 <= accuracy("toy") <= 0.55, accuracy("toy")
    assert careful_share("toy", 1.0) <= 0.4 and careful_share("toy") <= 0.4


def test_careful_strategy_is_clearly_better():
    """The win RL can find: careful responses beat the shortcut overall and on the hardest level."""
    hardest = common.TOY_MAX_OPS
    assert accuracy("toy", strategy="careful") >= accuracy("toy", strategy="shortcut") + 0.15
    assert accuracy("toy", strategy="careful", level=hardest) >= accuracy("toy", strategy="shortcut", level=hardest) + 0.15
    assert accuracy("toy", strategy="shortcut", level=hardest) <= 0.2  # the shortcut cannot compose long chains


def test_pass_rates_spread_over_levels():
    assert accuracy("toy", level=1) >= accuracy("toy", level=common.TOY_MAX_OPS) + 0.3


def test_toy_large_is_stronger_and_prefers_the_careful_strategy():
    assert accuracy("toy-large") >= accuracy("toy") + 0.15
    assert careful_share("toy-large") >= 0.6


def test_self_teacher_premise_u_negative_on_work_positive_on_answer():
    """Shown a verified answer, the self-teacher gives deliberation low and the answer high probability
    (on correct rollouts, as antisd.py logs u_work / u_answer)."""
    tokenizer = common.load_tokenizer("toy")
    model = common.load_model("toy", common.init_distributed(), trainable=False)
    rows = common.load_problems("toy", "test")[:96]
    u = self_teacher_u(model, tokenizer, rows, *sample(model, tokenizer, rows, 0, 1.0))
    assert min(count for _, count in u.values()) >= 10, u
    assert u["work"][0] < 0 < u["answer"][0], u
    assert u["decide careful"][0] < -0.3 and u["decide shortcut"][0] > 0, u


def test_strong_teacher_disagrees_most_at_the_first_tokens():
    """IW-OPD's premise: on the student's rollouts, |log p_toy-large - log p_toy| is largest early."""
    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer("toy")
    student = common.load_model("toy", dist_info, trainable=False)
    teacher = common.load_model("toy-large", dist_info, trainable=False)
    rows = common.load_problems("toy", "test")[:64]
    prompts, responses, _ = sample(student, tokenizer, rows, 0, 1.0)
    first, last = teacher_gap_by_third(student, teacher, tokenizer, prompts, responses)
    assert first > 1.2 * last, (first, last)  # measured: about 1.4x (README)


def test_privileged_context_makes_the_self_teacher_informative():
    """Shown a reference solution (the form the methods use), the toy model answers right, mostly at once."""
    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer("toy")
    model = common.load_model("toy", dist_info, trainable=False)
    rows = common.load_problems("toy", "test")[:64]
    prompts = [common.build_prompt(tokenizer, r["problem"], common.TOY_CONTEXT_HEADER + r["solution"] +
                                   "\n\nYour previous attempt was incorrect.") for r in rows]
    torch.manual_seed(0)
    responses = common.HFEngine(model, tokenizer).generate(prompts, common.SamplingParams(1.0, 1.0, 0, 64))
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    grader = common.Grader()
    rewards, _ = grader.grade(texts, [r["answer"] for r in rows])
    grader.close()
    assert sum(rewards) / len(rewards) >= 0.8
    assert sum(map(common.writes_work, texts)) / len(texts) <= 0.25


def test_hf_engine_greedy_top_k_and_stop(toy_model, toy_tokenizer):
    """Greedy = argmax decoding by hand; top_k=1 sampling = greedy; responses stop at EOS (kept)
    and carry no padding, whatever the prompt lengths in the left-padded batch."""
    tok = toy_tokenizer
    rows = common.make_toy_rows(4, seed=21)
    prompts = [common.build_prompt(tok, r["problem"]) for r in rows]
    prompts[1] = common.build_prompt(tok, rows[1]["problem"], context="Reference solution:\n" + rows[1]["solution"])
    engine = common.HFEngine(toy_model, tok, batch_size=3)
    greedy = engine.generate(prompts, common.SamplingParams(temperature=0, max_new_tokens=30))
    torch.manual_seed(123)
    top1 = engine.generate(prompts, common.SamplingParams(temperature=1.0, top_k=1, max_new_tokens=30))
    assert greedy == top1
    with torch.no_grad():
        for prompt, response in zip(prompts, greedy):
            ids, manual = list(prompt), []
            for _ in range(30):
                token = int(toy_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                manual.append(token)
                ids.append(token)
                if token == tok.eos_token_id:
                    break
            assert response == manual
    assert all(r[-1] == tok.eos_token_id and tok.pad_token_id not in r for r in greedy)
    short = engine.generate(prompts[:1], common.SamplingParams(temperature=0, max_new_tokens=3))
    assert short == [greedy[0][:3]]  # truncated: no stop token


def test_sample_token_follows_hf_warpers():
    """Temperature, top-k and top-p filtering as Hugging Face's logits warpers apply them (in that
    order): samples fall in the kept set, with the frequencies of the filtered softmax."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 2.5
    for temperature, top_k, top_p in [(0.7, 0, 0.95), (1.0, 5, 1.0), (1.3, 10, 0.8), (1.0, 0, 0.3)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits)
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        probs = expected.softmax(-1)
        draws = 4000
        params = common.SamplingParams(temperature, top_p, top_k)
        tokens = common.sample_token(logits.repeat(draws, 1), params)[0].view(draws, -1)
        frequencies = torch.stack([torch.bincount(tokens[:, row], minlength=40) for row in range(6)]).float() / draws
        assert (frequencies[probs == 0] == 0).all()
        assert (frequencies - probs).abs().max() < 0.03, (temperature, top_k, top_p)


# A stand-in builder: holds the toy build lock, records itself as the real builder does, reports one
# progress line, then "finishes" (writes the model's config.json) and exits.
FAKE_BUILDER = r"""
import fcntl, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import common
lock_path, target = Path(sys.argv[2]), Path(sys.argv[3])
with open(lock_path, "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    common._note_toy_build(lock, "12:00:00", "starting")
    print("holding", flush=True)
    time.sleep(2)
    common._note_toy_build(lock, "12:00:00", "toy step 101/1000 (40s in)")
    time.sleep(3)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
"""


def test_a_process_waiting_for_the_toy_build_names_the_builder_and_its_progress(
        tmp_path, monkeypatch, capsys):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ROOT

    monkeypatch.setenv("RLVR_TOY_CACHE", str(tmp_path))
    monkeypatch.setattr(common, "TOY_WAIT_REPORT_SECONDS", 1.0)
    target = common._toy_target("toy")
    builder = subprocess.Popen([sys.executable, "-c", FAKE_BUILDER, str(ROOT), str(tmp_path / ".toy.lock"),
                                str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline() == "holding\n"
        assert common.build_toy_model("toy") == target  # waited, then reused the other's build
    finally:
        builder.wait(timeout=60)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"[toy] waiting for another process to build 'toy': pid {builder.pid} on "
                        f"{common.socket.gethostname()}, since 12:00:00: {Path(sys.executable).name} -c "
                        f"{ROOT} {tmp_path / '.toy.lock'} {target}")  # python -c: argv has no code
    progress = [line for line in lines[1:] if line.startswith("[toy] still waiting for 'toy' (")]
    assert progress and progress[-1].endswith("s): the builder is at toy step 101/1000 (40s in)")
    assert len(lines) == 1 + len(progress)
