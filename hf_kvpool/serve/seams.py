"""Every private name of ``transformers serve`` (transformers 5.24: ``transformers/cli/serve.py`` and
``transformers/cli/serving/``) that hf_kvpool.serve relies on, and the wrappers put on them.

Nothing else in hf_kvpool touches transformers serve's internals; if a transformers release moves
one of these, this is the module to change (``install`` fails with the name that is missing).

- ``serving.model_manager.ModelManager._load_model(model_id_and_revision, ..., gguf_file=None)``:
  returns each model it loads (first load, and again after the idle timeout): wrapped to enable
  the pool on it.
- ``serving.model_manager.ModelManager._load_processor(model_id_and_revision, gguf_file=None)``:
  wrapped to let a request's ``continue_final_message`` reach ``apply_chat_template``.
- ``serving.server.build_server(...) -> FastAPI``: looked up by ``Serve.__init__`` at call time,
  so replacing the module attribute adds ``GET /metrics`` to the app.
- ``serving.utils.BaseHandler._validate_request(body)``: wrapped to take the routers' engine
  fields out of the body first (``fields.py``) and count requests.
- ``_build_generation_config(body, model_generation_config, use_cb)`` of the chat, completion and
  responses handlers: wrapped to honour ``ignore_eos`` and to log once when a request's options
  turn pooling off (continuous batching; ``--compile``'s static cache).
- ``serving.utils.DirectStreamer._decode_stream`` (a ``tokenizers`` ``DecodeStream``) and
  ``serving.utils.GenerateManager.generate_non_streaming`` (returns ``(text, input_len,
  generated_ids)``): to honour ``skip_special_tokens: false``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from . import fields
from .pools import ServePools, log_once

__all__ = ["install"]

_installed: dict = {}


def install(pools: ServePools, on_request: Callable[[str], None] | None = None, add_routes=None) -> None:
    """Put the wrappers on transformers serve (once per process).

    ``on_request(endpoint)`` is called for each validated request; ``add_routes(app)`` with the app
    ``build_server`` made.
    """
    if _installed:
        raise RuntimeError("hf_kvpool.serve is already installed in this process")
    from transformers.cli.serving import chat_completion, completion, model_manager, response, server, utils

    manager = model_manager.ModelManager
    _wrap(manager, "_load_model", _loading(pools))
    _wrap(manager, "_load_processor", _processor_loading)
    _wrap(utils.BaseHandler, "_validate_request", _validating(on_request))
    for handler in (
        chat_completion.ChatCompletionHandler,
        completion.CompletionHandler,
        response.ResponseHandler,
    ):
        _wrap(handler, "_build_generation_config", _configuring)
    _wrap(utils.DirectStreamer, "__init__", _streamer_init)
    _wrap(utils.GenerateManager, "generate_non_streaming", _non_streaming)
    build = server.build_server

    @functools.wraps(build)
    def build_server(*args, **kwargs):
        app = build(*args, **kwargs)
        if add_routes is not None:
            add_routes(app)
        return app

    server.build_server = build_server
    _installed["build_server"] = (server, build)


def _wrap(owner, name: str, make: Callable) -> None:
    original = owner.__dict__.get(name)
    if original is None:
        raise RuntimeError(
            f"transformers serve has no {owner.__name__}.{name}: hf_kvpool.serve supports the transformers "
            "release it was written for (5.24); see hf_kvpool/serve/seams.py"
        )
    setattr(owner, name, functools.wraps(original)(make(original)))
    _installed[(owner, name)] = original


# ---------------------------------------------------------------------------- wrappers
def _loading(pools: ServePools):
    def make(original):
        def _load_model(self, model_id_and_revision, *args, **kwargs):
            model = original(self, model_id_and_revision, *args, **kwargs)
            gguf = kwargs.get("gguf_file")
            name = model_id_and_revision if gguf is None else f"{model_id_and_revision}:{gguf}"
            return pools.enable(model, name)

        return _load_model

    return make


def _processor_loading(original):
    def _load_processor(self, *args, **kwargs):
        processor = original(self, *args, **kwargs)
        render = processor.apply_chat_template

        @functools.wraps(render)
        def apply_chat_template(*a, **kw):
            if fields.current().get("continue_final_message"):
                kw["add_generation_prompt"] = False
                kw["continue_final_message"] = True
            return render(*a, **kw)

        processor.apply_chat_template = apply_chat_template
        return processor

    return _load_processor


def _validating(on_request):
    def make(original):
        def _validate_request(self, body, *args, **kwargs):
            from fastapi import HTTPException

            if isinstance(body, dict):
                try:
                    fields.take_engine_fields(body)
                except fields.UnsupportedField as exc:
                    raise HTTPException(status_code=400, detail=str(exc)) from exc
            result = original(self, body, *args, **kwargs)
            if on_request is not None:
                on_request(type(self).__name__)
            return result

        return _validate_request

    return make


def _configuring(original):
    def _build_generation_config(self, body, model_generation_config, use_cb=False, *args, **kwargs):
        config = original(self, body, model_generation_config, use_cb, *args, **kwargs)
        if use_cb:
            log_once(
                "continuous batching serves requests from its own paged cache: the pool is not used "
                "(run without --continuous-batching to reuse prefixes)"
            )
        elif getattr(config, "cache_implementation", None) is not None:
            log_once(
                f"requests with cache_implementation={config.cache_implementation!r} (--compile, or a "
                "request's generation_config) run with that cache: the pool is not used"
            )
        if fields.current().get("ignore_eos") and config.max_new_tokens is not None:
            config.min_new_tokens = config.max_new_tokens  # end-of-sequence is masked until max_tokens
        return config

    return _build_generation_config


def _streamer_init(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if fields.current().get("skip_special_tokens") is False:
            from tokenizers.decoders import DecodeStream

            self._decode_stream = DecodeStream([], skip_special_tokens=False)

    return __init__


def _non_streaming(original):
    async def generate_non_streaming(self, model, processor, inputs, gen_config, *args, **kwargs):
        text, input_len, generated_ids = await original(
            self, model, processor, inputs, gen_config, *args, **kwargs
        )
        if fields.current().get("skip_special_tokens") is False:
            text = processor.decode(generated_ids, skip_special_tokens=False)
        return text, input_len, generated_ids

    return generate_non_streaming
