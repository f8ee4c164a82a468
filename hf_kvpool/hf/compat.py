"""Every private attribute of transformers, torch, accelerate and PEFT that hf_kvpool relies on.

Each function names what it reads; when a release renames something, this is the file to change.
The transformers versions this was tested with are ``TESTED_TRANSFORMERS``; outside them
``enable()`` says so and the model computes without the pool.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers import PretrainedConfig

__all__ = [
    "TESTED_TRANSFORMERS",
    "GenerateStartSignal",
    "adapter_state",
    "autocast_state",
    "canonical_name",
    "forward_hooks",
    "continues_one_token_at_a_time",
    "default_cache_requested",
    "global_forward_hooks",
    "holds_tokens",
    "init_dynamic_cache",
    "init_layer",
    "install_cache_seam",
    "is_config",
    "is_passive_hook",
    "offloaded_weights",
    "own_tensors",
    "peft_loaded",
    "refuses_outside_caches",
    "remove_forward_hooks",
    "replicated_layer_class",
    "restore_sliding_window",
    "set_replicated_layer_class",
    "transformers_version_problem",
    "unwrap_model",
]

# Hooks transformers installs itself that only watch (they change no value the model computes):
# (module, qualified name) of the function.
_PASSIVE_HOOKS = {
    # output recording for output_hidden_states / output_attentions (idle unless asked)
    ("transformers.utils.output_capturing", "install_output_capuring_hook.<locals>.output_capturing_hook"),
    ("transformers.utils.output_capturing", "install_output_capturing_hook.<locals>.output_capturing_hook"),
    # enable_input_require_grads(): sets requires_grad on the embeddings' output
    (
        "transformers.modeling_utils",
        "PreTrainedModel.enable_input_require_grads.<locals>.make_inputs_require_grads",
    ),
}


def is_config(value) -> bool:
    return isinstance(value, PretrainedConfig)


# ---------------------------------------------------------------------------- torch hooks
def own_tensors(module: nn.Module):
    """``(name, tensor)`` of the parameters and buffers registered on ``module`` itself (not its
    children; torch's private dicts: one pass over the modules finds every weight)."""
    for store in (module._parameters, module._buffers):
        for name, t in store.items():
            if t is not None:
                yield name, t


def forward_hooks(module: nn.Module) -> list:
    """The forward pre-hooks and hooks registered on ``module`` (torch's private hook dicts)."""
    return [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]


def global_forward_hooks() -> list[str]:
    """Names of forward hooks registered for every module (``register_module_forward_hook``)."""
    from torch.nn.modules import module as torch_module

    hooks = [*torch_module._global_forward_pre_hooks.values(), *torch_module._global_forward_hooks.values()]
    return [getattr(h, "__qualname__", repr(h)) for h in hooks]


def is_passive_hook(hook) -> bool:
    """A hook known to change no value: transformers' own watchers, or one its author marked with
    ``hook.hf_kvpool_passive = True``."""
    fn = getattr(hook, "func", hook)  # functools.partial
    if getattr(hook, "hf_kvpool_passive", False) or getattr(fn, "hf_kvpool_passive", False):
        return True
    return (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)) in _PASSIVE_HOOKS


def remove_forward_hooks(module: nn.Module, functions: tuple) -> None:
    """Remove the forward (pre-)hooks of ``module`` whose function is one of ``functions``."""
    for hooks, extras in (
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
    ):
        for key in [k for k, fn in hooks.items() if fn in functions]:
            del hooks[key]
            for extra in extras:
                extra.pop(key, None)


# ---------------------------------------------------------------------------- accelerate
def offloaded_weights(model: nn.Module, rename=lambda name: name) -> dict[str, torch.Tensor]:
    """Values of parameters that accelerate keeps off the module (``meta`` placeholders), read from
    its hook's ``weights_map``; keyed by ``rename(parameter name)``."""
    found: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is None:
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.device.type == "meta":
                try:
                    found[rename(f"{prefix}.{name}" if prefix else name)] = weights_map[name]
                except KeyError:
                    pass
    return found


