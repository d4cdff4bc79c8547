"""Tensor parallelism: the model split over N real processes (gloo on 127.0.0.1) against transformers' own forward,
the step's wire form, refusals of sizes that do not split the model, and no follower outliving its driver."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from engine_helpers import prompts_of_lengths, run_all

from kvmesh.services.cli import main
from kvmesh.services.engine.batch import Chunk, build_batch
from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.errors import RankFailedError, UnsupportedModelError
from kvmesh.services.engine.loader import load_model
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.engine.tp_wire import decode_batch, encode_batch


def tp_logits(path, ids, size, split):
    """Logits of every position of `ids` from `size` ranks, prefilled in two chunks split at `split`."""
    model, _, kv = load_model(path, "float32", "cpu", 16, 32, None, 1, None, size)
    try:
        # the ranks share one pool of whole-head blocks; each rank's model holds its KV-head slice
        assert kv.layout.num_kv_heads == model.config.num_kv_heads * size
        table = list(range(31, 31 - 1 - len(ids) // 16, -1))  # non-contiguous, descending blocks
        first = model.forward(build_batch([Chunk(ids[:split], 0, table)], 16, all_logits=True), kv)
        rest = model.forward(build_batch([Chunk(ids[split:], split, table)], 16, all_logits=True), kv)
        return torch.cat([first, rest]), model.config.num_kv_heads
    finally:
        model.close()


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tp_logits_match_transformers(model_dir, hf_model, family, size):
    path = model_dir(family)
    ids = prompts_of_lengths([77], seed=4)[0]
    ref = hf_model(path)(torch.tensor([ids])).logits[0]
    ours, kv_heads = tp_logits(path, ids, size, split=48)
    assert kv_heads == 2 // size
    assert (ours - ref).abs().max().item() <= 1e-4


def test_a_layer_hook_hears_of_a_layer_once_every_rank_wrote_it(model_dir):
    """Prefill streams layer i's KV from its hook; in the pool the ranks share, the follower's heads of layer i
    must be there by then (not only the driver's)."""
    model, _, kv = load_model(model_dir("llama"), "float32", "cpu", 16, 8, None, 1, None, 2)
    try:
        ids = prompts_of_lengths([40], seed=7)[0]
        seen = {}
        model.forward(build_batch([Chunk(ids, 0, [0, 1, 2])], 16),
                      kv, lambda i: seen.setdefault(i, kv.pool[i, :, :3].clone()))
        assert sorted(seen) == list(range(kv.layout.num_layers))
        for i, written in seen.items():
            assert torch.equal(written, kv.pool[i, :, :3]), f"layer {i}"
            assert written[..., 1, :].abs().sum() > 0  # KV head 1: the follower's
    finally:
        model.close()


def test_tp3_logits_match_transformers_on_three_kv_heads(model_dir, hf_model):
    path = model_dir("llama", "tiny-kv3")
    ids = prompts_of_lengths([40], seed=5)[0]
    ref = hf_model(path)(torch.tensor([ids])).logits[0]
    ours, kv_heads = tp_logits(path, ids, 3, split=17)
    assert kv_heads == 1
    assert (ours - ref).abs().max().item() <= 1e-4


def test_tp2_engine_greedy_batch_equals_hf_and_followers_stop(model_dir, hf_model):
    path = model_dir("qwen2")
    hf = hf_model(path)
    prompts = prompts_of_lengths([3, 17, 30, 9], seed=6)
    # a small token budget: chunked prefill beside decodes of different lengths (masked decode groups)
    engine = LLMEngine.from_path(path, max_num_batched_tokens=24, num_blocks=32, tensor_parallel_size=2)
    followers = list(engine.model.group.followers)
    params = SamplingParams(temperature=0, max_tokens=12)
    got = run_all(engine, {str(i): i for i in range(4)}, {str(i): (p, params) for i, p in enumerate(prompts)})
    engine.model.close()
    for i, prompt in enumerate(prompts):
        want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)
        assert got["tokens"][str(i)] == want[0, len(prompt):].tolist(), f"prompt {i}"
    assert followers and not any(p.is_alive() for p in followers)
    assert all(p.exitcode == 0 for p in followers)


def test_step_wire_round_trip_keeps_every_index():
    chunks = [Chunk([5], 20, [3, 1]), Chunk([6], 3, [2]), Chunk([7, 8, 9], 0, [4]), Chunk([1, 2], 16, [0, 6])]
    batch = build_batch(chunks, 16, group_cost=0)  # one group per decode length: masks on the short ones
    back = decode_batch(encode_batch(batch))
    for name in ("input_ids", "positions", "slots", "logits_index"):
        assert torch.equal(getattr(back, name), getattr(batch, name)), name
    assert len(back.decode_groups) == len(batch.decode_groups) == 2
    for a, b in zip(back.decode_groups, batch.decode_groups):
        assert (a.offset, a.count, a.ctx_len) == (b.offset, b.count, b.ctx_len) and torch.equal(a.blocks, b.blocks)
        assert (a.mask is None and b.mask is None) or torch.equal(a.mask, b.mask)
    for a, b in zip(back.prefills, batch.prefills, strict=True):
        assert (a.offset, a.length, a.start) == (b.offset, b.length, b.start)
        assert (a.blocks is None) == (b.blocks is None) and (a.mask is None) == (b.mask is None)
        if a.mask is not None:
            assert torch.equal(a.blocks, b.blocks) and torch.equal(a.mask, b.mask)


