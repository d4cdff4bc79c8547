"""Structured output at the edge: the OpenAI and vLLM fields that ask for it, read into one `StructuredOutput`
message, and a bounded compile that refuses a constraint no worker could use before it costs a route.

Accepted: `response_format` `{"type": "json_object"}` and `{"type": "json_schema", "json_schema": {"name", "schema",
"strict"}}` (OpenAI), `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (vLLM's older fields) and
`structured_outputs: {json | regex | choice | grammar | json_object}` (vLLM's newer one); at most one per request.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.v1 import common_pb2

MAX_SPEC_CHARS = 64 * 1024  # a schema's JSON text or a grammar at most
MAX_REGEX_CHARS = 4096
MAX_CHOICES, MAX_CHOICE_CHARS = 256, 1024

#: vLLM's `structured_outputs` keys -> StructuredOutput fields.
_STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                    "json_object": "json_object"}


def _schema_text(field: str, schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InvalidArgumentError(f"{field} is not valid JSON; send the JSON schema as an object") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidArgumentError(f"{field} must be a JSON schema (an object), got {type(schema).__name__}")
    text = json.dumps(schema)
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidArgumentError(f"{field} is {len(text)} characters of JSON; at most {MAX_SPEC_CHARS} are "
                                   "accepted: simplify the schema")
    return text


def _text(field: str, value: Any, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{field} must be a non-empty string")
    if len(value) > limit:
        raise InvalidArgumentError(f"{field} is {len(value)} characters; at most {limit} are accepted")
    return value


def _choices(field: str, value: Any) -> common_pb2.Choices:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise InvalidArgumentError(f"{field} must be a non-empty list of non-empty strings")
    if len(value) > MAX_CHOICES or any(len(c) > MAX_CHOICE_CHARS for c in value):
        raise InvalidArgumentError(f"{field}: at most {MAX_CHOICES} choices of {MAX_CHOICE_CHARS} characters each")
    return common_pb2.Choices(choices=value)


def _one(field: str, kind: str, value: Any) -> common_pb2.StructuredOutput:
    if kind == "json_schema":
        return common_pb2.StructuredOutput(json_schema=_schema_text(field, value))
    if kind == "json_object":
        return common_pb2.StructuredOutput(json_object=True)
    if kind == "regex":
        return common_pb2.StructuredOutput(regex=_text(field, value, MAX_REGEX_CHARS))
    if kind == "choice":
        return common_pb2.StructuredOutput(choice=_choices(field, value))
    return common_pb2.StructuredOutput(grammar=_text(field, value, MAX_SPEC_CHARS))


def _response_format(value: Any) -> tuple[str, str, Any] | None:
    if not isinstance(value, dict) or "type" not in value:
        raise InvalidArgumentError('response_format must be an object with a "type": "text", "json_object" or '
                                   '"json_schema"')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", "json_object", True
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidArgumentError('response_format of type "json_schema" needs "json_schema": {"name": ..., '
                                       '"schema": {...}}')
        return "response_format.json_schema.schema", "json_schema", spec["schema"]
    raise InvalidArgumentError(f'response_format type {str(kind)[:40]!r} is not supported; use "text", '
                               '"json_object" or "json_schema"')


def requested(fields: dict[str, Any]) -> common_pb2.StructuredOutput | None:
    """The one constraint an OpenAI body asks for (None: unconstrained); InvalidArgumentError naming the field when
    a value is malformed, too large, or more than one constraint is asked for."""
    asked: list[tuple[str, str, Any]] = []
    if fields.get("response_format") is not None:
        found = _response_format(fields["response_format"])
        asked += [found] if found else []
    for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if fields.get(name) is not None:
            asked.append((name, kind, fields[name]))
    outputs = fields.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise InvalidArgumentError("structured_outputs must be an object with one of json, regex, choice, "
                                       "grammar or json_object")
        asked += [(f"structured_outputs.{key}", kind, outputs[key]) for key, kind in _STRUCTURED_KEYS.items()
                  if outputs.get(key) not in (None, False)]
    if len(asked) > 1:
        raise InvalidArgumentError(f"only one structured output constraint per request; got {len(asked)}: "
                                   + ", ".join(name for name, _, _ in asked))
    return _one(*asked[0]) if asked else None


class GrammarCheck:
    """Compiles a request's constraint at the gateway, off the event loop and within `timeout_s`, so an invalid or
    too complex one is a 400 / INVALID_ARGUMENT before any worker is involved (a result is cached per process).
    It loads a tokenizer of its own on first use: a Hugging Face tokenizer is not to be shared across threads."""

    def __init__(self, model_path: str, vocab_size: int, timeout_s: float):
        self.model_path, self.vocab_size, self.timeout_s = model_path, vocab_size, timeout_s
        self._grammars = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")

    def _compile(self, c) -> None:
        with self._lock:
            if self._grammars is None:
                from transformers import AutoTokenizer

                from kvmesh.services.engine.structured import Grammars

                tokenizer = AutoTokenizer.from_pretrained(self.model_path)
                eos = tokenizer.eos_token_id
                self._grammars = Grammars(tokenizer, self.vocab_size, (eos,) if eos is not None else ())
        self._grammars.compile(c)

    async def check(self, sampling: common_pb2.SamplingParams) -> None:
        """Raise InvalidArgumentError with the library's reason, or when compiling takes longer than timeout_s."""
        if not sampling.HasField("structured_output"):
            return
        from kvmesh.services.engine.errors import InvalidRequestError
        from kvmesh.services.engine.structured import Constraint

        proto = sampling.structured_output
        kind = proto.WhichOneof("kind") or ""
        c = Constraint.of(kind, proto.choice.choices if kind == "choice" else getattr(proto, kind) if kind else "")
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._executor, self._compile, c), self.timeout_s)
        except InvalidRequestError as e:
            raise InvalidArgumentError(str(e)) from None
        except asyncio.TimeoutError:
            raise InvalidArgumentError(f"the {c.kind or 'structured output'} constraint is too complex: compiling it "
                                       f"took longer than {self.timeout_s:g} s; simplify it (fewer properties, "
                                       "alternatives or nesting levels)") from None

    async def close(self) -> None:
        """Stop the compile threads (a compile under way finishes in the background)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
