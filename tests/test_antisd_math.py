"""AntiSD's math on small hand-computed tensors: phi, token signals, GRPO advantages, the loss and
its aggregation, the entropy gate, and the privileged context."""

import math
import random

import torch

import antisd
import common

LOG2 = math.log(2.0)


def test_phi_values_and_signs():
    u = torch.tensor([0.0, 1.0, -1.0, 20.0, -20.0])
    expected = torch.tensor([
        0.0,
        0.5 * (math.log(1 + math.e) - LOG2),        # 0.31006...
        0.5 * (math.log(1 + 1 / math.e) - LOG2),    # -0.1899...
        0.5 * (math.log(1 + math.exp(20)) - LOG2),  # ~ u/2 - 0.5 log 2
        0.5 * (math.log(1 + math.exp(-20)) - LOG2),  # ~ -0.5 log 2
    ])
    assert torch.allclose(antisd.phi(u), expected, atol=1e-6)
    assert antisd.phi(torch.tensor(0.0)).item() == 0.0
    assert abs(antisd.phi(torch.tensor(1.0)).item() - 0.31005723) < 1e-6
    # deliberation tokens (u < 0): AntiSD bonus -phi(u) in (0, 0.5 log 2); shortcut tokens (u > 0): penalty ~ u/2
    bonus = antisd.token_signal(torch.tensor([-1.0, -100.0, 3.0]))
    assert 0 < bonus[0] < 0.5 * LOG2 and abs(bonus[1] - 0.5 * LOG2) < 1e-6
    assert abs(bonus[2] - (-0.5 * (math.log(1 + math.exp(3)) - LOG2))) < 1e-6 and bonus[2] < 0


def test_token_signal_variants():
    u = torch.tensor([-2.0, 0.5])
    assert torch.equal(antisd.token_signal(u, "sd"), u)  # default SD rewards +u
    assert torch.equal(antisd.token_signal(u, "antisd", "rkl"), -u)  # reverse-KL ascent
    assert torch.allclose(antisd.token_signal(u, "antisd", "jsd"), -antisd.phi(u))


