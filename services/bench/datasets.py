"""What a benchmark sends: prompts as token ids, grouped into sessions (a conversation's turns run in order).

Prompts are token ids, never text, so that two requests naming the same block send byte-equal prefixes (as
AIPerf builds Mooncake prompts): a block's tokens are a pure function of (seed, block id), drawn from a fixed id
range that every served model's vocabulary covers (`--token-ids LO:HI`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.services.bench.lengths import LengthDist

DEFAULT_TOKEN_IDS = (100, 1000)  # inside every vocabulary we serve (the tiny model has 1,024), past specials


@dataclass
class BenchRequest:
    """One request: its prompt ids, how many tokens to ask for, and (trace replay) its recorded send time."""

    prompt_ids: list[int]
    output_len: int
    timestamp_ms: float | None = None
    session: int = 0
    turn: int = 0


@dataclass
class Session:
    """Requests sent one after another: the next turn goes out when the previous one has finished."""

    turns: list[BenchRequest] = field(default_factory=list)

    @property
    def timestamp_ms(self) -> float | None:
        return self.turns[0].timestamp_ms if self.turns else None


class BlockTokens:
    """The tokens of numbered blocks: equal ids give equal tokens, in every process and every run of a seed."""

    def __init__(self, block_size: int, seed: int = 0, token_ids: tuple[int, int] = DEFAULT_TOKEN_IDS):
        if block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        if not 0 <= token_ids[0] < token_ids[1]:
            raise ValueError(f"token id range {token_ids} must satisfy 0 <= LO < HI")
        self.block_size, self.seed, self.token_ids = block_size, seed, token_ids
        self._blocks: dict[object, list[int]] = {}

    def block(self, block_id) -> list[int]:
        """The block's `block_size` tokens (cached: a hot system prompt is drawn once)."""
        tokens = self._blocks.get(block_id)
        if tokens is None:
            rng = random.Random(f"{self.seed}:{block_id}")  # str seeds hash with sha512: stable across processes
            lo, hi = self.token_ids
            tokens = [rng.randrange(lo, hi) for _ in range(self.block_size)]
            self._blocks[block_id] = tokens
        return tokens

    def fresh(self, rng: random.Random, n: int) -> list[int]:
        """`n` tokens nobody else asked for (drawn from the caller's stream)."""
        lo, hi = self.token_ids
        return [rng.randrange(lo, hi) for _ in range(n)]

    def prompt(self, hash_ids: list, length: int, rng: random.Random) -> list[int]:
        """The blocks of `hash_ids` in order, cut or padded (with fresh tokens) to `length`."""
        ids: list[int] = []
        for block_id in hash_ids:
            if len(ids) >= length:
                break
            ids.extend(self.block(block_id))
        if len(ids) < length:
            ids.extend(self.fresh(rng, length - len(ids)))
        return ids[:length]


def random_sessions(num: int, input_len: LengthDist, output_len: LengthDist, tokens: BlockTokens,
                    seed: int = 0, prefix_len: int = 0) -> list[Session]:
    """`num` one-turn sessions of fresh random prompts, each after an optional common prefix of `prefix_len`."""
    rng = random.Random(seed)
    prefix = tokens.prompt([("prefix", i) for i in range(-(-prefix_len // tokens.block_size))], prefix_len, rng)
    sessions = []
    for i in range(num):
        prompt = prefix + tokens.fresh(rng, input_len.sample(rng))
        sessions.append(Session([BenchRequest(prompt, output_len.sample(rng), session=i)]))
    return sessions


def multiturn_sessions(num: int, turns: int, input_len: LengthDist, output_len: LengthDist, tokens: BlockTokens,
                       seed: int = 0, num_system_prompts: int = 1, system_prompt_len: int = 128) -> list[Session]:
    """Conversations that open with one of `num_system_prompts` shared system prompts; each turn resends the
    whole history (system prompt, earlier user turns and replies) plus a new user turn, `num` requests in all.

    The replies in the history are stand-in tokens of the asked output length (the client does not feed the
    server's own tokens back), so the prompt of turn t is an exact prefix of turn t+1's.
    """
    if turns < 1 or num_system_prompts < 1:
        raise ValueError("turns and the number of system prompts must be >= 1")
    rng = random.Random(seed)
    blocks = -(-system_prompt_len // tokens.block_size)
    systems = [tokens.prompt([("system", s, b) for b in range(blocks)], system_prompt_len, rng)
               for s in range(num_system_prompts)]
    sessions: list[Session] = []
    while sum(len(s.turns) for s in sessions) < num:
        index = len(sessions)
        history = list(systems[rng.randrange(num_system_prompts)])
        session = Session()
        for turn in range(min(turns, num - sum(len(s.turns) for s in sessions))):
            history += tokens.fresh(rng, input_len.sample(rng))
            out = output_len.sample(rng)
            session.turns.append(BenchRequest(list(history), out, session=index, turn=turn))
            history += tokens.fresh(rng, out)
        sessions.append(session)
    return sessions


def read_mooncake(path: str | Path) -> list[dict]:
    """The records of a Mooncake-format JSONL trace, checked: `input_length`, `output_length` (ints >= 1),
    optional `timestamp` (ms) and `hash_ids` (a list)."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or int(record.get("input_length", 0)) < 1 \
                or int(record.get("output_length", 0)) < 1 or not isinstance(record.get("hash_ids", []), list):
            raise ValueError(f"{path}:{number}: a Mooncake record needs input_length and output_length >= 1 "
                             "and hash_ids as a list")
        records.append(record)
    return records


def mooncake_sessions(records: list[dict], tokens: BlockTokens, seed: int = 0,
                      num: int | None = None) -> list[Session]:
    """One session per trace record, in timestamp order; the first `num` when given."""
    rng = random.Random(seed)
    ordered = sorted(records, key=lambda r: float(r.get("timestamp", 0)))[:num]
    sessions = []
    for i, record in enumerate(ordered):
        prompt = tokens.prompt(record.get("hash_ids", []), int(record["input_length"]), rng)
        request = BenchRequest(prompt, int(record["output_length"]), float(record.get("timestamp", 0)), i)
        sessions.append(Session([request]))
    return sessions
