"""Decoded KV written back to the cache (`--cache-decode-kv`), with real processes: after a request finishes,
the cache holds the blocks its reply filled, not only the prompt's; the next turn of the conversation (prompt,
reply, new text) has the prefill worker fetch all of them and compute only the new text, and its tokens still
equal HF's; nothing is left held afterwards."""

import re
import time
import urllib.request

import torch
from transformers import AutoModelForCausalLM

from mesh import start_mesh
from kvmesh.v1 import cache_pb2, cache_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

BLOCK = 16
PROMPT = [(i * 31 + 7) % 1000 + 3 for i in range(3 * BLOCK + 5)]  # 3 full blocks and 5 tokens
REPLY_TOKENS = 2 * BLOCK + 8  # with the prompt's 5: 45 tokens past its full blocks, 44 of them with KV
NEW_TEXT = [(i * 13 + 2) % 900 + 3 for i in range(BLOCK + 4)]  # longer than the decode worker prefills itself


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def cache_hit_tokens(mesh, ids) -> int:
    """What the cache holds of `ids`, as the scheduler's peek at it sees it."""
    stub = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
    return stub.Route(scheduler_pb2.RouteRequest(request_id="probe", prompt_token_ids=ids, dry_run=True), timeout=5
                      ).num_cached_tokens


def dram_hits(mesh) -> int:
    stats = cache_pb2_grpc.CacheStub(mesh.channel(mesh.cache.address)).Stats(cache_pb2.StatsRequest(), timeout=5)
    return next(t for t in stats.tiers if t.name == "dram").hits


def offered_blocks(proc, outcome: str) -> float:
    """The worker's kvmesh:cache_offered_blocks_total{outcome=...}, scraped from the /metrics it printed."""
    url = re.search(r"kvmesh \S+ metrics on (http://\S+/metrics)", proc.stdout).group(1)
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(rf'^kvmesh:cache_offered_blocks_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_the_next_turn_reuses_the_reply_from_the_cache(model_dir):
    path = model_dir("llama")
    mesh = start_mesh(str(path), transport="shm",
                      env={"KVMESH_DECODE_CACHE_DECODE_KV": "1", "KVMESH_METRICS_PORT": "0"}, policy="kv_aware")
    try:
        hf = AutoModelForCausalLM.from_pretrained(path)
        reply, _ = mesh.generate(PROMPT, REPLY_TOKENS, ignore_eos=True)
        assert reply == hf_greedy(hf, PROMPT, REPLY_TOKENS)
        conversation = PROMPT + reply
        # 5 full blocks have KV (the last reply token has none yet): the prefill worker offered the prompt's 3,
        # the decode worker the 2 its reply filled
        deadline = time.monotonic() + 10
        while cache_hit_tokens(mesh, conversation + NEW_TEXT) < 5 * BLOCK:
            assert time.monotonic() < deadline, "the decoded blocks never reached the cache"
            time.sleep(0.05)
        assert cache_hit_tokens(mesh, conversation + NEW_TEXT) == 5 * BLOCK
        decode, prefill = mesh.decodes[0], mesh.prefills[0]
        while (offered_blocks(decode, "put"), offered_blocks(prefill, "put")) != (2, 3):  # counted after the put
            assert time.monotonic() < deadline, (offered_blocks(decode, "put"), offered_blocks(prefill, "put"))
            time.sleep(0.05)
        assert offered_blocks(decode, "failed") == offered_blocks(decode, "dropped") == 0

        hits = dram_hits(mesh)
        next_turn = conversation + NEW_TEXT
        got, responses = mesh.generate(next_turn, 8, ignore_eos=True)
        assert got == hf_greedy(hf, next_turn, 8)
        assert dram_hits(mesh) - hits == 5  # the prefill worker fetched the reply's blocks too: 5, not 3
        assert responses[-1].usage.cached_tokens == 5 * BLOCK
        assert mesh.wait_blocks_free(2.0)
    finally:
        mesh.close()


def test_a_real_chat_turn_two_finds_turn_ones_reply_in_the_cache(smollm2_dir):
    """SmolLM2 through the OpenAI chat API: the next turn's template repeats the reply's tokens, so the blocks the
    decode worker wrote back are hits for it, and its answer still equals HF's."""
    import openai
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir)

    def template(messages) -> list[int]:  # as the gateway renders a chat: text, then encode
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    mesh = start_mesh(str(smollm2_dir), transport="shm", env={"KVMESH_DECODE_CACHE_DECODE_KV": "1"},
                      policy="kv_aware")
    try:
        client = openai.OpenAI(base_url=mesh.http_base, api_key="unused", max_retries=0, timeout=120)
        turn1 = [{"role": "user", "content": "Write a short paragraph about the history of Paris."}]
        first = client.chat.completions.create(model=smollm2_dir.name, messages=turn1, max_tokens=48, temperature=0)
        prompt1 = template(turn1)
        reply_ids = hf_greedy(hf, prompt1, first.usage.completion_tokens)
        assert first.choices[0].message.content == tokenizer.decode(reply_ids, skip_special_tokens=True)
        turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And of Rome?"}]
        prompt2 = template(turn2)
        assert prompt2[:len(prompt1) + len(reply_ids)] == prompt1 + reply_ids  # the template repeats the reply
        with_kv = (len(prompt1) + len(reply_ids) - 1) // BLOCK * BLOCK
        assert with_kv > len(prompt1) // BLOCK * BLOCK  # more than the prefill worker offered
        deadline = time.monotonic() + 10
        while cache_hit_tokens(mesh, prompt2) < with_kv:
            assert time.monotonic() < deadline, "the reply's blocks never reached the cache"
            time.sleep(0.05)
        second = client.chat.completions.create(model=smollm2_dir.name, messages=turn2, max_tokens=8,
                                                temperature=0, extra_body={"ignore_eos": True})
        assert second.usage.prompt_tokens == len(prompt2)
        assert second.choices[0].message.content == tokenizer.decode(hf_greedy(hf, prompt2, 8),
                                                                     skip_special_tokens=True)
        assert mesh.wait_blocks_free(2.0)
    finally:
        mesh.close()
