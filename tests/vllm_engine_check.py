"""The real vLLM engine (CPU build) against the trainer, on the toy: `python tests/vllm_engine_check.py
OUT.json`. One engine start (about a minute on 2 cores) for every check, in a process of its own
(vLLM binds this process's threads to cores); tests/test_vllm.py asserts on what it writes.

Written: the sampler's log-prob error against `response_logprobs` at T = 0.7 (fp32 engine), before
and after an optimizer step that is not pushed (a stale engine), after the push, and with the prefix
cache left un-reset after a push (what `update_weights` must avoid); the reward of the toy's test
problems sampled by vLLM; and the time of a push relative to an optimizer step."""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

TEMPERATURE = 0.7


def logprob_error(engine, model, tokenizer, prompts, params):
    """Max |vLLM's log-prob - the trainer's| over every sampled token, and the responses."""
    responses, sampler = engine.generate(prompts, params, logprobs=True)
    with torch.no_grad():
        trainer, _, mask = common.response_logprobs(model, prompts, responses, tokenizer.pad_token_id,
                                                    temperature=params.temperature)
    sampler = common.pad_rows(sampler, mask.device)[:, : mask.shape[1]]
    error = (trainer - sampler).abs()[mask].max()
    return float(error), responses


def optimizer_step(model, optimizer, tokenizer, prompts, responses):
    """One real update: raise the log-likelihood of the sampled responses."""
    start = time.perf_counter()
    logprobs, _, mask = common.response_logprobs(model, prompts, responses, tokenizer.pad_token_id)
    (-(logprobs * mask).sum() / mask.sum()).backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def main(out: str) -> None:
    torch.manual_seed(0)
    dist_info = common.init_distributed()
    path = str(common.build_toy_model("toy"))
    tokenizer = common.load_tokenizer(path)
    model = common.load_model(path, dist_info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    engine = common.VLLMEngine(model, tokenizer, path, dist_info, max_model_len=1024,
                               kv_cache_gib=0.25, seed=0)
    result = {"engine_start_s": time.perf_counter() - started, "dtype": str(
        engine.llm.llm_engine.model_config.dtype), "block_size": engine.llm.llm_engine.vllm_config
        .cache_config.block_size}
    rows = common.load_problems("toy", "test")[:32]
    prompts = [common.build_prompt(tokenizer, row["problem"]) for row in rows]
    params = common.SamplingParams(TEMPERATURE, 1.0, 0, 64)

    # serves the toy: sampled answers are graded like the hf engine's
    result["error_initial"], responses = logprob_error(engine, model, tokenizer, prompts, params)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    grader = common.Grader()
    rewards, _ = grader.grade(texts, [row["answer"] for row in rows])
    grader.close()
    result["reward"] = sum(rewards) / len(rewards)

    # an optimizer step the engine does not see, then the push
    result["step_s"] = optimizer_step(model, optimizer, tokenizer, prompts, responses)
    result["error_stale"], _ = logprob_error(engine, model, tokenizer, prompts, params)
    started = time.perf_counter()
    engine.update_weights(model)
    result["push_s"] = time.perf_counter() - started
    result["error_pushed"], responses = logprob_error(engine, model, tokenizer, prompts, params)

    # the prefix cache: prompts longer than a block are cached; a push that does not reset the
    # cache leaves their KV blocks from the old weights
    long_context = common.TOY_CONTEXT_HEADER + "\n".join(row["solution"] for row in rows[:4])
    long_prompts = [common.build_prompt(tokenizer, row["problem"], long_context) for row in rows[:8]]
    result["long_prompt_tokens"] = min(map(len, long_prompts))
    logprob_error(engine, model, tokenizer, long_prompts, params)  # fills the cache
    optimizer_step(model, optimizer, tokenizer, prompts, responses)
    reset = engine.llm.reset_prefix_cache
    engine.llm.reset_prefix_cache = lambda: True  # a push that forgets the cache
    engine.update_weights(model)
    result["error_cache_not_reset"], _ = logprob_error(engine, model, tokenizer, long_prompts, params)
    engine.llm.reset_prefix_cache = reset
    optimizer_step(model, optimizer, tokenizer, prompts, responses)
    engine.update_weights(model)
    result["error_cache_reset"], _ = logprob_error(engine, model, tokenizer, long_prompts, params)
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
