"""Streamed text, concatenated, equals the text of the whole completion — split characters included."""

from hypothesis import given, settings, strategies as st
import pytest
from transformers import AutoTokenizer

from kvmesh.services.decode.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir("llama"))


def stream(tokenizer, prompt_ids, ids, step):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    return pieces + [detok.flush()]


def test_multibyte_characters_are_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("naïve café — 東京 🙂 done", add_special_tokens=False)
    pieces = stream(tokenizer, tokenizer.encode("Say:"), ids, 1)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_concatenation_equals_whole_decode(tokenizer, data):
    vocab = tokenizer.vocab_size
    prompt = data.draw(st.lists(st.integers(3, vocab - 1), min_size=0, max_size=8))
    ids = data.draw(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=40))
    step = data.draw(st.integers(1, 4))
    assert "".join(stream(tokenizer, prompt, ids, step)) == tokenizer.decode(ids, skip_special_tokens=True)
