"""Fields that serving engines take and routers add to every request they forward.

Measured with sglang-router 0.3.2 and vllm-router 0.1.17 (``cache_aware``): both add
``no_stop_trim``, ``ignore_eos``, ``continue_final_message``, ``skip_special_tokens``,
``separate_reasoning``, ``stream_reasoning`` and ``return_hidden_states`` (vllm-router also
``include_reasoning``) to each chat request, with their defaults; plain ``transformers serve``
answers such a request with HTTP 422 ("Unexpected fields in the request"). Here they are taken out
of the body before transformers validates it, and:

- honoured: ``ignore_eos`` (generation runs to ``max_tokens``), ``skip_special_tokens`` (``false``
  keeps special tokens in the text; ``true`` is what transformers does), ``continue_final_message``
  (the chat template continues the last assistant message instead of opening a new one);
- ignored, having no meaning here: ``stream_reasoning``, ``separate_reasoning`` and
  ``include_reasoning`` (transformers serve returns reasoning as ``reasoning_content`` where the
  model's template has a parser), ``no_stop_trim`` (transformers serve never trims stop strings);
- ``return_hidden_states: true`` is refused (HTTP 400): this server returns no hidden states.

What a request asked for is kept in a context variable for the rest of that request.
"""

from __future__ import annotations

import contextvars

__all__ = ["ENGINE_FIELDS", "take_engine_fields", "current", "UnsupportedField"]

HONOURED = ("ignore_eos", "skip_special_tokens", "continue_final_message")
IGNORED = ("stream_reasoning", "separate_reasoning", "include_reasoning", "no_stop_trim")
REFUSED_IF_TRUE = ("return_hidden_states",)
ENGINE_FIELDS = HONOURED + IGNORED + REFUSED_IF_TRUE

_current: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "hf_kvpool_engine_fields", default=None
)


class UnsupportedField(ValueError):
    """A request asked for something this server cannot do (HTTP 400)."""


def take_engine_fields(body: dict) -> dict:
    """Remove the engine fields from ``body``; remember (and return) the ones that are honoured.

    Raises :class:`UnsupportedField` for a field that asks for what this server cannot do, or a
    value of the wrong type.
    """
    taken = {name: body.pop(name) for name in ENGINE_FIELDS if name in body}
    for name, value in taken.items():
        if value is not None and not isinstance(value, bool):
            raise UnsupportedField(f"`{name}` must be true or false, got {value!r}")
    for name in REFUSED_IF_TRUE:
        if taken.get(name):
            raise UnsupportedField(
                f"`{name}: true` is not supported by this server (it returns no hidden states)"
            )
    honoured = {name: taken[name] for name in HONOURED if taken.get(name) is not None}
    _current.set(honoured)
    return honoured


def current() -> dict:
    """The honoured engine fields of the request being handled (empty outside a request)."""
    return _current.get() or {}
