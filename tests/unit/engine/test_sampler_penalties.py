"""Penalties and logit bias change the distribution exactly as Hugging Face's logits processors (or, where HF has
none, OpenAI's documented formula) say, for greedy and sampled rows alike."""

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

from kvmesh.services.engine.errors import InvalidRequestError
from kvmesh.services.engine.sampler import SamplingParams, sample

VOCAB = 16
PROMPT = [3, 5, 5, 9]
OUTPUT = [7, 7, 7, 2]
HISTORY = (PROMPT + OUTPUT, len(PROMPT))


def logits_row(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def processed_logprobs(params: SamplingParams, logits: torch.Tensor) -> torch.Tensor:
    """The full logprob vector sample() reports for one row with `params` (logprobs = whole vocab)."""
    params = SamplingParams(**{**params.__dict__, "logprobs": VOCAB, "temperature": 0})
    _, infos = sample(logits[None], [params], [torch.Generator()], [HISTORY])
    out = torch.empty(VOCAB)
    for token_id, lp in infos[0]["top"]:
        out[token_id] = lp
    return out


def test_repetition_penalty_matches_hf_over_prompt_and_output():
    logits = logits_row()
    reference = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([PROMPT + OUTPUT]), logits[None].clone())[0]
    got = processed_logprobs(SamplingParams(repetition_penalty=1.7), logits)
    assert torch.allclose(got, reference.log_softmax(-1), atol=1e-5)
    assert not torch.allclose(got, logits.log_softmax(-1), atol=1e-3)  # it did change something


def test_logit_bias_matches_hf_sequence_bias():
    logits = logits_row(1)
    bias = {4: 5.0, 11: -100.0}
    hf = SequenceBiasLogitsProcessor(sequence_bias=[[[t], b] for t, b in bias.items()])
    reference = hf(torch.tensor([PROMPT]), logits[None].clone())[0]
    got = processed_logprobs(SamplingParams(logit_bias=tuple(bias.items())), logits)
    assert torch.allclose(got, reference.log_softmax(-1), atol=1e-5)


def test_presence_and_frequency_penalties_follow_openai_formula_on_output_only():
    logits = logits_row(2)
    counts = torch.bincount(torch.tensor(OUTPUT), minlength=VOCAB).float()  # the prompt's tokens do not count
    reference = logits - 0.5 * counts - 1.5 * (counts > 0).float()
    got = processed_logprobs(SamplingParams(presence_penalty=1.5, frequency_penalty=0.5), logits)
    assert torch.allclose(got, reference.log_softmax(-1), atol=1e-5)


def test_greedy_pick_obeys_bias_and_penalty():
    logits = torch.zeros(VOCAB)
    logits[7] = 5.0  # the favourite, already generated three times
    greedy = SamplingParams(temperature=0)
    assert sample(logits[None], [greedy], [torch.Generator()], [HISTORY])[0] == [7]
    penalised = SamplingParams(temperature=0, frequency_penalty=2.0)
    assert sample(logits[None], [penalised], [torch.Generator()], [HISTORY])[0] != [7]
    biased = SamplingParams(temperature=0, logit_bias=((12, 10.0),))
    assert sample(logits[None], [biased], [torch.Generator()], [HISTORY])[0] == [12]


def test_sampled_rows_draw_from_the_penalised_distribution():
    logits = torch.zeros(VOCAB)
    params = SamplingParams(temperature=1.0, logit_bias=((3, -100.0),), repetition_penalty=2.0)
    n = 2000
    tokens, _ = sample(logits.repeat(n, 1), [params] * n, [torch.Generator().manual_seed(i) for i in range(n)],
                       [HISTORY] * n)
    assert 3 not in tokens


def test_rows_without_penalties_are_untouched_in_a_mixed_batch():
    logits = torch.stack([logits_row(3), logits_row(3)])
    plain, biased = SamplingParams(temperature=0, logprobs=1), SamplingParams(temperature=0, logit_bias=((0, 50.0),))
    tokens, infos = sample(logits, [plain, biased], [torch.Generator()] * 2, [HISTORY] * 2)
    assert tokens[1] == 0 and tokens[0] == int(logits[0].argmax())
    assert infos[0]["logprob"] == pytest.approx(float(logits[0].log_softmax(-1).max()), abs=1e-5)


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", float("nan")),
                                         ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
                                         ("logit_bias", ((VOCAB, 1.0),)), ("logit_bias", ((1, 101.0),))])
def test_out_of_range_values_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value}).validate(max_model_len=64, vocab_size=VOCAB)
