"""AntiSD end to end on the toy task: a few steps, ablation flags, 2 CPU ranks under torchrun,
FSDP2 gradients equal to one process, kill-and-resume equal to an uninterrupted run, bad input."""

import json
import math
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import antisd
import common
from common import UserError
from common import read_metrics as records  # a resume's superseded records dropped
from conftest import ROOT, run_script, torchrun

FAST = ["--num_problems", "4", "--num_generations", "4", "--eval_dataset", "", "--max_new_tokens", "24"]
TIMING = {"step_seconds", "tokens_per_second"}
ROLLOUTS = 16  # FAST: 4 problems x 4 rollouts
HEADER = antisd.TEACHER_CONTEXT.split("{solution}")[0]  # how every privileged context starts


class ScoredRows:
    """Records every row that `antisd.main` scores with `common.response_logprobs`: prompt text, response,
    whether it builds a graph (the student's loss) or not (teacher / behaviour pass), its log-probs
    and entropies, the step, and a checksum of the weights it was scored with."""

    def __init__(self, monkeypatch, tokenizer):
        self.rows, self.step = [], 0
        score, log = common.response_logprobs, common.RunLogger.log

        def recording_score(model, prompts, responses, pad_id, chunk_size=512, **kwargs):
            logprobs, entropy, mask = score(model, prompts, responses, pad_id, chunk_size, **kwargs)
            weights = sum(float(p.detach().double().sum()) for p in model.parameters())
            for prompt, response, row, row_entropy, row_mask in zip(prompts, responses, logprobs, entropy, mask):
                self.rows.append({"grad": torch.is_grad_enabled(), "step": self.step, "weights": weights,
                                  "prompt": tokenizer.decode(prompt), "response": tuple(response),
                                  "logprobs": row[row_mask].detach().clone(),
                                  "entropy": row_entropy[row_mask].detach().clone()})
            return logprobs, entropy, mask

        def counting_log(logger, step, metrics, prefix="step"):
            log(logger, step, metrics, prefix)
            self.step += prefix == "step"

        monkeypatch.setattr(common, "response_logprobs", recording_score)
        monkeypatch.setattr(common.RunLogger, "log", counting_log)
        # a prompt's text ends with the chat template's tail, after the user message
        self.tail = tokenizer.apply_chat_template([{"role": "user", "content": "QQQQ"}], tokenize=False,
                                                  add_generation_prompt=True).split("QQQQ")[1]

    def of_step(self, step, grad):
        return [row for row in self.rows if row["step"] == step and row["grad"] == grad]

    def context(self, teacher_prompt, student_prompt):
        """c when `teacher_prompt` is `student_prompt` with "\\n\\n" + c appended to its user message, else None."""
        body = student_prompt[: len(student_prompt) - len(self.tail)] + "\n\n"
        if student_prompt.endswith(self.tail) and teacher_prompt.startswith(body) and teacher_prompt.endswith(self.tail):
            return teacher_prompt[len(body): len(teacher_prompt) - len(self.tail)]
        return None


def pair_up(rows, partners, match):
    """Pair every row with a distinct partner for which match(row, partner) holds (greedy: partners
    that match the same rows have the same prompt, response and weights, so they are interchangeable)."""
    free, pairs = list(partners), []
    for row in rows:
        partner = next((p for p in free if match(row, p)), None)
        assert partner is not None, f"no partner for {row['prompt']!r} + {row['response']}"
        free.remove(partner)
        pairs.append((row, partner))
    return pairs


def recomputed_u(scored, step):
    """u of every token of `step`, from the recorded passes: the teacher row of a rollout (its plain
    prompt plus a privileged context, no graph) minus its behaviour row (the plain prompt: the
    no-graph behaviour pass with several minibatches, else the student's own forward)."""
    no_grad = scored.of_step(step, grad=False)
    teacher = [row for row in no_grad if HEADER in row["prompt"]]
    behaviour = [row for row in no_grad if HEADER not in row["prompt"]] or scored.of_step(step, grad=True)
    assert len(teacher) == len(behaviour) == ROLLOUTS

    def same_rollout(t, s):
        context = scored.context(t["prompt"], s["prompt"])
        return (t["response"] == s["response"] and context is not None and context.startswith(HEADER)
                and context.endswith(tuple(antisd.FEEDBACK.values())))

    pairs = pair_up(teacher, behaviour, same_rollout)
    assert all(t["weights"] == s["weights"] for t, s in pairs)  # the teacher is the policy that sampled
    return torch.cat([t["logprobs"] - s["logprobs"] for t, s in pairs])


