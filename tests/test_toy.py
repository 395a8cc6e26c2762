"""The built-in toy models: real HF format, chat template, and accuracy in the intended ranges."""

import torch

import common

ACCURACY = {}


def toy_accuracy(name):
    """avg@4 on the toy test split at the scripts' eval settings (temperature 0.7, top-p 0.95)."""
    if name not in ACCURACY:
        dist_info = common.init_distributed()
        tokenizer = common.load_tokenizer(name)
        model = common.load_model(name, dist_info, trainable=False)
        torch.manual_seed(0)
        grader = common.Grader()
        metrics = common.evaluate(common.HFEngine(model, tokenizer, 256), tokenizer, common.load_problems("toy", "test"),
                                  grader, common.SamplingParams(0.7, 0.95, 0, 40), 4, dist_info)
        grader.close()
        ACCURACY[name] = metrics["eval/avg@4"]
    return ACCURACY[name]


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


def test_toy_accuracy_leaves_headroom_for_rl():
    accuracy = toy_accuracy("toy")
    assert 0.15 <= accuracy <= 0.70, accuracy


def test_toy_large_is_clearly_stronger():
    assert toy_accuracy("toy-large") >= toy_accuracy("toy") + 0.08, ACCURACY


def test_privileged_context_makes_the_self_teacher_informative():
    """Shown a reference solution (the form the methods use), the toy model mostly answers right."""
    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer("toy")
    model = common.load_model("toy", dist_info, trainable=False)
    rows = common.load_problems("toy", "test")[:64]
    prompts = [common.build_prompt(tokenizer, r["problem"], common.TOY_CONTEXT_HEADER + r["solution"] +
                                   "\n\nYour previous attempt was incorrect.") for r in rows]
    torch.manual_seed(0)
    responses = common.HFEngine(model, tokenizer).generate(prompts, common.SamplingParams(1.0, 1.0, 0, 40))
    grader = common.Grader()
    rewards, _ = grader.grade(tokenizer.batch_decode(responses, skip_special_tokens=True), [r["answer"] for r in rows])
    grader.close()
    assert sum(rewards) / len(rewards) >= 0.6


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
        tokens = common.sample_token(logits.repeat(draws, 1), params).view(draws, -1)
        frequencies = torch.stack([torch.bincount(tokens[:, row], minlength=40) for row in range(6)]).float() / draws
        assert (frequencies[probs == 0] == 0).all()
        assert (frequencies - probs).abs().max() < 0.03, (temperature, top_k, top_p)
