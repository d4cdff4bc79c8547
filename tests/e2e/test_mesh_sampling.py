"""Every sampling field the OpenAI API accepts changes a real mesh's output as specified: penalties and logit bias
match transformers' generate() with its logits processors (the first token sampled by the prefill worker, the rest
by the decode worker), best_of returns the best candidates by cumulative logprob, echo prepends the prompt; and
malformed numbers or text are refused with 400 while the mesh stays healthy."""

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from mesh import start_mesh

PROMPT = "The capital of France is the capital of France is"
MAX_TOKENS = 8


class OpenAIPenalties(LogitsProcessor):
    """Reference for presence/frequency penalties (transformers has none): OpenAI's formula on generated tokens
    (negative ones here: the tiny random model never repeats itself, so only a reward for repeating shows)."""

    def __init__(self, num_prompt: int, presence: float, frequency: float):
        self.num_prompt, self.presence, self.frequency = num_prompt, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        out = input_ids[:, self.num_prompt:]
        counts.scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@pytest.fixture(scope="module")
def tiny(model_dir):
    path = model_dir("llama")
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module")
def mesh(tiny):
    m = start_mesh(str(tiny[0]), prefill=1, decode=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=mesh.http_base, api_key="unused", max_retries=0, timeout=60)


def hf_greedy(model, ids, **kwargs):
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0, **kwargs)
    return out[0, len(ids):].tolist()


def mesh_greedy(client, name, **fields):
    reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True, **fields})
    return reply.choices[0]



def test_repetition_penalty_matches_transformers(client, tiny):
    path, tokenizer, model = tiny
    ids = tokenizer.encode(PROMPT)
    plain = tokenizer.decode(hf_greedy(model, ids))
    want = tokenizer.decode(hf_greedy(model, ids, repetition_penalty=1.8))
    assert want != plain  # the prompt repeats itself: the penalty must change the greedy path
    assert mesh_greedy(client, path.name, repetition_penalty=1.8).text == want


def test_logit_bias_matches_transformers_sequence_bias(client, tiny):
    path, tokenizer, model = tiny
    ids = tokenizer.encode(PROMPT)
    favourite = hf_greedy(model, ids)[0]
    bias = {favourite: -100.0, 42: 8.0}
    want = tokenizer.decode(hf_greedy(model, ids, sequence_bias={(t,): b for t, b in bias.items()}))
    got = client.completions.create(model=path.name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                    logit_bias={str(t): b for t, b in bias.items()},
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want and want != tokenizer.decode(hf_greedy(model, ids))


def test_presence_and_frequency_penalties_match_the_openai_formula(client, tiny):
    path, tokenizer, model = tiny
    ids = tokenizer.encode(PROMPT)
    processors = LogitsProcessorList([OpenAIPenalties(len(ids), presence=-2.0, frequency=-1.0)])
    want = tokenizer.decode(hf_greedy(model, ids, logits_processor=processors))
    got = client.completions.create(model=path.name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                    presence_penalty=-2.0, frequency_penalty=-1.0, extra_body={"ignore_eos": True})
    assert got.choices[0].text == want and want != tokenizer.decode(hf_greedy(model, ids))


def test_best_of_returns_the_best_candidates_by_cumulative_logprob(client, tiny):
    name = tiny[0].name
    common = dict(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1.0, seed=11, logprobs=0,
                  extra_body={"ignore_eos": True})
    every = client.completions.create(n=4, best_of=4, **common).choices
    sums = [sum(c.logprobs.token_logprobs) for c in every]
    assert sums == sorted(sums, reverse=True)  # ranked best first
    assert len({c.text for c in every}) > 1  # the candidates differ (seeds 11..14)
    best = client.completions.create(n=1, best_of=4, **common).choices
    assert [c.text for c in best] == [every[0].text]


def test_echo_prepends_the_prompt(client, tiny):
    whole = client.completions.create(model=tiny[0].name, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model=tiny[0].name, prompt=PROMPT, max_tokens=3, temperature=0)
    assert whole.choices[0].text == PROMPT + plain.choices[0].text


@pytest.mark.parametrize("raw", [
    '{"prompt": "hi", "max_tokens": 2147483648}', '{"prompt": "hi", "seed": 1180591620717411303424}',
    '{"prompt": "hi", "temperature": NaN}', '{"prompt": "hi", "top_p": Infinity}', '{"prompt": "\\ud800"}',
    '{"prompt": "hi", "tools": [{"type": "function"}]}', '{"prompt": "hi", "logit_bias": {"999999": 1}}',
])
def test_malformed_input_gets_400_and_the_mesh_stays_healthy(mesh, raw):
    reply = httpx.post(f"{mesh.http_base}/completions", content=raw, headers={"content-type": "application/json"},
                       timeout=30)
    assert reply.status_code == 400, reply.text
    assert "Traceback" not in reply.text and reply.json()["error"]["message"]
    healthy = httpx.post(f"{mesh.http_base}/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert healthy.status_code == 200