def test_three_steps_on_toy(tmp_path):
    run_script([sys.executable, "antisd.py", "--num_steps", "3", "--eval_limit", "16", "--eval_k", "2",
                "--num_problems", "4", "--num_generations", "4", "--gate_warmup", "2",
                "--output_dir", str(tmp_path), "--run_name", "e2e"])
    logged = records(tmp_path / "e2e")
    evals = [r for r in logged if "eval/avg@2" in r]
    steps = [r for r in logged if "reward" in r]
    assert [r["step"] for r in evals] == [0, 3] and [r["step"] for r in steps] == [1, 2, 3]
    for key in ["reward", "response_len", "loss", "entropy", "gate_open", "lambda", "H_warm",
                "teacher_entropy_median", "u_neg_frac", "token_bonus_mean", "step_seconds", "tokens_per_second"]:
        assert key in steps[0]
    assert [r["lambda"] for r in steps[:2]] == [0.0, 0.0] and steps[2]["H_warm"] == pytest.approx(
        sorted([steps[0]["teacher_entropy_median"], steps[1]["teacher_entropy_median"]])[0] / 2
        + sorted([steps[0]["teacher_entropy_median"], steps[1]["teacher_entropy_median"]])[1] / 2)
    # after warm-up the gate starts open and closes when H < tau_down * H_warm (default tau_down 0.93)
    opened = steps[2]["teacher_entropy_median"] >= 0.93 * steps[2]["H_warm"]
    assert steps[2]["gate_open"] == opened and steps[2]["lambda"] == (0.5 if opened else 0.0)
    assert (steps[2]["token_bonus_mean"] != 0) == opened
    assert all(0 <= r["reward"] <= 1 and math.isfinite(r["loss"]) for r in steps)
    assert (tmp_path / "e2e" / "config.json").exists()


@pytest.mark.parametrize("flags,check", [
    (["--gate", "none"], lambda r: r["lambda"] == 0.5 and r["gate_open"] == 1 and r["token_bonus_mean"] != 0),
    (["--activation_checkpointing", "--gate", "none"], lambda r: r["lambda"] == 0.5 and math.isfinite(r["loss"])),
])
def test_baseline_and_ablation_flags(tmp_path, flags, check):
    history = antisd.main(FAST + ["--num_steps", "1", "--output_dir", str(tmp_path), "--run_name", "r"] + flags)
    assert history == {}
    (step,) = records(tmp_path / "r")
    assert check(step), step


@pytest.mark.parametrize("flags,signal", [
    (["--gate", "none"], lambda u: -0.5 * (torch.nn.functional.softplus(u) - math.log(2))),  # AntiSD: -phi(u)
    (["--signal", "sd"], lambda u: u),  # default self-distillation: +u, no gate
    (["--divergence", "rkl", "--gate", "none"], lambda u: -u),  # reverse-KL ascent: -u
])
def test_token_term_is_teacher_on_context_minus_student(tmp_path, monkeypatch, toy_tokenizer, flags, signal):
    """u = log pi_T(y|x, c) - log pi_S(y|x), recomputed from the rows main() scores: the teacher on
    the rollout's prompt plus a privileged context, the student on the plain prompt, both with the
    live weights; the logged u and token bonus must match it."""
    scored = ScoredRows(monkeypatch, toy_tokenizer)
    antisd.main(FAST + ["--num_steps", "2", "--output_dir", str(tmp_path), "--run_name", "u"] + flags)
    logged = records(tmp_path / "u")
    for step, metrics in enumerate(logged):
        u = recomputed_u(scored, step)
        assert metrics["lambda"] == 0.5
        assert metrics["u_mean"] == pytest.approx(u.mean().item(), rel=1e-4, abs=1e-6)
        assert metrics["u_neg_frac"] == pytest.approx((u < 0).double().mean().item())
        assert metrics["token_bonus_mean"] == pytest.approx(0.5 * signal(u).mean().item(), rel=1e-4, abs=1e-6)
    # the teacher is the live policy: step 2 scores with the weights step 1 updated
    assert scored.of_step(0, grad=False)[0]["weights"] != scored.of_step(1, grad=False)[0]["weights"]


