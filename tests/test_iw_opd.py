"""IW-OPD's math on hand-computed tensors (the weight, its signed variant, the token slices, the loss
and its gradient), the tokenizer check, option rules, and end-to-end toy runs (1 process and
2 CPU ranks under torchrun)."""

import json
import math
from fractions import Fraction

import pytest
import torch

import common
import iw_opd
from common import UserError
from conftest import require, run_script, torchrun

FAST = ["--num_steps", "3", "--num_problems", "4", "--eval_dataset", "", "--max_new_tokens", "24"]


def full(*rows):
    """[B, T] tensor from rows of floats, None = padding; returns (values, mask)."""
    width = max(len(r) for r in rows)
    values = torch.tensor([[v if v is not None else 0.0 for v in r] + [0.0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[v is not None for v in r] + [False] * (width - len(r)) for r in rows])
    return values, mask


# ---- the weight w_t ---------------------------------------------------------------------------


def test_weight_hand_computed():
    # d = |a| = [1, 1, 2, 0], total 4; F_{t-1} = [0, 1/4, 2/4, 4/4]; w = 1 + 0.5 (1 - F)
    a, mask = full([1.0, -1.0, 2.0, 0.0])
    w = iw_opd.importance_weights(a, mask, gamma=0.5)
    assert torch.allclose(w, torch.tensor([[1.5, 1.375, 1.25, 1.0]]), atol=1e-6)
    assert w[0, 0].item() == 1.5  # the first token: exactly 1 + gamma
    # gamma 0.3, d = [2, 3, 5], total 10: F = [0, 0.2, 0.5]
    a, mask = full([-2.0, 3.0, -5.0])
    assert torch.allclose(iw_opd.importance_weights(a, mask, gamma=0.3), torch.tensor([[1.3, 1.24, 1.15]]), atol=1e-6)


def test_weight_monotone_between_one_and_one_plus_gamma():
    torch.manual_seed(0)
    a = torch.randn(8, 50) * 3
    mask = torch.arange(50)[None, :] < torch.randint(1, 51, (8, 1))
    w = iw_opd.importance_weights(a, mask, gamma=0.5)
    for row, row_mask in zip(w, mask):
        valid = row[row_mask]
        assert valid[0].item() == 1.5
        assert (valid[1:] <= valid[:-1] + 1e-7).all()  # non-increasing
        assert (valid >= 1.0).all() and (valid <= 1.5).all()


def test_weight_all_zero_discrepancy_is_one_plus_gamma():
    a, mask = full([0.0, 0.0, 0.0], [0.0, None, None])
    w = iw_opd.importance_weights(a, mask, gamma=0.5)
    assert torch.equal(w, torch.tensor([[1.5, 1.5, 1.5], [1.5, 0.0, 0.0]]))


def test_weight_ignores_padding_and_rows_are_independent():
    a, mask = full([0.5, -2.0, 1.0, None, None], [3.0, 0.1, -0.4, 2.0, -1.0])
    garbage = a.clone()
    garbage[~mask] = 100.0  # whatever lies on padding must not count
    w = iw_opd.importance_weights(garbage, mask, gamma=0.5)
    assert torch.equal(w, iw_opd.importance_weights(a, mask, gamma=0.5))
    assert (w[~mask] == 0).all()
    for row in range(2):  # each sequence alone: same weights (no batch normalisation)
        n = int(mask[row].sum())
        alone = iw_opd.importance_weights(a[row:row + 1, :n], mask[row:row + 1, :n], gamma=0.5)
        assert torch.allclose(alone[0], w[row, :n], atol=1e-7)
    # the first sequence by hand: d = [0.5, 2, 1], total 3.5
    expected = [1.5, 1 + 0.5 * (1 - 0.5 / 3.5), 1 + 0.5 * (1 - 2.5 / 3.5)]
    assert torch.allclose(w[0, :3], torch.tensor(expected), atol=1e-6)


def test_weight_signed_variant_and_none():
    # signed: d = [1, -2, 2], total 1; F = [0, 1, -1]; 1 - F = [1, 0, 2] -> clamp [1, 0, 1]
    a, mask = full([1.0, -2.0, 2.0, None])
    assert torch.allclose(iw_opd.importance_weights(a, mask, 0.5, "signed"),
                          torch.tensor([[1.5, 1.0, 1.5, 0.0]]), atol=1e-6)
    # unsigned on the same tokens: d = [1, 2, 2], total 5: F = [0, 0.2, 0.6]
    assert torch.allclose(iw_opd.importance_weights(a, mask, 0.5, "unsigned"),
                          torch.tensor([[1.5, 1.4, 1.2, 0.0]]), atol=1e-6)
    assert torch.equal(iw_opd.importance_weights(a, mask, 0.5, "none"), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.equal(iw_opd.importance_weights(a, mask, 0.0), mask.float())  # gamma 0 is OPD


def test_weight_has_no_gradient():
    a = torch.tensor([[1.0, -2.0]], requires_grad=True)
    assert not iw_opd.importance_weights(a, torch.ones(1, 2, dtype=torch.bool)).requires_grad


# ---- token slices -----------------------------------------------------------------------------


def test_slice_masks_rounding():
    lengths = torch.tensor([10, 11, 3, 1, 0])
    mask = torch.arange(11)[None, :] < lengths[:, None]
    first = iw_opd.slice_mask(mask, "first30")
    last = iw_opd.slice_mask(mask, "last30")
    # k = ceil(0.3 L): 3, 4, 1, 1, 0
    assert first.sum(1).tolist() == [3, 4, 1, 1, 0] and last.sum(1).tolist() == [3, 4, 1, 1, 0]
    assert first[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert last[0].nonzero().flatten().tolist() == [7, 8, 9]
    assert last[1].nonzero().flatten().tolist() == [7, 8, 9, 10]
    assert last[2].nonzero().flatten().tolist() == [2]
    assert not (first & ~mask).any() and not (last & ~mask).any()
    assert torch.equal(iw_opd.slice_mask(mask, "all"), mask)


def test_slice_counts_are_exact_at_every_length_to_1000():
    """k = ceil(3n/10) exactly: float32 arithmetic (int64 lengths * 0.3) keeps one token too many at
    39 lengths below 1,000, the first ones 50, 90, 100, 170."""
    lengths = torch.arange(0, 1001)
    mask = torch.arange(1000)[None, :] < lengths[:, None]
    wanted = [math.ceil(Fraction(3 * n, 10)) for n in range(1001)]
    for which in ("first30", "last30"):
        assert iw_opd.slice_mask(mask, which).sum(1).tolist() == wanted
    assert [wanted[n] for n in (50, 90, 100, 170)] == [15, 27, 30, 51]


def test_third_gaps_hand_computed():
    """Mean |a_t| over each response's first and last third (at least one token), summed over
    rows; an empty response counts 0 and padding never counts."""
    a, mask = full([1.0, -2.0, 3.0, -4.0, None, None], [1.0, -1.0, 2.0, 2.0, -3.0, 3.0],
                   [-0.5, 0.25, None, None, None, None], [None] * 6)
    a[~mask] = 100.0
    first, last = iw_opd.third_gaps(a, mask)
    # thirds of 4, 6, 2, 0 tokens: 1, 2, 1 (at least one), 1
    assert first.item() == pytest.approx(1.0 + 1.0 + 0.5)
    assert last.item() == pytest.approx(4.0 + 3.0 + 0.25)


# ---- the loss -------------------------------------------------------------------------------


def test_loss_gradient_is_minus_w_a_over_global_tokens():
    torch.manual_seed(1)
    logp = (torch.randn(3, 5) - 2).requires_grad_()
    a, mask = full([0.3, -1.0, 2.0, None, None], [1.0, 0.5, -0.2, 0.1, 0.7], [-0.6, None, None, None, None])
    w = iw_opd.importance_weights(a, mask)
    n = int(mask.sum())
    loss = iw_opd.opd_loss(logp, logp.detach(), w, a, mask, n)
    loss.backward()
    assert torch.allclose(logp.grad, torch.where(mask, -w * a / n, 0.0), atol=1e-7)
    assert abs(loss.item() - (-(w * a)[mask].sum() / n).item()) < 1e-6
    # micro-batches (and ranks) each divide by the global count: their sum is the whole batch's loss
    parts = [iw_opd.opd_loss(logp[rows], logp[rows].detach(), w[rows], a[rows], mask[rows], n)
             for rows in ([0], [1, 2])]
    assert abs(sum(p.item() for p in parts) - loss.item()) < 1e-6
    # whatever lies outside the mask (padding, tokens a --token_slice leaves out) gets no gradient
    logp.grad = None
    keep = iw_opd.slice_mask(mask, "first30")
    iw_opd.opd_loss(logp, logp.detach(), w + 5, a + 3, keep, int(keep.sum())).backward()
    assert (logp.grad[~keep] == 0).all() and (logp.grad[keep] != 0).all()


def test_loss_gradient_through_a_model_parameter():
    """grad of the loss = -sum_t w_t a_t grad log pi(y_t) / N: compare with a per-token autograd sum."""
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    a = iw_opd.sampled_token_advantage(logp.detach() + torch.randn(2, 4), logp.detach(), mask)
    w = iw_opd.importance_weights(a, mask)
    (grad,) = torch.autograd.grad(iw_opd.opd_loss(logp, logp.detach(), w, a, mask, 7), logits, retain_graph=True)
    expected = torch.zeros_like(logits)
    for b, t in mask.nonzero().tolist():
        (g,) = torch.autograd.grad(logp[b, t], logits, retain_graph=True)
        expected -= w[b, t] * a[b, t] * g / 7
    assert torch.allclose(grad, expected, atol=1e-6)


def test_advantage_is_teacher_minus_old_and_stops_gradient():
    teacher, mask = full([-0.5, -2.0, None])
    old = torch.tensor([[-1.0, -1.0, -9.0]], requires_grad=True)
    a = iw_opd.sampled_token_advantage(teacher, old, mask)
    assert torch.equal(a, torch.tensor([[0.5, -1.0, 0.0]])) and not a.requires_grad


def test_loss_clips_like_ppo():
    # ratio 1.5 > 1.2 with a positive advantage: clipped, no gradient; ratio 0.5 < 0.8 with a positive
    # advantage: unclipped (min picks rho A), gradient rho * w * a / N
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()
    w, a, mask = torch.tensor([[1.5, 1.0]]), torch.tensor([[1.0, 2.0]]), torch.ones(1, 2, dtype=torch.bool)
    loss = iw_opd.opd_loss(logp, torch.zeros(1, 2), w, a, mask, 2)
    loss.backward()
    assert abs(loss.item() - (-(1.2 * 1.5 + 0.5 * 2.0) / 2)) < 1e-6
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5 * 2.0 / 2]]), atol=1e-6)


