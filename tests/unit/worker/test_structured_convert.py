"""The worker kit's side of structured output: the proto's constraint reaches the engine's SamplingParams intact,
and a grammar is compiled in a thread of its own — never on the event loop — once per distinct constraint."""

import asyncio
import json
import threading

from kvmesh.services.engine.structured import Constraint, Grammars
from kvmesh.services.worker.convert import compile_grammar, sampling_params
from kvmesh.v1 import common_pb2


def test_each_kind_converts_with_its_resume_count():
    cases = [(common_pb2.StructuredOutput(json_schema='{"type": "object"}', num_resumed_tokens=3),
              Constraint("json_schema", '{"type": "object"}', 3)),
             (common_pb2.StructuredOutput(json_object=True), Constraint("json_object", "")),
             (common_pb2.StructuredOutput(regex="a+"), Constraint("regex", "a+")),
             (common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=["x", "y z"])),
              Constraint("choice", json.dumps(["x", "y z"]))),
             (common_pb2.StructuredOutput(grammar='root ::= "a"'), Constraint("grammar", 'root ::= "a"'))]
    for proto, want in cases:
        params = sampling_params(common_pb2.SamplingParams(structured_output=proto))
        assert params.structured == want and params.constrained
    assert not sampling_params(common_pb2.SamplingParams()).constrained


class CountingGrammars(Grammars):
    def __init__(self):
        super().__init__(tokenizer=None, vocab_size=8, stop_token_ids=(0,))
        self.compiled_on: list[str] = []

    def _compile(self, c):
        self.compiled_on.append(threading.current_thread().name)
        return object()


class FakeEngine:
    def __init__(self):
        self.grammars = CountingGrammars()


def test_a_grammar_compiles_off_the_event_loop_once_per_distinct_constraint():
    engine = FakeEngine()
    params = sampling_params(common_pb2.SamplingParams(
        structured_output=common_pb2.StructuredOutput(regex="[0-9]+")))

    async def run():
        loop_thread = threading.current_thread().name
        for _ in range(3):
            await compile_grammar(engine, params)
        await compile_grammar(engine, sampling_params(common_pb2.SamplingParams()))  # unconstrained: nothing
        return loop_thread

    loop_thread = asyncio.run(run())
    assert len(engine.grammars.compiled_on) == 1
    assert engine.grammars.compiled_on[0] != loop_thread
