"""The one KV-identity module: layout and its proto conversion, the chain, the reusable-prefix and local-prefill
rules, the checks on peer-sent hashes; and that it stays torch- and gRPC-free."""

import subprocess
import sys

import pytest

from kvmesh.services import kv_identity
from kvmesh.services.kv_identity import (HASH_BYTES, KVLayout, PromptHashes, block_hashes, block_payload_bytes,
                                         chain_salt, check_prompt_hashes, extend_block_hashes, full_block_hashes,
                                         prefill_locally, prompt_hashes, reusable_blocks)

LAYOUT = KVLayout("m-abc", "bfloat16", 16, 3, 2, 8)


def test_a_layout_round_trips_through_its_one_proto_conversion():
    assert KVLayout.from_proto(LAYOUT.to_proto()) == LAYOUT
    assert LAYOUT.block_nbytes == 16 * 2 * 8 * 2 and LAYOUT.block_bytes == 2 * 3 * LAYOUT.block_nbytes
    assert block_payload_bytes(LAYOUT.to_proto()) == LAYOUT.block_bytes
    assert block_payload_bytes(KVLayout("m", "int4", 16, 3, 2, 8)) is None
    assert LAYOUT.num_blocks_for(33) == 3


def test_a_layout_with_a_missing_field_does_not_validate():
    with pytest.raises(ValueError, match="positive"):
        KVLayout("m", "float32", 0, 2, 2, 8).validate()
    with pytest.raises(ValueError, match="model_id"):
        KVLayout("", "float32", 16, 2, 2, 8).validate()


def test_the_last_prompt_token_always_stays_uncached():
    assert [reusable_blocks(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 0, 0, 1, 1, 2]
    ids = list(range(3, 3 + 33))
    assert len(prompt_hashes(LAYOUT, ids)) == 2 and len(prompt_hashes(LAYOUT, ids[:32])) == 1
    assert prompt_hashes(LAYOUT, ids) == full_block_hashes(LAYOUT, ids[:32])


def test_the_chain_covers_every_token_before_a_block_and_the_salt():
    ids = list(range(100, 148))
    salt = chain_salt("m", "float32", 16)
    h = block_hashes(ids, 16, salt)
    assert len(h) == 3 and all(len(x) == HASH_BYTES for x in h)
    assert block_hashes([7] + ids[1:], 16, salt)[2] != h[2]
    assert block_hashes(ids, 16, chain_salt("m", "float32", 16, "tenant"))[0] != h[0]
    assert extend_block_hashes(h[:1], ids, 16, salt) == h
    assert full_block_hashes(KVLayout("m", "float32", 16, 1, 1, 1), ids, known=h[:2]) == h


def test_prompt_hashes_hash_each_layouts_chain_once(monkeypatch):
    calls = []
    real = kv_identity.hash_block
    monkeypatch.setattr(kv_identity, "hash_block", lambda prev, block: calls.append(1) or real(prev, block))
    hashes = PromptHashes(list(range(50)))
    same_chain = KVLayout("m-abc", "bfloat16", 16, 9, 9, 9)  # other sizes, same chain
    assert hashes.of(LAYOUT) == hashes.of(same_chain) == prompt_hashes(LAYOUT, list(range(50)))
    assert len(calls) == 3 + 3  # once for the memo, once for the reference
    assert hashes.of(KVLayout("m-abc", "float32", 16, 3, 2, 8)) != hashes.of(LAYOUT)


def test_peer_sent_hashes_are_used_only_when_they_can_be_the_prompts():
    ids = list(range(40))
    good = prompt_hashes(LAYOUT, ids)
    assert check_prompt_hashes(good, len(ids), 16) == good
    assert check_prompt_hashes(good[:1], len(ids), 16) == []
    assert check_prompt_hashes([b"x" * 3] * 2, len(ids), 16) == []
    assert check_prompt_hashes([], 10, 16) == []


def test_local_prefill_needs_every_reusable_block_and_a_short_tail():
    assert prefill_locally(40, 32, 16, 16)
    assert not prefill_locally(40, 16, 16, 16)  # a reusable block is missing
    assert not prefill_locally(40, 32, 16, 7)  # the tail of 8 is too long
    assert not prefill_locally(10, 0, 16, 16)  # nothing cached: a prefill worker does it
    assert prefill_locally(33, 32, 16, 1)


def test_the_module_imports_neither_torch_nor_grpc():
    code = ("import sys; import kvmesh.services.kv_identity; "
            "print(sorted(m for m in ('torch', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
