"""Tokenisation off the event loop, for both front ends (gRPC and HTTP).

The event loop never computes: a long prompt or a chat template takes milliseconds, during which every other
stream would stall. `AsyncTokenizer` runs the tokenizer on one thread of its own — one, because a Hugging Face
tokenizer is not safe to call from several threads at once — and awaits the result.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from kvmesh.services.common.errors import InvalidArgumentError


class AsyncTokenizer:
    """The model's tokenizer behind awaitable methods that run it on a dedicated thread."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def _run(self, fn, *args, **kwargs):
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text."""
        return await self._run(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template; a template that refuses the
        messages (bad roles, bad order) is the request's fault: InvalidArgumentError."""
        return await self._run(self._chat, messages, add_generation_prompt)

    def _chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 — any template failure is the request's fault
            raise InvalidArgumentError(f"cannot apply the chat template: {e}") from e
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def tokens(self, token_ids: list[int]) -> list[str]:
        """The token strings of token ids."""
        return await self._run(self.tokenizer.convert_ids_to_tokens, token_ids)

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of token ids."""
        return await self._run(self.tokenizer.decode, token_ids, skip_special_tokens=skip_special_tokens)

    async def run(self, fn, *args):
        """fn(*args) on the tokenizer's thread (for work that calls the tokenizer many times, such as rendering
        a long reply's logprobs)."""
        return await self._run(fn, *args)

    async def close(self) -> None:
        """Stop the tokenizer's thread (after the calls already queued)."""
        self._executor.shutdown(wait=False)
