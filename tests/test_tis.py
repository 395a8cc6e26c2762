"""--tis_cap: truncated importance sampling between sampler and trainer (common.tis_weights)."""

import json
import math
import sys

import pytest
import torch

import antisd
import common
import iw_opd
from conftest import run_script

TRAIN = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
MASK = torch.tensor([[True, True, True, False]])


def test_tis_weights_exact():
    w = common.tis_weights(TRAIN, SAMPLER, MASK, cap=2.0)
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0, 1.0]]))  # masked: 1
    capped = common.tis_weights(TRAIN, SAMPLER, MASK, cap=1.5)
    assert torch.allclose(capped, torch.tensor([[1.5, math.exp(-1.0), 1.0, 1.0]]))
    train = TRAIN.clone().requires_grad_()
    assert not common.tis_weights(train, SAMPLER, MASK, 2.0).requires_grad  # sg: no gradient through w


def test_policy_losses_with_and_without_tis():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], requires_grad=True)
    old, adv = logp.detach(), torch.tensor([[1.0, -2.0, 0.5, 4.0]])
    w = torch.tensor([[1.5, 0.5, 1.0, 1.0]])
    # rho = 1: loss = -sum_t w_t A_t / N over valid tokens = -(1.5*1 + 0.5*-2 + 1*0.5) / 3
    loss = antisd.policy_loss(logp, old, adv, MASK, 3, tis=w)
    assert loss.item() == pytest.approx(-(1.5 - 1.0 + 0.5) / 3)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.5, 1.0, -0.5, 0.0]]) / 3)
    plain = antisd.policy_loss(logp, old, adv, MASK, 3)
    # tis_cap 0 (tis None) is today's loss, bit for bit
    ratio = torch.exp(logp - old)
    today = -torch.where(MASK, torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv), torch.zeros(1)).sum() / 3
    assert torch.equal(plain, today)
    a, iw = torch.tensor([[0.5, -1.0, 2.0, 0.0]]), torch.tensor([[1.5, 1.2, 1.0, 1.0]])
    opd = iw_opd.opd_loss(logp, old, iw, a, MASK, 3, tis=w)
    assert opd.item() == pytest.approx(-(1.5 * 1.5 * 0.5 + 0.5 * 1.2 * -1.0 + 1.0 * 2.0) / 3)
    opd_plain = iw_opd.opd_loss(logp, old, iw, a, MASK, 3)
    assert torch.equal(opd_plain, -torch.where(MASK, torch.minimum(ratio * (iw * a), ratio.clamp(0.8, 1.2) * (iw * a)),
                                              torch.zeros(1)).sum() / 3)


@pytest.mark.parametrize("command", [
    ["antisd.py", "--num_generations", "2"],
    ["iw_opd.py"],
    ["paced.py", "--mode", "self", "--k", "4", "--num_problems", "8"],
    ["trace.py", "--num_generations", "2", "--route", "both", "--annotator", "oracle"],
])
def test_scripts_run_with_tis(tmp_path, command):
    """One toy step with --tis_cap: the HF engine's sampler log-probs are the trainer's own, so w ~ 1."""
    run_script([sys.executable, command[0], "--num_steps", "1", "--num_problems", "2", *command[1:],
                         "--eval_dataset", "", "--max_new_tokens", "24", "--tis_cap", "2", "--output_dir", str(tmp_path)])
    (run,) = tmp_path.iterdir()
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)


def test_tis_refused_for_paced_distill(tmp_path):
    result = run_script([sys.executable, "paced.py", "--mode", "distill", "--tis_cap", "2", "--output_dir",
                         str(tmp_path)], check=False)
    assert result.returncode == 2 and "--tis_cap corrects the student's own rollouts" in result.stdout