def test_minibatches_use_behaviour_logprobs(tmp_path, monkeypatch, toy_tokenizer):
    """--num_minibatches 2: the second update sees ratios != 1, and both the ratio's denominator and u
    use the behaviour policy's log-probs (scored before any update), not the current ones."""
    scored = ScoredRows(monkeypatch, toy_tokenizer)
    antisd.main(FAST + ["--num_steps", "1", "--num_minibatches", "2", "--micro_batch_size", "3", "--gate", "none",
                        "--lr", "0.05", "--output_dir", str(tmp_path), "--run_name", "mb"])
    (metrics,) = records(tmp_path / "mb")
    u = recomputed_u(scored, 0)
    assert metrics["u_mean"] == pytest.approx(u.mean().item(), rel=1e-4, abs=1e-6)
    student = scored.of_step(0, grad=True)
    behaviour = [row for row in scored.of_step(0, grad=False) if HEADER not in row["prompt"]]
    assert len(student) == len(behaviour) == ROLLOUTS and len({row["weights"] for row in student}) == 2
    pairs = pair_up(student, behaviour, lambda s, b: (s["prompt"], s["response"]) == (b["prompt"], b["response"]))
    ratio = torch.cat([torch.exp(s["logprobs"] - b["logprobs"]) for s, b in pairs])
    clipped = ((ratio < 0.8) | (ratio > 1.28)).double().mean().item()
    assert clipped > 0  # the second minibatch is scored after an update
    assert metrics["clip_frac"] == pytest.approx(clipped)


@pytest.mark.parametrize("gate", ["entropy", "none"])
def test_grpo_runs_no_teacher_pass(tmp_path, monkeypatch, toy_tokenizer, gate):
    """--lambda_max 0 is GRPO: lambda stays 0, also once the gate's warm-up is over, and the only
    forward is the student's own (no teacher pass, no no-grad pass at all)."""
    scored = ScoredRows(monkeypatch, toy_tokenizer)
    antisd.main(FAST + ["--num_steps", "2", "--gate_warmup", "1", "--gate", gate, "--lambda_max", "0",
                        "--output_dir", str(tmp_path), "--run_name", "grpo"])
    logged = records(tmp_path / "grpo")
    assert [(r["lambda"], r["token_bonus_mean"]) for r in logged] == [(0.0, 0.0), (0.0, 0.0)]
    assert all(math.isnan(r["teacher_entropy_median"]) and math.isnan(r["u_mean"]) for r in logged)
    assert len(scored.rows) == 2 * ROLLOUTS and all(row["grad"] for row in scored.rows)
    assert not any(HEADER in row["prompt"] for row in scored.rows)


@pytest.mark.parametrize("flags", [["--tau_down", "1.0"], ["--tau_down", "0.01", "--lambda_max", "0.3"]])
def test_gate_options_reach_the_gate(tmp_path, flags):
    """--tau_down and --lambda_max are what the gate uses: with tau_down 1 it closes at the first step
    after warm-up, with 0.01 it stays open (one of the two would fail with the default 0.93)."""
    # seed 1: step 2's median teacher entropy is about 0.55 H_warm
    antisd.main(FAST + ["--num_steps", "2", "--gate_warmup", "1", "--seed", "1", "--output_dir", str(tmp_path),
                        "--run_name", "gate"] + flags)
    first, second = records(tmp_path / "gate")
    assert (first["gate_open"], first["lambda"]) == (0.0, 0.0)  # warm-up
    assert second["H_warm"] == pytest.approx(first["teacher_entropy_median"])
    tau_down, lambda_max = float(flags[1]), float(flags[3]) if len(flags) > 2 else 0.5
    opened = second["teacher_entropy_median"] >= tau_down * second["H_warm"]
    assert opened == (tau_down < 1)  # the scenario: entropy between 0.01 and 1 times H_warm (0.93 too)
    assert second["gate_open"] == opened and second["lambda"] == (lambda_max if opened else 0.0)
    assert (second["token_bonus_mean"] != 0) == opened


def test_gate_statistics_over_the_global_batch(tmp_path):
    """Under 2 ranks: teacher_entropy_median is the median over every response token of both ranks'
    rollouts, and H_warm the median of the warm-up steps' values (3 of them: not their mean)."""
    out = tmp_path / "entropies"
    run_script(torchrun(2) + ["tests/dist_gate_check.py", str(out), "--num_steps", "4", "--gate_warmup", "3",
                              "--output_dir", str(tmp_path), "--run_name", "gate2"] + FAST)
    logged = records(tmp_path / "gate2")
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in range(2)]
    medians = []
    for step, metrics in enumerate(logged):
        local = [torch.cat(rank[step]) for rank in ranks]
        assert sum(len(entropies) for entropies in local) == metrics["response_len"] * ROLLOUTS
        medians.append(float(np.median(torch.cat(local).numpy())))
        assert metrics["teacher_entropy_median"] == pytest.approx(medians[-1], rel=1e-6)
    rank0_medians = [float(np.median(torch.cat(step).numpy())) for step in ranks[0]]
    assert rank0_medians != pytest.approx(medians, rel=1e-6)  # one rank's median is not the global one
    assert logged[3]["H_warm"] == pytest.approx(statistics.median(medians[:3]), rel=1e-6)
    assert statistics.median(medians[:3]) != pytest.approx(statistics.mean(medians[:3]), rel=1e-6)