# ---------------------------------------------------------------------------- autocast
def autocast_state(module: nn.Module, device_types) -> str | None:
    """The autocast settings ``module``'s forward will run under, as stable text, or None.

    Two sources: ``torch.autocast`` contexts active now, for each device type the model computes
    on; and an autocast wrapped around the module's own ``forward`` (accelerate's mixed precision
    replaces ``model.forward`` with ``convert_outputs_to_fp32(autocast(forward))``, which starts
    after the forward pre-hooks have run). The wrapper is found by walking what wraps the
    instance's ``forward``: bound methods' ``__func__``, accelerate's ``model_forward``,
    ``__wrapped__``, ``functools.partial``'s ``func`` and closure cells (``autocast_decorator``).
    """
    parts = []
    for device_type in sorted(device_types):
        try:
            if torch.is_autocast_enabled(device_type):
                parts.append(f"{device_type}:{torch.get_autocast_dtype(device_type)}")
        except (RuntimeError, ValueError):  # a device type autocast does not know (meta...)
            continue
    forward = module.__dict__.get("forward")
    if forward is not None:
        parts.extend(f"forward {ac.device}:{ac.fast_dtype}" for ac in _autocasts_in(forward) if ac._enabled)
    return ",".join(parts) or None


def _autocasts_in(fn, depth: int = 8) -> list:
    """``torch.autocast`` instances reachable from ``fn`` through the wrappers named above."""
    found, todo, seen = [], [(fn, 0)], set()
    while todo:
        obj, level = todo.pop()
        if isinstance(obj, torch.autocast):
            found.append(obj)
        elif callable(obj) and id(obj) not in seen and level < depth:
            seen.add(id(obj))
            nexts = [getattr(obj, n, None) for n in ("__func__", "model_forward", "__wrapped__", "func")]
            for cell in getattr(obj, "__closure__", None) or ():
                try:
                    nexts.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            todo.extend((n, level + 1) for n in nexts if n is not None)
    return found


# ---------------------------------------------------------------------------- PEFT
def peft_loaded() -> bool:
    """Whether PEFT was imported (if not, no module can be a PEFT adapter layer)."""
    return "peft" in sys.modules


def unwrap_model(model):
    """The transformers model inside a PEFT wrapper (``PeftModel``, ``PeftMixedModel``), else ``model``.

    PEFT injects its adapter layers into that model, and ``PeftModel.generate`` calls its forward.
    """
    if type(model).__module__.split(".")[0] == "peft" and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def canonical_name(name: str) -> str:
    """A weight's name with PEFT's ``base_layer`` wrapping taken out, so a wrapped layer's base
    weights keep the name they have in the plain model."""
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def adapter_state(module: nn.Module):
    """PEFT state of an adapter layer, or None for any other module.

    Returns ``(disabled, active, merged, extras, containers)``: whether adapters are disabled on
    this layer, the names of the active adapters, the merged ones, per adapter the other settings
    (``{name: [(setting, value)]}``: LoRA's ``r``, ``lora_alpha``, ``scaling``...), and the
    containers (``ModuleDict`` / ``ParameterDict`` keyed by adapter name) that hold adapter weights.
    """
    names = getattr(module, "adapter_layer_names", None)
    if isinstance(names, tuple) and hasattr(module, "merged_adapters"):  # peft BaseTunerLayer
        containers = [getattr(module, n, None) for n in names]
        extras: dict[str, list] = {}
        for setting in getattr(module, "other_param_names", ()):
            values = getattr(module, setting, None)
            if values is not None and hasattr(values, "keys") and not isinstance(values, torch.Tensor):
                for adapter in values.keys():
                    extras.setdefault(adapter, []).append((setting, values[adapter]))
        return (
            bool(getattr(module, "_disable_adapters", False)),
            tuple(module.active_adapters),
            tuple(module.merged_adapters),
            extras,
            [c for c in containers if isinstance(c, (nn.ModuleDict, nn.ParameterDict))],
        )
    saved = getattr(module, "modules_to_save", None)
    if isinstance(saved, nn.ModuleDict) and hasattr(module, "_disable_adapters"):  # ModulesToSaveWrapper
        return bool(module._disable_adapters), tuple(module.active_adapters), (), {}, [saved]
    return None


