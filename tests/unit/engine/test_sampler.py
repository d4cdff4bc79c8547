"""The batched sampler draws from the right distribution and honours top-k, top-p and min-p."""

import torch

from kvmesh.services.engine.sampler import SamplingParams, sample

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))
N = 4000


def draw(params: SamplingParams, logits=LOGITS, n=N) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    tokens, _ = sample(logits.repeat(n, 1), [params] * n, gens)
    return torch.bincount(torch.tensor(tokens), minlength=logits.numel()).float() / n


def test_plain_sampling_follows_the_softmax():
    freq = draw(SamplingParams(temperature=1.0))
    assert (freq - LOGITS.softmax(-1)).abs().max() < 0.03


def test_temperature_sharpens():
    freq = draw(SamplingParams(temperature=0.5))
    assert (freq - (LOGITS / 0.5).softmax(-1)).abs().max() < 0.03


def test_top_k_top_p_and_min_p_cut_the_tail():
    assert draw(SamplingParams(top_k=2))[2:].sum() == 0
    freq = draw(SamplingParams(top_p=0.7))  # 0.5 + 0.25 reaches 0.7: only two tokens survive
    assert freq[2:].sum() == 0 and abs(freq[0] - 2 / 3) < 0.03
    assert draw(SamplingParams(min_p=0.2))[3:].sum() == 0  # 0.07 < 0.2 * 0.5


def test_greedy_rows_and_sampled_rows_mix_in_one_batch():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    tokens, _ = sample(logits, [SamplingParams(temperature=0), SamplingParams(temperature=1e-4)], gens)
    assert tokens == [0, 4]


def test_a_rows_draws_depend_only_on_its_own_generator():
    p = SamplingParams(temperature=1.0, top_p=0.95)
    alone, _ = sample(LOGITS[None], [p], [torch.Generator().manual_seed(42)])
    gens = [torch.Generator().manual_seed(s) for s in (1, 42, 3)]
    crowd, _ = sample(torch.stack([LOGITS.flip(0), LOGITS, LOGITS]), [SamplingParams(), p, p], gens)
    assert crowd[1] == alone[0]