def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = antisd.group_advantages(rewards)
    std0 = math.sqrt(1 / 3)  # sample std of [1,0,0,1]
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-6))
    assert torch.equal(adv[1], torch.zeros(4))  # all-equal group: zero, no NaN
    std2 = 0.5  # sample std of [0,0,0,1]
    assert torch.allclose(adv[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]) / (std2 + 1e-6))
    assert torch.allclose(antisd.group_advantages(rewards, scale_rewards=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert not torch.isnan(antisd.group_advantages(torch.zeros(2, 8))).any()


def test_advantage_composition_and_loss_value():
    # two sequences, lengths 2 and 1 (second row padded); lambda = 0.5
    seq_adv = torch.tensor([1.0, -1.0])
    u = torch.tensor([[0.0, -2.0], [3.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    lam = 0.5
    advantages = seq_adv[:, None] + lam * antisd.token_signal(u)
    phi = lambda x: 0.5 * (math.log1p(math.exp(x)) - LOG2)
    expected = torch.tensor([[1.0, 1.0 - 0.5 * phi(-2.0)], [-1.0 - 0.5 * phi(3.0), -1.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    logp = torch.tensor([[-0.1, -0.2], [-0.3, -99.0]], requires_grad=True)
    loss = antisd.policy_loss(logp, logp.detach(), advantages, mask, num_tokens=3)
    # rho = 1 on-policy: loss = -(sum of valid advantages) / 3
    assert abs(loss.item() + (expected[0, 0] + expected[0, 1] + expected[1, 0]).item() / 3) < 1e-6
    loss.backward()
    assert torch.allclose(logp.grad, torch.where(mask, -advantages / 3, torch.zeros(2, 2)), atol=1e-6)
    assert logp.grad[1, 1] == 0  # padding never in the loss


def test_policy_loss_clipping():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios vs old log 1 = 0
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    pos = antisd.policy_loss(logp, old, torch.ones(1, 3), mask, 3)
    # A>0: min(rho, clip(rho, 0.8, 1.28)) -> 1.28, 0.5, 1.1
    assert abs(pos.item() + (1.28 + 0.5 + 1.1) / 3) < 1e-6
    neg = antisd.policy_loss(logp, old, -torch.ones(1, 3), mask, 3)
    # A<0: min(-rho, -clip(rho)) = -max(rho, clip) -> -1.5, -0.8, -1.1
    assert abs(neg.item() - (1.5 + 0.8 + 1.1) / 3) < 1e-6


def test_global_token_mean_is_split_invariant():
    """Sum of per-shard losses (each / global count) == one big token-mean, for any rank or micro split."""
    torch.manual_seed(0)
    lengths = [5, 1, 3, 7, 2, 4]
    width = max(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    logp = torch.randn(6, width, requires_grad=True)
    old = logp.detach() + 0.1 * torch.randn(6, width)
    adv = torch.randn(6, width)
    total = sum(lengths)
    full = antisd.policy_loss(logp, old, adv, mask, total)
    (grad_full,) = torch.autograd.grad(full, logp)
    ref = -(torch.minimum(torch.exp(logp - old) * adv, torch.exp(logp - old).clamp(0.8, 1.28) * adv)[mask]).mean()
    assert torch.allclose(full, ref, atol=1e-6)
    for splits in ([[0, 1, 2], [3, 4, 5]], [[0], [1, 2], [3, 4], [5]], [[5, 0], [1, 2, 3, 4]]):
        pieces = sum(antisd.policy_loss(logp[s], old[s], adv[s], mask[s], total) for s in splits)
        (grad_pieces,) = torch.autograd.grad(pieces, logp)
        assert torch.allclose(pieces, full, atol=1e-6)
        assert torch.allclose(grad_pieces, grad_full, atol=1e-7)


def test_entropy_gate_scripted_sequence():
    gate = antisd.EntropyGate(warmup=5, tau_down=0.9)
    series = [1.0, 1.6, 0.8, 1.1, 0.9,   # warm-up: lambda off; H_warm = median = 1.0 (the mean would be 1.08)
              1.0, 0.95, 0.91, 0.89,     # open until H < 0.9 (closes at 0.89; with the mean, 0.95 would close it)
              0.95, 0.99, 1.0,           # hysteresis: stays closed until H >= 1.0 (with the mean, 1.0 would not re-open)
              0.92, 0.9, 0.85, 1.3]      # open; 0.9 is not < 0.9; closes at 0.85; re-opens at 1.3
    opened = [gate.update(step, h) for step, h in enumerate(series)]
    assert gate.h_warm == 1.0
    assert opened == [False] * 5 + [True, True, True, False, False, False, True, True, True, False, True]


def test_entropy_gate_uses_its_tau_down():
    # H_warm = 1.0; H = 0.6 closes the gate at tau_down 0.93 but not at 0.5
    for tau_down, expected in [(0.93, False), (0.5, True)]:
        gate = antisd.EntropyGate(warmup=1, tau_down=tau_down)
        assert [gate.update(0, 1.0), gate.update(1, 0.6)] == [False, expected]


def test_verified_solution_and_contexts():
    text = "<think>scratch \\boxed{1}</think>Step 1\n5+3=8\n\\boxed{8} and some trailing words"
    assert antisd.verified_solution(text) == "Step 1\n5+3=8\n\\boxed{8}"
    assert antisd.verified_solution("no box here") is None
    # nested boxes: the whole outermost final box is kept
    assert antisd.verified_solution("so \\boxed{\\boxed{9}}") == "so \\boxed{\\boxed{9}}"
    assert antisd.verified_solution("\\boxed{1} then \\boxed{x = \\boxed{\\boxed{9}}} end") == \
        "\\boxed{1} then \\boxed{x = \\boxed{\\boxed{9}}}"
    assert antisd.verified_solution("\\boxed{\\frac{1}{2}} done") == "\\boxed{\\frac{1}{2}}"
    assert antisd.verified_solution("open \\boxed{ then \\boxed{9} end") == "open \\boxed{ then \\boxed{9}"
    problems = [{"problem": "p0", "answer": "8", "solution": "ref0"}, {"problem": "p1", "answer": "4", "solution": ""}]
    texts = ["A \\boxed{8}", "B \\boxed{8}", "C \\boxed{9}", "x", "y"]
    rewards = [1.0, 1.0, 0.0, 0.0, 0.0]
    # group size 3 would mix problems; use G=3 for problem 0 only via a 6-rollout batch
    texts, rewards = texts + ["z"], rewards + [0.0]
    contexts = antisd.teacher_contexts(texts, rewards, 3, problems, random.Random(0))
    assert contexts[0] == antisd.TEACHER_CONTEXT.format(solution="B \\boxed{8}", feedback=antisd.FEEDBACK[True])
    assert contexts[1] == antisd.TEACHER_CONTEXT.format(solution="A \\boxed{8}", feedback=antisd.FEEDBACK[True])
    assert contexts[2].startswith("Reference solution:\nA \\boxed{8}") or contexts[2].startswith(
        "Reference solution:\nB \\boxed{8}")
    assert contexts[2].endswith(antisd.FEEDBACK[False])
    # no successful rollout in the group, no reference solution: falls back to the boxed answer
    assert contexts[3] == antisd.TEACHER_CONTEXT.format(solution="\\boxed{4}", feedback=antisd.FEEDBACK[False])


def test_only_one_success_falls_back_to_reference():
    problems = [{"problem": "p", "answer": "8", "solution": "ref"}]
    contexts = antisd.teacher_contexts(["\\boxed{8}", "\\boxed{1}"], [1.0, 0.0], 2, problems, random.Random(0))
    assert contexts[0].startswith("Reference solution:\nref\n")  # its own rollout is never its context
    assert contexts[1].startswith("Reference solution:\n\\boxed{8}\n")


def test_teacher_context_matches_toy_training_format():
    context = antisd.TEACHER_CONTEXT.format(solution="S", feedback=antisd.FEEDBACK[True])
    assert context.startswith(common.TOY_CONTEXT_HEADER)
    assert set(antisd.FEEDBACK.values()) <= set(common.TOY_FEEDBACK_LINES)