def test_tp_size_that_does_not_split_kv_heads_is_refused(model_dir):
    with pytest.raises(UnsupportedModelError, match="does not divide the model's KV heads .2.; choose one of 1, 2"):
        load_model(model_dir("llama"), "float32", "cpu", 16, 8, None, 1, None, 3)
    with pytest.raises(SystemExit, match="kvmesh generate: --tensor-parallel-size 4 does not divide"):
        main(["generate", "--model", str(model_dir("llama")), "--prompt", "Hi", "--tensor-parallel-size", "4"])
    with pytest.raises(UnsupportedModelError, match="at least 1"):
        load_model(model_dir("llama"), "float32", "cpu", 16, 8, None, 1, None, 0)


def test_tp_refuses_families_it_does_not_shard_yet(model_dir):
    with pytest.raises(UnsupportedModelError, match="Phi3ForCausalLM needs --tensor-parallel-size 1"):
        load_model(model_dir("phi3"), "float32", "cpu", 16, 8, None, 1, None, 2)


def _cli(*args):
    return [sys.executable, "-m", "kvmesh.services.cli", "generate", *args]


def test_generate_tp2_cli_greedy_equals_hf(model_dir, hf_model):
    path = model_dir("mistral")
    prompts = ["The capital of France is", "def main():\n"]
    driver = subprocess.Popen(_cli("--model", str(path), "--max-tokens", "10", "--json", "--tensor-parallel-size",
                                   "2", *[a for p in prompts for a in ("--prompt", p)]),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    followers = set()
    while driver.poll() is None:  # note the follower while the driver runs
        followers.update(_children(driver.pid))
        time.sleep(0.05)
    out = driver.stdout.read()
    driver.stdout.close()
    assert driver.returncode == 0 and followers and not any(_alive(p) for p in followers)
    results = [json.loads(line) for line in out.splitlines()]
    hf = hf_model(path)
    assert [r["prompt"] for r in results] == prompts
    for r in results:
        ids = r["prompt_token_ids"]
        want = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10)[0, len(ids):].tolist()
        assert r["token_ids"] == want


def _children(pid: int) -> list[int]:
    """Pids of `pid`'s tensor-parallel followers (multiprocessing spawn children)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(predicate, what: str, limit_s: float = 300):
    deadline = time.monotonic() + limit_s  # a bound for a hang, not a timing assertion
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


def test_followers_exit_when_the_driver_is_killed(model_dir):
    driver = subprocess.Popen(_cli("--model", str(model_dir("llama")), "--max-tokens", "1000", "--prompt", "Hi",
                                   "--tensor-parallel-size", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: _children(driver.pid) or driver.poll() is not None, "the follower rank to start")
        followers = _children(driver.pid)
        assert followers and driver.poll() is None, driver.stderr.read().decode()[-2000:] if driver.poll() else ""
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        _wait_for(lambda: not any(_alive(p) for p in followers), "the follower to exit after its driver died")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stderr.close()



def test_a_checkpoint_no_rank_can_load_fails_cleanly_and_leaves_no_rank(variant_dir):
    import torch.distributed as dist

    path = variant_dir("llama", "tp-missing-layer", num_hidden_layers=5)  # the weights have 4 layers
    with pytest.raises(UnsupportedModelError, match="missing weight 'layers.4"):
        load_model(path, "float32", "cpu", 16, 8, None, 1, None, 2)
    assert not dist.is_initialized() and not _children(os.getpid())


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has GPUs for two ranks")
def test_tp_on_cuda_needs_a_gpu_per_rank(model_dir):
    from kvmesh.services.engine.tp import start_tensor_parallel

    with pytest.raises(UnsupportedModelError, match="needs 2 GPUs, one per rank"):
        start_tensor_parallel(model_dir("llama"), "float32", "cuda", 2, 16, 8)


def test_a_killed_follower_fails_the_next_step_clearly(model_dir):
    import torch.distributed as dist

    engine = LLMEngine.from_path(model_dir("llama"), num_blocks=16, tensor_parallel_size=2)
    engine.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert engine.step()  # the prompt's step ran on both ranks
    follower = engine.model.group.followers[0]
    follower.kill()
    follower.join()
    with pytest.raises(RankFailedError, match="rank kvmesh-tp-rank1 exited with code -9"):
        while engine.has_unfinished():
            engine.step()
    engine.model.close()  # a no-op now: the group is already down
    assert not dist.is_initialized() and not _children(os.getpid())