# ---- tokenizer check, options ------------------------------------------------------------------


class FakeTokenizer:
    def __init__(self, vocab, eos=0):
        self.vocab, self.eos_token_id, self.bos_token_id, self.pad_token_id = vocab, eos, None, eos
        self.all_special_ids = [eos]

    def get_vocab(self):
        return dict(self.vocab)


def test_tokenizer_check():
    same = FakeTokenizer({"a": 0, "b": 1})
    common.check_same_tokenizer(same, FakeTokenizer({"a": 0, "b": 1}), "s", "t")
    with pytest.raises(UserError, match="different tokenizer"):
        common.check_same_tokenizer(same, FakeTokenizer({"a": 0, "c": 1}), "s", "t")
    with pytest.raises(UserError, match="special tokens"):
        common.check_same_tokenizer(same, FakeTokenizer({"a": 0, "b": 1}, eos=1), "s", "t")


def test_errors_about_the_teacher_name_its_flag(tmp_path):
    with pytest.raises(UserError, match=r"^Unknown --teacher_model 'gpt-5'"):
        iw_opd.main(FAST + ["--teacher_model", "gpt-5", "--output_dir", str(tmp_path), "--run_name", "t"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^--teacher_model '.*empty' is a directory without config.json"):
        iw_opd.main(FAST + ["--teacher_model", str(tmp_path / "empty"), "--output_dir", str(tmp_path), "--run_name", "u"])


def test_thinking_is_off_by_default_and_the_toy_prompt_is_unchanged(toy_tokenizer):
    """The paper runs with thinking off [code], so that is the default; the toy's template has no
    thinking switch, so the default changes no toy prompt (and no toy figure)."""
    assert common.parse_args(iw_opd.Args, []).enable_thinking is False
    assert common.parse_args(iw_opd.Args, ["--enable_thinking"]).enable_thinking is True
    for problem in ("Start at 7, apply +3 *2 -4.", "Start at 1, apply -1."):
        assert common.build_prompt(toy_tokenizer, problem, enable_thinking=False) == \
            common.build_prompt(toy_tokenizer, problem)


# ---- end to end on the toy task ------------------------------------------------------------


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_iw_opd_runs_on_the_toy(tmp_path):
    iw_opd.main(FAST + ["--output_dir", str(tmp_path), "--run_name", "iw"])
    steps = [r for r in records(tmp_path / "iw") if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["w_max"] == pytest.approx(1.5)  # every response's first token
        assert 1.0 <= r["w_min"] <= r["w_mean"] <= 1.5
        assert r["a_abs_mean"] >= abs(r["a_mean"]) and r["clip_frac"] == 0
        for key in ["gap_first_third", "gap_last_third", "reward", "loss", "grad_norm"]:
            assert r[key] == r[key]  # not NaN
    page = (tmp_path / "iw" / "tokens.html").read_text()
    assert "a_t=" in page and "w_t=1.500" in page  # every response's first token
    assert "<span>a_t = -1</span>" in page and "underline: w_t = 1</span>" in page  # fixed scales
    first = "border-bottom:4px solid rgb(128,128,128)"  # w_1 = 1.5 of every row, drawn half way
    assert page.count(first) >= page.count('class="row')


def test_opd_and_slices_run_on_the_toy(tmp_path):
    iw_opd.main(FAST + ["--iw", "none", "--output_dir", str(tmp_path), "--run_name", "opd"])
    for r in [r for r in records(tmp_path / "opd") if "reward" in r]:
        assert r["w_mean"] == r["w_min"] == r["w_max"] == 1.0
        assert r["loss"] == pytest.approx(-r["a_mean"], abs=1e-5)  # rho = 1, w = 1: L = -mean a_t
    iw_opd.main(FAST + ["--num_steps", "1", "--token_slice", "first30", "--num_minibatches", "2",
                        "--output_dir", str(tmp_path), "--run_name", "first"])
    assert [r["step"] for r in records(tmp_path / "first") if "reward" in r] == [1]


def hand_weights(a, gamma=0.5):
    """w_t for one sequence, written as a loop over t (independent of the vectorised version)."""
    d = [abs(x) for x in a]
    total = sum(d) + 1e-8
    return [1 + gamma * min(1.0, max(0.0, 1 - sum(d[:t]) / total)) for t in range(len(a))]


@pytest.mark.parametrize("flags", [[], ["--token_slice", "last30", "--micro_batch_size", "3"]], ids=["all", "last30"])
def test_main_loss_from_rows_it_scores(tmp_path, monkeypatch, flags):
    """The step-1 loss `main` logs equals -sum_t w_t a_t / N recomputed from the rows it scores:
    a_t from the frozen teacher's no-grad pass minus the student's own log-probs on the same
    prompt and response, w_t by hand over the whole response, N the selected tokens."""
    calls, score = [], common.response_logprobs

    def recording_score(model, prompts, responses, pad_id, chunk_size=512, **kwargs):
        logprobs, entropy, mask = score(model, prompts, responses, pad_id, chunk_size, **kwargs)
        frozen = not any(p.requires_grad for p in model.parameters())
        for prompt, response, row, row_mask in zip(prompts, responses, logprobs, mask):
            calls.append({"teacher": frozen, "grad": torch.is_grad_enabled(), "key": (tuple(prompt), tuple(response)),
                          "logprobs": row[row_mask].detach().clone()})
        return logprobs, entropy, mask

    monkeypatch.setattr(common, "response_logprobs", recording_score)
    iw_opd.main(FAST + ["--num_steps", "1", *flags, "--output_dir", str(tmp_path), "--run_name", "m"])
    teacher = {c["key"]: c["logprobs"] for c in calls if c["teacher"]}
    student = [c for c in calls if not c["teacher"]]
    assert all(not c["grad"] for c in calls if c["teacher"]) and all(c["grad"] for c in student)
    assert len(student) == 4 and {c["key"] for c in student} == set(teacher)
    total, count, a_sum = 0.0, 0, 0.0
    for c in student:
        a = (teacher[c["key"]] - c["logprobs"]).tolist()
        w = hand_weights(a)
        keep = iw_opd.slice_mask(torch.ones(1, len(a), dtype=torch.bool), "last30" if flags else "all")[0]
        total += sum(wt * at for wt, at, k in zip(w, a, keep.tolist()) if k)
        count += int(keep.sum())
        a_sum += sum(a)
    step = next(r for r in records(tmp_path / "m") if "reward" in r)
    assert step["loss"] == pytest.approx(-total / count, abs=1e-5)
    assert step["a_mean"] == pytest.approx(a_sum / sum(len(c["logprobs"]) for c in student), abs=1e-5)


def test_torchrun_two_ranks(tmp_path):
    """OPD on 2 ranks (the teacher sharded like the student): with w = 1 and ratio 1 the logged loss
    (summed over ranks) is -mean a_t over the global batch only if each rank divides by the global count."""
    result = run_script(torchrun(2) + ["iw_opd.py", *FAST, "--num_steps", "2", "--iw", "none", "--output_dir",
                                       str(tmp_path), "--run_name", "d", "--save_every", "2"], timeout=300)
    assert "[iw_opd] done" in result.stdout
    steps = [r for r in records(tmp_path / "d") if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["loss"] == pytest.approx(-r["a_mean"], abs=1e-5) and r["w_max"] == 1.0
    assert common.check_checkpoint(tmp_path / "d" / "checkpoints" / "step_000002") is None


def test_gradient_equals_trl_iw_opd():
    """Cross-check with TRL's independent port (trl/experimental/iw_opd, `_compute_iw_opd_loss`, a plain
    -log pi * w a, the same gradient as our clipped loss at ratio 1). Skipped without TRL installed."""
    import collections
    import types

    trainer = require("trl.experimental.iw_opd.iw_opd_trainer")
    torch.manual_seed(3)
    logits = torch.randn(3, 6, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 6))
    mask = torch.arange(6)[None, :] < torch.tensor([6, 4, 1])[:, None]
    teacher = torch.where(mask, -3 * torch.rand(3, 6), float("nan"))
    fake_self = types.SimpleNamespace(temperature=1.0, iw_opd_gamma=0.5, iw_opd_epsilon=1e-8,
                                      model=types.SimpleNamespace(training=True),
                                      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    reference = trainer.IWOPDTrainer._compute_iw_opd_loss(fake_self, logits, tokens, torch.where(mask, tokens, -100),
                                                          teacher)
    (expected,) = torch.autograd.grad(reference, logits)
    logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    a = iw_opd.sampled_token_advantage(torch.nan_to_num(teacher), logp.detach(), mask)
    w = iw_opd.importance_weights(a, mask)
    (grad,) = torch.autograd.grad(iw_opd.opd_loss(logp, logp.detach(), w, a, mask, int(mask.sum())), logits)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert fake_self._metrics["train"]["iw_opd/mean_weight"][0] == pytest.approx(w[mask].mean().item(), abs=1e-6)
