"""Chunked per-token log-probabilities / entropy against the naive computation, and the response
alignment: prompt and padding tokens never reach a loss."""

import torch

import antisd
import common


def naive(hidden, weight, targets):
    logprobs = torch.log_softmax(hidden @ weight.T, dim=-1)
    chosen = logprobs.gather(-1, targets[..., None]).squeeze(-1)
    return chosen, -(logprobs.exp() * logprobs).sum(-1)


def test_chunked_matches_naive_values_and_gradients():
    torch.manual_seed(0)
    batch, width, dim, vocab = 3, 11, 16, 97
    hidden = torch.randn(batch, width, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, width))
    mask = torch.arange(width)[None, :] < torch.tensor([11, 4, 7])[:, None]
    coef_logp, coef_ent = torch.randn(batch, width, dtype=torch.float64), torch.randn(batch, width, dtype=torch.float64)

    ref_logp, ref_ent = naive(hidden, weight, targets)
    ref_loss = ((coef_logp * ref_logp + coef_ent * ref_ent) * mask).sum()
    ref_grads = torch.autograd.grad(ref_loss, [hidden, weight])
    for chunk in (1, 5, 64):
        logp, ent = common.token_logprob_entropy(lambda h: h @ weight.T, hidden, targets, mask, chunk_size=chunk)
        assert torch.allclose(logp[mask], ref_logp[mask], atol=1e-5)
        assert torch.allclose(ent[mask], ref_ent[mask], atol=1e-5)
        assert (logp[~mask] == 0).all() and (ent[~mask] == 0).all()
        loss = ((coef_logp * logp + coef_ent * ent) * mask).sum()
        grads = torch.autograd.grad(loss, [hidden, weight])
        for got, want in zip(grads, ref_grads):
            assert torch.allclose(got, want, atol=1e-5)
        assert (grads[0][~mask] == 0).all()  # masked positions get no gradient


def test_chunked_gradient_matches_finite_differences():
    torch.manual_seed(1)
    hidden = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64)
    targets = torch.randint(0, 7, (1, 4))
    mask = torch.ones(1, 4, dtype=torch.bool)

    def f(h):
        logp, ent = common.token_logprob_entropy(lambda x: x @ weight.T, h, targets, mask, chunk_size=3)
        return logp.sum() + 0.3 * ent.sum()

    assert torch.autograd.gradcheck(f, (hidden,), eps=1e-6, atol=1e-6)


def test_no_grad_path_and_empty_input():
    weight = torch.randn(5, 2)
    with torch.no_grad():
        logp, ent = common.token_logprob_entropy(lambda h: h @ weight.T, torch.randn(2, 3, 2),
                                                 torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    assert logp.shape == (2, 3) and (logp == 0).all() and (ent == 0).all()


def test_response_alignment_matches_unpadded_forward(toy_model, toy_tokenizer):
    tok = toy_tokenizer
    rows = common.make_toy_rows(3, seed=5)
    prompts = [common.build_prompt(tok, r["problem"]) for r in rows]
    prompts[1] = common.build_prompt(tok, rows[1]["problem"], context="Reference solution:\n" + rows[1]["solution"])
    responses = [tok(r["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id] for r in rows]
    responses[2] = responses[2][:3]
    with torch.no_grad():
        hidden, targets, mask = common.response_hidden(toy_model, prompts, responses, tok.pad_token_id)
        logp, _ = common.token_logprob_entropy(common.output_head(toy_model), hidden, targets, mask)
        assert mask.sum(1).tolist() == [len(r) for r in responses]
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            assert targets[i, : len(response)].tolist() == response
            ids = torch.tensor([prompt + response])
            full = torch.log_softmax(toy_model(input_ids=ids).logits[0], -1)
            expected = full[len(prompt) - 1: len(prompt) + len(response) - 1].gather(
                -1, torch.tensor(response)[:, None]).squeeze(-1)
            assert torch.allclose(logp[i, : len(response)], expected, atol=1e-5)


def test_padding_and_prompts_never_enter_the_loss(toy_model, toy_tokenizer):
    """The loss of a padded batch equals the sum of the per-sequence losses (same global count),
    and gradients do not depend on what sits in the padding."""
    tok = toy_tokenizer
    rows = common.make_toy_rows(3, seed=9)
    prompts = [common.build_prompt(tok, r["problem"]) for r in rows]
    responses = [tok(r["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id] for r in rows]
    responses[0] = responses[0][:2]
    adv = torch.tensor([0.7, -1.3, 0.4])
    total = sum(len(r) for r in responses)

    def loss_of(indices, pad_id):
        hidden, targets, mask = common.response_hidden(toy_model, [prompts[i] for i in indices],
                                                       [responses[i] for i in indices], pad_id)
        logp, _ = common.token_logprob_entropy(common.output_head(toy_model), hidden, targets, mask)
        return antisd.policy_loss(logp, logp.detach(), adv[indices][:, None].expand_as(logp), mask, total)

    def grads(loss):
        toy_model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in toy_model.parameters()]

    together = loss_of([0, 1, 2], tok.pad_token_id)
    separate = sum(loss_of([i], tok.pad_token_id) for i in range(3))
    assert torch.allclose(together, separate, atol=1e-6)
    g_together = grads(loss_of([0, 1, 2], tok.pad_token_id))
    g_other_pad = grads(loss_of([0, 1, 2], tok.eos_token_id))  # different padding token id
    g_separate = grads(sum(loss_of([i], tok.pad_token_id) for i in range(3)))
    for a, b, c in zip(g_together, g_other_pad, g_separate):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-5)
    toy_model.zero_grad(set_to_none=True)


def test_chunked_kl_matches_naive_both_directions():
    torch.manual_seed(2)
    batch, width, dim, vocab = 2, 6, 8, 31
    student_hidden = torch.randn(batch, width, dim, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(batch, width, dim, dtype=torch.float64)
    w_student, w_teacher = torch.randn(vocab, dim, dtype=torch.float64), torch.randn(vocab, dim, dtype=torch.float64)
    mask = torch.arange(width)[None, :] < torch.tensor([6, 2])[:, None]
    for direction in ("forward", "reverse"):
        log_s = torch.log_softmax(student_hidden @ w_student.T, -1)
        log_t = torch.log_softmax(teacher_hidden @ w_teacher.T, -1)
        p, q = (log_t, log_s) if direction == "forward" else (log_s, log_t)
        expected = (p.exp() * (p - q)).sum(-1)
        got = common.token_kl(lambda h: h @ w_student.T, student_hidden, lambda h: h @ w_teacher.T, teacher_hidden,
                              mask, direction, chunk_size=3)
        assert torch.allclose(got[mask], expected[mask], atol=1e-6) and (got[~mask] == 0).all()
        assert (got[mask] >= 0).all()
        (g_got,) = torch.autograd.grad(got.sum(), student_hidden)
        (g_want,) = torch.autograd.grad((expected * mask).sum(), student_hidden)
        assert torch.allclose(g_got, g_want, atol=1e-6)
    same = common.token_kl(lambda h: h @ w_student.T, student_hidden, lambda h: h @ w_student.T, student_hidden, mask)
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-9)


def test_copy_weights_refreshes_a_frozen_copy(toy_tokenizer):
    dist_info = common.init_distributed()
    policy = common.load_model("toy", dist_info)
    frozen = common.load_model("toy", dist_info, trainable=False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    assert not torch.equal(next(policy.parameters()), next(frozen.parameters()))
    common.copy_weights(frozen, policy)
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), frozen.parameters()))
    assert not any(p.requires_grad for p in frozen.parameters())
