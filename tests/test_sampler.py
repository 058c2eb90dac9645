"""Sampler: greedy, top-k/top-p masks, per-request seeds, distribution sanity."""

import torch

from moeserve.common.sampling import SamplingParams
from moeserve.worker.sampler import Sampler, _apply_top_k_top_p, make_generator

V = 50
sampler = Sampler()


def logits(n=4, seed=0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits()
    out = sampler(x, [SamplingParams(temperature=0.0)] * 4, [None] * 4)
    assert out.dtype == torch.int64 and out.shape == (4,)
    assert torch.equal(out, x.argmax(-1))


def test_top_k_1_equals_greedy_and_mixed_batch_keeps_greedy_rows():
    x = logits(6)
    params = [SamplingParams(temperature=0.9, top_k=1), SamplingParams(temperature=1.3)] * 3
    out = sampler(x, params, [None] * 6)
    assert torch.equal(out[0::2], x[0::2].argmax(-1))


def test_tiny_top_p_picks_the_max():
    x = logits(8)
    torch.manual_seed(0)
    out = sampler(x, [SamplingParams(temperature=2.0, top_p=1e-6)] * 8, [None] * 8)
    assert torch.equal(out, x.argmax(-1))


def test_top_k_restricts_support():
    x = logits(1).expand(2000, V).contiguous()
    torch.manual_seed(1)
    out = sampler(x, [SamplingParams(temperature=5.0, top_k=3)] * 2000, [None] * 2000)
    top3 = set(x[0].topk(3).indices.tolist())
    assert set(out.tolist()) == top3


def test_suppressed_tokens_never_picked():
    x = logits(4)
    banned = x.argmax(-1).tolist()
    out = sampler(x, [SamplingParams(temperature=0.0)] * 4, [None] * 4, [[b] for b in banned])
    assert all(o != b for o, b in zip(out.tolist(), banned, strict=True))


def test_seeded_rows_reproducible_regardless_of_batch():
    x = logits(5, seed=3)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def run_steps(batch_rows, others):
        """Sample row 0 of ``x`` for 5 steps, with ``others`` filling the rest of the batch."""
        gen = make_generator(1234, "cpu")
        tokens = []
        for _ in range(5):
            rows = torch.cat([x[:1], x[1 : 1 + batch_rows]])
            params = [seeded] + others[:batch_rows]
            gens = [gen] + [None] * batch_rows
            tokens.append(sampler(rows, params, gens)[0].item())
        return tokens

    alone = run_steps(0, [])
    crowded = run_steps(4, [SamplingParams(temperature=0.5, top_k=5)] * 4)
    greedy_mates = run_steps(2, [SamplingParams(temperature=0.0)] * 2)
    assert alone == crowded == greedy_mates
    assert len(set(alone)) > 1  # the generator advances between steps


def test_distribution_matches_probs():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 40000
    x = probs.log().expand(n, 4).contiguous()
    gen = make_generator(7, "cpu")
    torch.manual_seed(7)
    out = sampler(x, [SamplingParams()] * n, [None] * n)
    freq = torch.bincount(out, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.01)
    # Temperature 0.5 squares the probabilities (then renormalises).
    out = sampler(x, [SamplingParams(temperature=0.5)] * n, [None] * n)
    freq = torch.bincount(out, minlength=4).float() / n
    assert torch.allclose(freq, probs**2 / (probs**2).sum(), atol=0.01)
    # top_p = 0.5 keeps {0.4, 0.3}: the mass before 0.3 is 0.4 < 0.5, before 0.2 is 0.7.
    out = sampler(x, [SamplingParams(top_p=0.5)] * n, [None] * n)
    freq = torch.bincount(out, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.01)
    # Seeded single-row sampling follows the same law.
    seeded = [sampler(x[:1], [SamplingParams(seed=7)], [gen]).item() for _ in range(2000)]
    freq = torch.bincount(torch.tensor(seeded), minlength=4).float() / 2000
    assert torch.allclose(freq, probs, atol=0.04)


def test_masks_leave_disabled_rows_untouched():
    # Near-zero-probability tokens stay reachable when top_p is 1 (no cumsum rounding cut),
    # while another row of the same batch is cut to its top 2.
    x = torch.cat([torch.tensor([[0.0] + [-30.0] * (V - 1)]), logits(1)])
    masked = _apply_top_k_top_p(x, [V, 2], [1.0, 1.0])
    assert torch.equal(masked[0], x[0])
    assert torch.isfinite(masked[1]).sum() == 2
    assert set(torch.isfinite(masked[1]).nonzero().flatten().tolist()) == set(
        x[1].topk(2).indices.tolist()
    )


def test_bf16_logits_are_upcast():
    x = logits(3).bfloat16()
    out = sampler(x, [SamplingParams(temperature=0.0)] * 3, [None] * 3)
    assert torch.equal(out, x.float().argmax(-1))
