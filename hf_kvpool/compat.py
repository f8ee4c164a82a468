"""Every private attribute of torch, accelerate and PEFT that hf_kvpool relies on, in one place.

Each function names what it reads; when a release renames something, this is the file to change.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

__all__ = [
    "adapter_state",
    "canonical_name",
    "forward_hooks",
    "global_forward_hooks",
    "is_config",
    "is_passive_hook",
    "offloaded_weights",
    "remove_forward_hooks",
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


# ---------------------------------------------------------------------------- PEFT
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
