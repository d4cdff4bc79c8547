"""What the OpenAI API bodies may not carry: fields kvmesh does not implement (refused with 400 naming the field,
never silently ignored) and text that is not valid Unicode.

A field is refused when it is present with a value that asks for something (a non-empty `tools` list, a
`suffix`); a value that asks for nothing (`tools: []`, `tool_choice: "none"`) is accepted. Structured output
(`response_format`, `guided_*`, `structured_outputs`) is read by `structured.py`. Fields this page does not name are ignored, as the OpenAI API's
compatible servers do for client-specific extras.
"""

from __future__ import annotations

from typing import Any

#: Fields kvmesh does not implement, and what to do instead.
UNSUPPORTED = {
    "tools": "tool calling is not supported by kvmesh; leave tools out",
    "tool_choice": "tool calling is not supported by kvmesh; leave tool_choice out or set it to \"none\"",
    "parallel_tool_calls": "tool calling is not supported by kvmesh; leave parallel_tool_calls out",
    "functions": "function calling is not supported by kvmesh; leave functions out",
    "function_call": "function calling is not supported by kvmesh; leave function_call out",
    "suffix": "suffix (insertion) is not supported by kvmesh; leave it out",
    "audio": "audio output is not supported by kvmesh; leave audio out",
    "modalities": "kvmesh produces text only; leave modalities out or set it to [\"text\"]",
    "prediction": "predicted outputs are not supported by kvmesh; leave prediction out",
    "web_search_options": "web search is not supported by kvmesh; leave web_search_options out",
    "guided_whitespace_pattern": "guided_whitespace_pattern is not supported by kvmesh; JSON output uses compact "
                                 "whitespace (leave it out)",
    "guided_decoding_backend": "kvmesh has one structured output backend (xgrammar); leave guided_decoding_backend "
                               "out",
    "prompt_logprobs": "prompt logprobs are not computed by kvmesh; leave prompt_logprobs out",
    "use_beam_search": "beam search is not supported by kvmesh; use best_of instead",
    "min_tokens": "min_tokens is not supported by kvmesh; leave it out or at 0",
    "bad_words": "bad_words is not supported by kvmesh; use logit_bias with -100 for single tokens",
    "allowed_token_ids": "allowed_token_ids is not supported by kvmesh; leave it out",
    "include_stop_str_in_output": "include_stop_str_in_output is not supported by kvmesh; leave it false",
    "truncate_prompt_tokens": "prompt truncation is not supported by kvmesh; shorten the prompt",
    "chat_template": "a custom chat_template is not accepted by kvmesh; the model's own template is used",
    "continue_final_message": "continue_final_message is not supported by kvmesh; leave it false",
}

#: Values of those fields that ask for nothing, so a client that sends them explicitly is not refused.
HARMLESS: dict[str, tuple[Any, ...]] = {
    "tool_choice": ("none",), "modalities": (["text"],),
    "min_tokens": (0,), "suffix": ("",),
}


def unsupported_field(fields: dict[str, Any]) -> tuple[str, str] | None:
    """(field, message) of the first field in `fields` that asks for what kvmesh does not implement, or None."""
    for name, message in UNSUPPORTED.items():
        if name not in fields:
            continue
        value = fields[name]
        if value is None or value is False or value == [] or value == {} or value in HARMLESS.get(name, ()):
            continue
        return name, message
    return None


def bad_unicode(value: Any, where: str = "") -> str | None:
    """The path of the first string in a JSON value that is not valid Unicode (a lone UTF-16 surrogate), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = bad_unicode(key, where) if isinstance(key, str) else None
        found = found or bad_unicode(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None