# ---------------------------------------------------------------------------- transformers
# Versions whose generate() and cache classes this package was tested against: [first, first untested).
TESTED_TRANSFORMERS = ("5.24.0", "5.25.0")


def transformers_version_problem() -> str | None:
    """Why the installed transformers is outside the tested range, or None."""
    import transformers
    from packaging.version import Version

    installed = Version(transformers.__version__)
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    if low <= installed < high:
        return None
    return (
        f"transformers {transformers.__version__} is outside the versions hf_kvpool was tested with "
        f"(>= {TESTED_TRANSFORMERS[0]}, < {TESTED_TRANSFORMERS[1]}); install one of those "
        f"(pip install 'transformers>={TESTED_TRANSFORMERS[0]},<{TESTED_TRANSFORMERS[1]}')"
    )


class GenerateStartSignal:
    """Mixin for a Cache: ``_on_generate_start()`` runs when generate() starts with this cache.

    generate() sets ``_is_user_defined = True`` on a cache passed by the caller, once per call,
    before its first forward (generation/utils.py). The attribute reads True for such a cache, and
    False for one generate() made itself (``_user_defined = False``: auto mode's cache, armed by
    the seam instead); generate() reads it to decide whether the cache outlives the call.
    """

    _user_defined = True

    @property
    def _is_user_defined(self) -> bool:
        return self._user_defined

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        self._user_defined = bool(value)
        self._on_generate_start()

    def _on_generate_start(self) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------- the cache seam (auto mode)
# generate() makes its cache in GenerationMixin._prepare_cache_for_generation(generation_config,
# model_kwargs, generation_mode, batch_size, max_cache_length), after inputs are expanded for beams
# and num_return_sequences, writing it to model_kwargs["cache"]: a DynamicCache(config=text config)
# unless the caller gave one, use_cache is False, the model takes no default cache, or
# cache_implementation asks for another kind (static, offloaded, quantized...). Model classes that
# override it call super() (t5gemma, t5gemma2, voxtral_realtime); those that do not (parakeet and
# nemotron_asr RNNT decoders, vibevoice, diffusion_gemma's own signature) never reach the wrap and
# keep transformers' cache. The wrap is on the class, so copies and unpickled models carry it.
_SEAM = "_prepare_cache_for_generation"
_SEAM_PARAMS = (
    "self",
    "generation_config",
    "model_kwargs",
    "generation_mode",
    "batch_size",
    "max_cache_length",
)
_seam_maker = None  # (model, generation_config, model_kwargs, generation_mode) -> Cache | None


def install_cache_seam(maker) -> str | None:
    """Let ``maker(model, generation_config, model_kwargs, generation_mode)`` replace the cache
    generate() makes by default (a plain ``DynamicCache``) when it returns one; installed once, on
    ``GenerationMixin``. Returns why it cannot be installed (None once installed)."""
    global _seam_maker
    problem = transformers_version_problem()
    if problem:
        return problem
    import inspect

    from transformers import DynamicCache
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.__dict__.get(_SEAM)
    if getattr(original, "_hf_kvpool_seam", False):
        _seam_maker = maker
        return None
    if original is None or tuple(inspect.signature(original).parameters) != _SEAM_PARAMS:
        return f"GenerationMixin.{_SEAM} is not the one hf_kvpool knows"

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        given = model_kwargs.get("cache") is not None
        result = original(self, generation_config, model_kwargs, *args, **kwargs)
        made = model_kwargs.get("cache")
        if not given and type(made) is DynamicCache and _seam_maker is not None:
            mode = args[0] if args else kwargs.get("generation_mode")
            replacement = _seam_maker(self, generation_config, model_kwargs, mode)
            if replacement is not None:
                model_kwargs["cache"] = replacement
        return result

    _prepare_cache_for_generation.__doc__ = original.__doc__
    _prepare_cache_for_generation._hf_kvpool_seam = True
    _prepare_cache_for_generation.__wrapped__ = original
    _seam_maker = maker
    setattr(GenerationMixin, _SEAM, _prepare_cache_for_generation)
    return None


