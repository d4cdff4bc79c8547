"""The choices of one OpenAI request: a call per candidate, their streams merged, and best_of's pick.

Each prompt gets `best_of` candidates (default `n`); with best_of given, all run to the end and the `n` with the
highest cumulative logprob (the sum over their tokens, as vLLM ranked them) are returned, best first, re-indexed in
that order. Their logprobs were asked for only to rank them; unless the client asked too, the reply
leaves them out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from kvmesh.services.gateway import openai_format as fmt
from kvmesh.services.gateway.core import Gateway, GenerateCall


class Choice:
    """One candidate of a request: its call, and what has come back so far."""

    def __init__(self, index: int, call: GenerateCall, prompt_index: int = 0, echo: str = ""):
        self.index, self.call, self.prompt_index, self.echo = index, call, prompt_index, echo
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.usage = None

    @property
    def cumulative_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs)


def absorb(choice: Choice, response) -> None:
    """Add one DecodeResponse to what a choice has received."""
    choice.token_ids.extend(response.token_ids)
    choice.text.append(response.text)
    choice.logprobs.extend(response.logprobs)
    if response.finish_reason:
        choice.finish_reason = fmt.FINISH[response.finish_reason]
        choice.usage = response.usage


def best(choices: list[Choice], n: int, keep_logprobs: bool) -> list[Choice]:
    """The n best candidates of each prompt by cumulative logprob, indexed 0.. in prompt order."""
    chosen: list[Choice] = []
    for p in sorted({c.prompt_index for c in choices}):
        group = [c for c in choices if c.prompt_index == p]
        chosen.extend(sorted(group, key=lambda c: c.cumulative_logprob, reverse=True)[:n])
    for i, c in enumerate(chosen):
        c.index = i
        if not keep_logprobs:
            c.logprobs = []
    return chosen


async def merge(gateway: Gateway, choices: list[Choice]) -> AsyncIterator[tuple[Choice, object]]:
    """Run every choice's stream at once; yield (choice, DecodeResponse) as they arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(choice: Choice) -> None:
        try:
            async for response in gateway.generate(choice.call):
                await queue.put((choice, response))
            await queue.put((choice, done))
        except BaseException as e:  # the consumer re-raises it; cancellation included
            await queue.put((choice, e))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(tasks)
        while remaining:
            choice, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def first_of_each(stream: AsyncIterator[tuple[Choice, object]], choices: list[Choice]
                        ) -> list[tuple[Choice, object]]:
    """Read `stream` until every choice has sent its first message (or the stream ends), and return what was read.

    A refusal (429 at routing, 503, 400 from a worker) comes before a choice's first message; waiting for each
    first message before the HTTP status line goes out lets such a refusal be the response's real status instead
    of an error event inside a 200 stream. A failure closes the stream (cancelling every choice) and is raised.
    """
    read: list[tuple[Choice, object]] = []
    waiting = {id(c) for c in choices}
    try:
        while waiting:
            item = await anext(stream, None)
            if item is None:
                break
            read.append(item)
            waiting.discard(id(item[0]))
    except BaseException:
        await stream.aclose()
        raise
    return read
