"""AntiSD end to end on the toy task: a few steps, ablation flags, 2 CPU ranks under torchrun,
FSDP2 gradients equal to one process, kill-and-resume equal to an uninterrupted run, bad input."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

import antisd
from common import UserError
from conftest import ROOT, run_script, torchrun

FAST = ["--num_problems", "4", "--num_generations", "4", "--eval_dataset", "", "--max_new_tokens", "24"]
TIMING = {"step_seconds", "tokens_per_second"}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
    assert steps[2]["lambda"] == (0.5 if steps[2]["gate_open"] else 0.0)
    assert all(0 <= r["reward"] <= 1 and math.isfinite(r["loss"]) for r in steps)
    assert (tmp_path / "e2e" / "config.json").exists()


@pytest.mark.parametrize("flags,check", [
    (["--lambda_max", "0"], lambda r: r["token_bonus_mean"] == 0 and r["lambda"] == 0),
    (["--gate", "none"], lambda r: r["lambda"] == 0.5 and r["gate_open"] == 1),
    (["--signal", "sd"], lambda r: r["lambda"] == 0.5 and r["token_bonus_mean"] == pytest.approx(0.5 * r["u_mean"])),
    (["--divergence", "rkl", "--gate", "none"],
     lambda r: r["token_bonus_mean"] == pytest.approx(-0.5 * r["u_mean"])),
    (["--num_minibatches", "2", "--micro_batch_size", "3"], lambda r: r["lambda"] == 0),
    (["--activation_checkpointing", "--gate", "none"], lambda r: r["lambda"] == 0.5 and math.isfinite(r["loss"])),
])
def test_baseline_and_ablation_flags(tmp_path, flags, check):
    history = antisd.main(FAST + ["--num_steps", "1", "--output_dir", str(tmp_path), "--run_name", "r"] + flags)
    assert history == {}
    (step,) = records(tmp_path / "r")
    assert check(step), step


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
    antisd.main(["--num_steps", "1", "--num_problems", "4", "--num_generations", "4", "--max_new_tokens", "48",
                 "--eval_limit", "4", "--eval_k", "1", "--picture_rollouts", "6", "--output_dir", str(tmp_path),
                 "--run_name", "pic"])
    (step,) = [r for r in records(tmp_path / "pic") if "reward" in r]
    assert 0 <= step["careful_frac"] <= 1 and math.isfinite(step["u_work"]) and math.isfinite(step["u_answer"])
    page = (tmp_path / "pic" / "tokens.html").read_text()
    assert page.count('class="row"') == 6 and page.count("step 1 | reward ") == 6
    assert "u_t=" in page and "bonus=" in page
