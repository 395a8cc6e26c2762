"""The built-in toy models: real HF format, chat template, and accuracy in the intended ranges."""

import torch

import common

SAMPLES = {}


def toy_samples(name, temperature=0.7):
    """4 samples per toy test problem at the scripts' eval settings (top-p 0.95 at T 0.7; plain
    sampling at T 1.0, the rollout setting): (rows, texts, rewards), 4 consecutive entries per problem."""
    if (name, temperature) not in SAMPLES:
        dist_info = common.init_distributed()
        tokenizer = common.load_tokenizer(name)
        model = common.load_model(name, dist_info, trainable=False)
        rows = common.load_problems("toy", "test")
        prompts = [common.build_prompt(tokenizer, r["problem"]) for r in rows for _ in range(4)]
        torch.manual_seed(0)
        params = common.SamplingParams(temperature, 0.95 if temperature < 1 else 1.0, 0, 64)
        responses = common.HFEngine(model, tokenizer, 256).generate(prompts, params)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        grader = common.Grader()
        rewards, _ = grader.grade(texts, [r["answer"] for r in rows for _ in range(4)])
        grader.close()
        SAMPLES[name, temperature] = rows, texts, rewards
    return SAMPLES[name, temperature]


def accuracy(name, temperature=0.7, strategy=None, level=None):
    rows, texts, rewards = toy_samples(name, temperature)
    picked = [r for i, (t, r) in enumerate(zip(texts, rewards))
              if (strategy is None or common.writes_work(t) == (strategy == "careful"))
              and (level is None or rows[i // 4]["level"] == level)]
    return sum(picked) / max(1, len(picked))


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
    (measured on correct rollouts, as antisd.py logs u_work / u_answer)."""
    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer("toy")
    model = common.load_model("toy", dist_info, trainable=False)
    rows = common.load_problems("toy", "test")[:96]
    prompts = [common.build_prompt(tokenizer, r["problem"]) for r in rows for _ in range(4)]
    torch.manual_seed(0)
    responses = common.HFEngine(model, tokenizer, 256).generate(prompts, common.SamplingParams(1.0, 1.0, 0, 64))
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    keep = [i for i, t in enumerate(texts) if common.extract_boxed_answer(t) == rows[i // 4]["answer"]]
    context = common.TOY_CONTEXT_HEADER + "\\boxed{{{}}}\n\n" + common.TOY_FEEDBACK_LINES[0]
    teacher_prompts = [common.build_prompt(tokenizer, rows[i // 4]["problem"], context.format(rows[i // 4]["answer"]))
                       for i in keep]
    with torch.no_grad():
        student, _, mask = common.response_logprobs(model, [prompts[i] for i in keep], [responses[i] for i in keep],
                                                    tokenizer.pad_token_id)
        teacher, _, _ = common.response_logprobs(model, teacher_prompts, [responses[i] for i in keep],
                                                 tokenizer.pad_token_id)
    u = teacher - student
    sums = {"work": [], "answer": [], "decide_careful": [], "decide_shortcut": []}
    for row, i in enumerate(keep):
        roles = common.token_roles(*common.response_token_spans(tokenizer, responses[i]))
        for t, role in enumerate(roles):
            if role in sums:
                sums[role].append(u[row, t].item())
        # token 2 (after "<think>", "\n") decides the strategy: a digit (careful) or "</think>" (shortcut)
        sums["decide_careful" if common.writes_work(texts[i]) else "decide_shortcut"].append(u[row, 2].item())
    mean = {k: sum(v) / len(v) for k, v in sums.items()}
    assert min(len(v) for v in sums.values()) >= 10, {k: len(v) for k, v in sums.items()}
    assert mean["work"] < 0 < mean["answer"], mean
    assert mean["decide_careful"] < -0.3 and mean["decide_shortcut"] > 0, mean


def test_strong_teacher_disagrees_most_at_the_first_tokens():
    """IW-OPD's premise: on the student's rollouts, |log p_toy-large - log p_toy| is largest early."""
    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer("toy")
    student = common.load_model("toy", dist_info, trainable=False)
    teacher = common.load_model("toy-large", dist_info, trainable=False)
    rows = common.load_problems("toy", "test")[:64]
    prompts = [common.build_prompt(tokenizer, r["problem"]) for r in rows for _ in range(4)]
    torch.manual_seed(0)
    responses = common.HFEngine(student, tokenizer, 256).generate(prompts, common.SamplingParams(1.0, 1.0, 0, 64))
    with torch.no_grad():
        s, _, mask = common.response_logprobs(student, prompts, responses, tokenizer.pad_token_id)
        t, _, _ = common.response_logprobs(teacher, prompts, responses, tokenizer.pad_token_id)
    gap = (t - s).abs()
    first, last = [], []
    for row, response in enumerate(responses):
        third = max(1, len(response) // 3)
        first.append(gap[row, :third].mean().item())
        last.append(gap[row, len(response) - third: len(response)].mean().item())
    assert sum(first) / len(first) > 1.5 * sum(last) / len(last), (sum(first) / len(first), sum(last) / len(last))


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