def test_eval_only(tmp_path):
    history = antisd.main(["--eval_only", "--eval_limit", "8", "--eval_k", "2", "--output_dir", str(tmp_path),
                           "--run_name", "ev"])
    assert set(history) == {"first"} and 0 <= history["first"]["eval/avg@2"] <= 1
    assert [r["step"] for r in records(tmp_path / "ev")] == [0]


def test_fsdp_two_ranks_gradients_equal_one_process(tmp_path):
    run_script([sys.executable, "tests/dist_grad_check.py", str(tmp_path / "one.pt"), "8"])
    run_script(torchrun(2) + ["tests/dist_grad_check.py", str(tmp_path / "two.pt"), "3"])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-6, rtol=1e-4), name
    assert max(g.abs().max().item() for g in one.values()) > 0


def test_torchrun_two_ranks_trains_and_checkpoints(tmp_path):
    from transformers import AutoModelForCausalLM

    import common

    # --gate none: the token term is on from step 1, so the update is non-zero even if every group
    # of these few rollouts has equal rewards
    result = run_script(torchrun(2) + ["tests/dist_train_check.py", "--num_steps", "2", "--save_every", "2",
                                       "--gate", "none", "--output_dir", str(tmp_path), "--run_name", "ddp"] + FAST)
    assert "step 2 |" in result.stdout
    assert result.stdout.count("PARAMS-EQUAL rank") == 2  # both ranks, identical full parameters after step 2
    checkpoint = tmp_path / "ddp" / "checkpoints" / "step_000002"
    trained = AutoModelForCausalLM.from_pretrained(checkpoint)
    initial = AutoModelForCausalLM.from_pretrained(common.build_toy_model("toy"))
    deltas = [(a - b).abs().max().item() for a, b in zip(trained.parameters(), initial.parameters())]
    assert max(deltas) > 0
    assert torch.equal(trained.get_output_embeddings().weight, trained.get_input_embeddings().weight)  # still tied
    assert [r["step"] for r in records(tmp_path / "ddp")] == [1, 2]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    args = ["antisd.py", "--num_steps", "6", "--save_every", "2", "--gate_warmup", "3",
            "--output_dir", str(tmp_path)] + FAST
    run_script([sys.executable] + args + ["--run_name", "straight"])
    killed = subprocess.Popen([sys.executable] + args + ["--run_name", "killed"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert latest.exists(), "the run never wrote a checkpoint"
    resumed = run_script([sys.executable] + args + ["--run_name", "killed", "--resume"])
    assert "[resume] continuing" in resumed.stdout
    straight, again = records(tmp_path / "straight"), records(tmp_path / "killed")
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, again):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


def test_bad_input_is_a_clear_error(tmp_path):
    """Input errors are UserErrors with exact messages (more in test_errors.py and test_runs.py)."""
    with pytest.raises(UserError, match=r"^--num_generations 1: must be >= 2 \(GRPO's baseline"):
        antisd.main(["--num_generations", "1"])
    with pytest.raises(UserError, match="Unknown --model 'gpt-5'"):
        antisd.main(["--model", "gpt-5", "--output_dir", str(tmp_path)])
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(UserError, match="no column 'problem'"):
        antisd.main(["--dataset", str(data), "--output_dir", str(tmp_path)])
    result = run_script(torchrun(2) + ["antisd.py", "--num_problems", "3", "--output_dir", str(tmp_path)],
                        check=False, timeout=120)
    assert result.returncode != 0 and "error: --num_problems 3 does not divide over 2 ranks" in result.stdout


def test_premise_metrics_and_token_picture(tmp_path):
    """Every step logs the premise (u on work / answer tokens of correct rollouts, the careful share);
    the token picture holds the latest step's rollouts, written at each evaluation and at the end."""
    antisd.main(["--num_steps", "1", "--num_problems", "16", "--num_generations", "4", "--max_new_tokens", "48",
                 "--eval_limit", "4", "--eval_k", "1", "--picture_rollouts", "6", "--output_dir", str(tmp_path),
                 "--run_name", "pic"])
    (step,) = [r for r in records(tmp_path / "pic") if "reward" in r]
    assert 0 < step["careful_frac"] < 1
    assert step["u_work"] < 0 < step["u_answer"]  # the toy's premise, at step 1 (test_toy.py measures it)
    page = (tmp_path / "pic" / "tokens.html").read_text()
    assert page.count('class="row"') == 6 and page.count("step 1 | reward ") == 6
    assert "u_t=" in page and "bonus=" in page
    assert "<span>u_t = -1</span>" in page and "fixed scale, the same in every picture" in page