def default_cache_requested(generation_config, generation_mode) -> bool:
    """generate() was asked for its default dynamic cache (no ``cache_implementation``, or
    ``"dynamic"``), not as an assistant, in a mode hf_kvpool was tested with (greedy, sampling, beam
    search: ``generation_mode`` as generate() passes it to the seam; assisted decoding is left out)."""
    from transformers.generation.configuration_utils import GenerationMode

    if generation_config.cache_implementation not in (None, "dynamic"):
        return False
    if getattr(generation_config, "is_assistant", False):
        return False
    return generation_mode in {
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
        GenerationMode.BEAM_SEARCH,
        GenerationMode.BEAM_SAMPLE,
    }


def init_dynamic_cache(cache, ddp_cache_data=None, config=None, **kwargs) -> None:
    """``DynamicCache.__init__`` with its data first and positional, as DDP and export rebuild it."""
    from transformers import DynamicCache

    DynamicCache.__init__(cache, ddp_cache_data, config=config, **kwargs)


def replicated_layer_class(cache):
    """The layer class a DynamicCache without config appends for each new layer index."""
    return cache.layer_class_to_replicate


def set_replicated_layer_class(cache, layer_class) -> None:
    cache.layer_class_to_replicate = layer_class


def init_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """A layer's lazy initialisation from its first K/V (the two-argument form of 5.24)."""
    layer.lazy_initialization(keys, values)


def restore_sliding_window(layer, keys: torch.Tensor, values: torch.Tensor, total: int) -> None:
    """Put the last ``total`` tokens' K/V (``[B, H, total, D]``) into an empty sliding-window layer,
    as if ``update`` had received them: it keeps the window unless it records its past (assisted
    decoding), and counts every token in ``cumulative_length``."""
    init_layer(layer, keys, values)
    layer.cumulative_length = total
    if not layer.record_past:
        # a copy of the window: a view would keep the whole gathered prefix alive
        keys = keys[:, :, -layer.sliding_window + 1 :, :].clone()
        values = values[:, :, -layer.sliding_window + 1 :, :].clone()
    layer.keys, layer.values = keys, values


def holds_tokens(cache) -> bool:
    """Whether the cache holds anything: attention layers with a length, or linear layers with a
    state (an all-linear cache has no length: ``get_seq_length()`` raises there)."""
    for layer in cache.layers:
        if any(getattr(layer, "has_previous_state", {}).values()):
            return True
        if getattr(layer, "keys", None) is not None and layer.get_seq_length() > 0:
            return True
    return False


# Model types whose multi-token mixer (the torch path of Mamba-1) starts its scan from zeros and
# ignores a stored recurrent state: after a restore, they continue one token per forward.
SINGLE_STEP_MODEL_TYPES = frozenset({"mamba", "falcon_mamba", "jamba", "zamba"})


def continues_one_token_at_a_time(config) -> bool:
    return getattr(config, "model_type", None) in SINGLE_STEP_MODEL_TYPES


def refuses_outside_caches(model) -> bool:
    """generate() of this model takes no Cache but its own (MiniMax v1, RWKV...)."""
    check = getattr(model, "_supports_default_dynamic_cache", None)
    return check is not None and not check()
