"""Standalone injector: put the fused layers into any model, with peft's targeting rules, without peft.

``inject(model, config)`` replaces the nn.Linear / transformers Conv1D modules that
``config`` targets with the fused layers, in place. Targeting follows peft 0.21
(tuners_utils.check_target_module_exists and friends), re-stated here:

- ``target_modules`` a str: ``re.fullmatch`` against the module's full name;
  "all-linear": every Linear/Conv1D except a transformers model's output embedding;
  a list: the full name, or a suffix after a dot ("q_proj" matches "...attn.q_proj"); one of 20 names
  or more is first condensed to suffixes, as peft condenses it (_condensed);
  None: peft's default for the transformers ``model.config.model_type``.
- ``layers_to_transform`` (+ ``layers_pattern``) filter list matches by layer index, the
  first number following ``<pattern>.`` (any component when no pattern is given).
- ``exclude_modules`` (a str: fullmatch; a list: full name or dot suffix) and the
  modules of ``modules_to_save`` are never adapted.
- ``modules_to_save``: modules whose name ends with an entry are wrapped in
  ``ModulesToSave`` (peft's ModulesToSaveWrapper layout: ``original_module`` plus one
  trainable copy per adapter under ``modules_to_save.<adapter>``), under each of their
  names; a modules_to_save that matches nothing is warned about (peft goes on silently).

Methods plug in through ``register_method(config_class, Method(...))``; a method whose
layers share state across modules (FRoD's per-category projections) computes it once
in ``Method.prepare`` from all targeted modules before any layer is built.
"""
import contextlib
import copy
import dataclasses
import json
import os
import re
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from ._cache import TensorCache
from .config import FourierFTConfig, FrodConfig, OFTConfig
from .layers import FourierFTLinear, FrodLinear, OFTLinear
from .layers.base import AdapterLayer, warn_new_active_adapter
from .layers.frod import BufferDict, frod_category, frod_layer_index, frod_projections

STATE_ATTRIBUTE = "spectral_kernels_adapters"
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
# The prefix peft's PeftModel puts before the base model's own module names in a saved adapter.
PEFT_KEY_PREFIX = "base_model.model."
# The peft release whose layers and adapter format these adapters reproduce (peft checks it, e.g. for OFT's
# Cayley-Neumann parametrisation, changed in 0.18).
PEFT_FORMAT_VERSION = "0.21.0"

# peft 0.21's default target_modules per transformers model_type (peft/utils/constants.py,
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, which FourierFT and OFT start from);
# tests/test_inject.py checks every entry against peft.
LINEAR_DEFAULT_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "rwkv": ["key", "value", "receptance", "output"], "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
}
# FourierFT adapts GPT-2's MLP output projection instead of the fused qkv projection.
FOURIERFT_DEFAULT_TARGETS = {**LINEAR_DEFAULT_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}
FROD_DEFAULT_TARGETS = {**LINEAR_DEFAULT_TARGETS, "phi": ["q_proj", "v_proj"], "vit": ["query", "value"]}


class NoTargetModulesError(ValueError):
    """The config selects no module of the model."""


@dataclasses.dataclass(frozen=True)
class Method:
    """How ``inject`` adapts the modules one config class targets.

    ``adapt(module, key, adapter_name, config, shared)`` returns the fused layer for the
    base ``module`` named ``key``, or adds the adapter to ``module`` when it already is
    one of ``layer_class`` (and returns it). ``prepare(model, targets, adapter_name,
    config)`` (optional) runs once before, with ``targets`` {name: module}, and its
    result is passed to every ``adapt`` call as ``shared``. A ``prepare`` that keeps
    tensors on the model (as peft's tuner does) puts them in the root submodules named
    in ``model_attributes``, each holding per-adapter tensors under ``<...>.<adapter>``:
    they are saved as peft's ``base_model.<attribute>.<...>`` and removed by unload.
    """

    peft_type: str                 # peft's PeftType name, written to and read from adapter_config.json
    layer_class: type
    adapt: Callable
    default_target_modules: dict
    prepare: Optional[Callable] = None
    model_attributes: tuple = ()


METHODS: dict = {}


def register_method(config_class, method):
    """Make ``inject`` accept ``config_class`` instances."""
    METHODS[config_class] = method


def _pattern_value(patterns, key, default):
    """peft's FourierFT n_frequency_pattern rule: the first pattern p with ``re.match(rf".*\\.{p}$", key)``, else
    the entry for the full key."""
    for pattern, value in patterns.items():
        if re.match(rf".*\.{pattern}$", key):
            return value
    return patterns.get(key, default)


def _adapt_fourierft(module, key, adapter_name, config, shared):
    n_frequency = _pattern_value(config.n_frequency_pattern, key, config.n_frequency)
    if isinstance(module, FourierFTLinear):
        module.update_layer(adapter_name, config, n_frequency)
        return module
    return FourierFTLinear(module, adapter_name, config, n_frequency)


def _adapt_oft(module, key, adapter_name, config, shared):
    if isinstance(module, OFTLinear):
        module.update_layer(adapter_name, config)
        return module
    return OFTLinear(module, adapter_name, config)


# Where peft's FrodModel keeps each category's projection V, sparse pattern and its size, by adapter.
FROD_MODEL_ATTRIBUTES = ("frod_V", "frod_s_indices", "frod_s_size")


def _check_frod_adapters(model, config):
    """peft's rule: the FRoD adapters of a model share the projection seed, save_projection and the offload flag."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    for name, other in (state.configs.items() if state else ()):
        if not isinstance(other, FrodConfig):
            continue
        for field in ("projection_prng_key", "save_projection", "runtime_offload_base_weight"):
            if getattr(other, field) != getattr(config, field):
                raise ValueError(f"FRoD adapters of one model must share {field}: adapter {name!r} has "
                                 f"{getattr(other, field)!r}, the new one {getattr(config, field)!r}")


def _prepare_frod(model, targets, adapter_name, config):
    """peft's FRoD set-up: per module category one projection and sparse pattern, from the category's weights
    in block order, kept on the model under peft's names; ({category: (V, s_indices) BufferDicts}, the
    TensorCache of the projections' LU factors, shared by the layers while this inject builds them)."""
    if isinstance(model, nn.Sequential):
        raise TypeError("FRoD keeps the projections of each module category on the model it adapts (where peft's "
                        "FrodModel keeps them), and an nn.Sequential would run them as layers: inject into a module "
                        "that holds the Sequential")
    _check_frod_adapters(model, config)
    blocks = {}
    for fallback, (key, module) in enumerate(targets.items()):
        if isinstance(module, AdapterLayer):  # a further adapter: the projections come from the base weight
            weight = module._weight()
        else:
            weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()  # Conv1D: (in, out)
        blocks.setdefault(frod_layer_index(key, fallback), {})[frod_category(key)] = weight
    weights = {}
    for _, categories in sorted(blocks.items()):
        for category, weight in categories.items():
            weights.setdefault(category, []).append(weight)
    for attribute in FROD_MODEL_ATTRIBUTES:
        if attribute not in model._modules:
            setattr(model, attribute, nn.ModuleDict())
    # peft's FrodModel: an adapter that brings a category no adapter has yet gets projections and patterns of
    # its own for all its categories (drawn as peft draws them, with its sparse_rate and regularization_alpha);
    # one whose categories all exist shares the first adapter's, as peft's layers then do.
    computed = frod_projections(weights, config) if any(c not in model.frod_V for c in weights) else None
    shared = {}
    for category in weights:
        holders = []
        for attribute in FROD_MODEL_ATTRIBUTES:
            if category not in getattr(model, attribute):
                getattr(model, attribute)[category] = BufferDict(persistent=config.save_projection)
            holders.append(getattr(model, attribute)[category])
        first = next(iter(holders[0]), None)
        v, s_indices = computed[category] if computed else (holders[0][first], holders[1][first])
        holders[0][adapter_name], holders[1][adapter_name] = v, s_indices
        holders[2][adapter_name] = torch.tensor(v.shape, dtype=torch.long)
        shared[category] = holders[:2]
    return shared, TensorCache()


def _adapt_frod(module, key, adapter_name, config, shared):
    projections, factors = shared
    v, s_indices = projections[frod_category(key)]
    if isinstance(module, FrodLinear):
        module.update_layer(adapter_name, config, v, s_indices, factors)
        return module
    return FrodLinear(module, adapter_name, config, v, s_indices, factors=factors)


register_method(FourierFTConfig, Method("FOURIERFT", FourierFTLinear, _adapt_fourierft, FOURIERFT_DEFAULT_TARGETS))
register_method(OFTConfig, Method("OFT", OFTLinear, _adapt_oft, LINEAR_DEFAULT_TARGETS))
register_method(FrodConfig, Method("FROD", FrodLinear, _adapt_frod, FROD_DEFAULT_TARGETS, _prepare_frod,
                                   FROD_MODEL_ATTRIBUTES))


def _method(config):
    method = METHODS.get(type(config))
    if method is None:
        names = ", ".join(c.__name__ for c in METHODS)
        raise TypeError(f"unsupported config {type(config).__name__} (from {type(config).__module__}); expected "
                        f"spectral_kernels' {names}, or peft's config of the same method")
    return method


def _config_from_fields(peft_type, fields):
    """Our config of peft's ``peft_type`` with the values of the fields it shares with ``fields`` (a dict), or
    None for a peft_type no method here has."""
    config_class = {m.peft_type: c for c, m in METHODS.items()}.get(peft_type)
    if config_class is None:
        return None
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in fields.items() if k in names})


# The heads that peft's PeftModelFor<task> adds to modules_to_save, by the config's task_type (peft_model.py).
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}


def own_config(config):
    """``config``, or, for peft's config of one of the methods (peft.FourierFTConfig, ...), ours with its field
    values (peft's own PeftConfig fields aside, inference_mode kept), and, as get_peft_model, its task_type's head
    added to modules_to_save."""
    if type(config) in METHODS or not dataclasses.is_dataclass(config):
        return config
    peft_type = getattr(config, "peft_type", None)
    converted = _config_from_fields(getattr(peft_type, "value", peft_type),
                                    {f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    if converted is None:
        return config
    task_type = getattr(config, "task_type", None)
    heads = TASK_HEADS.get(str(getattr(task_type, "value", task_type)), [])
    converted.modules_to_save = [*(converted.modules_to_save or []), *heads] or None
    return converted


# ----------------------------------------------------------------------------------------------------------------
# modules_to_save

class ModulesToSave(nn.Module):
    """A module trained and saved in full, one copy per adapter (peft's ModulesToSaveWrapper names).

    The forward runs the active adapter's copy, or ``original_module`` when adapters are
    disabled or none of this wrapper's adapters is active.
    """

    adapter_layer_names = ("modules_to_save",)

    def __init__(self, original_module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict({})
        self.active_adapter = None
        self.disabled = False
        original_module.requires_grad_(False)

    def add_adapter(self, adapter_name):
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def set_adapter(self, adapter_names, inference_mode=False):
        present = [n for n in adapter_names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(f"only one adapter with modules_to_save can be active at a time, got {present}")
        self.active_adapter = present[0] if present else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_adapter and not inference_mode)

    def enable_adapters(self, enabled):
        """peft's: disabled, the forward runs the original module and no copy trains; enabled, the active adapter's
        copy trains again."""
        self.disabled = not enabled
        for name, module in self.modules_to_save.items():
            module.requires_grad_(enabled and name == self.active_adapter)

    def _drop_adapter(self, adapter_name):
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def module(self):
        """The module the forward runs."""
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.module()(*args, **kwargs)

    def __getattr__(self, name):
        """A public attribute the wrapper lacks is read from the module it runs (model code reads
        ``lm_head.weight.dtype``), as from peft's wrapper; private ones are not (copy's ``__deepcopy__``,
        accelerate's ``_hf_hook`` would act on that module instead of the wrapper)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "_modules" not in self.__dict__ or name in (
                    "original_module", "modules_to_save", "disabled", "active_adapter"):
                raise
        return getattr(self.module(), name)


# ----------------------------------------------------------------------------------------------------------------
# targeting

def _is_linear(module):
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _wrapped_prefixes(model):
    """Names of the adapter layers and wrappers already in the model, and of the methods' model attributes
    (FRoD's per-category projections, e.g. ``frod_V.lm_head``): their insides are never targeted."""
    attributes = set(_model_attributes(model))
    return tuple(f"{name}." for name, module in model.named_modules()
                 if isinstance(module, (AdapterLayer, ModulesToSave)) or name in attributes)


def _matches_list_entry(key, entry):
    return key == entry or key.endswith(f".{entry}")


def _layer_index(key, layers_pattern):
    """The layer index in ``key``: the first number after ``<layers_pattern>.``, or after any component where the
    pattern is empty (None, "" or [])."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
    return None if match is None else int(match.group("idx"))


def _is_excluded(config, key):
    exclude = getattr(config, "exclude_modules", None)  # peft's FrodConfig has none
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif any(_matches_list_entry(key, entry) for entry in exclude):
            return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save or [])


def _is_targeted(config, target_modules, key):
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True
    if not any(key.endswith(f".{entry}") for entry in target_modules):
        return False
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    index = _layer_index(key, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _all_linear(model, skip):
    """peft's "all-linear": every Linear/Conv1D (or adapter layer) but a transformers model's output embedding."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # then no model is one
        PreTrainedModel = ()
    output = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return {name for name, module in model.named_modules()
            if name and (_is_linear(module) or isinstance(module, AdapterLayer)) and module is not output
            and not name.startswith(skip)}


def _resolve_target_modules(model, config, method, skip):
    target_modules = config.target_modules
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        target_modules = method.default_target_modules.get(model_type)
        if target_modules is None:
            raise ValueError(f"target_modules is None and there is no default for model type {model_type!r}: "
                             "set target_modules in the config")
        return target_modules if isinstance(target_modules, str) else list(target_modules)
    if isinstance(target_modules, str):
        return _all_linear(model, skip) if target_modules.lower() == "all-linear" else target_modules
    return list(target_modules)


def _condensed(target_modules, names):
    """peft's condensing of a target_modules list of 20 names or more (as "all-linear" gives on larger models):
    each target is replaced by its shortest name suffix that no other module of the model (``names``, all of them)
    ends with, unless a suffix chosen before covers it; a long list is shortened so only when that makes it
    shorter. This changes what matches: layers_to_transform filters the modules a suffix matches, not those named
    in full."""
    if len(target_modules) < 20:
        return target_modules
    targets = set(target_modules)

    def suffixes(name):  # shortest first
        parts = name.split(".")
        return [".".join(parts[i:]) for i in reversed(range(len(parts)))]

    ends = tuple(f".{t}" for t in targets)
    taken = {s for name in names if name not in targets and not name.endswith(ends) for s in suffixes(name)}
    chosen = set()
    for name in sorted(targets, key=suffixes):
        if any(name.endswith(f".{c}") for c in chosen):
            continue
        free = next((s for s in suffixes(name) if s not in chosen and s not in taken), None)
        if free is not None:
            chosen.add(free)
    return chosen if chosen and len(chosen) < len(target_modules) else target_modules


def _no_match_error(model, config, target_modules, excluded, skip):
    if excluded:
        return NoTargetModulesError(f"every module that target_modules={target_modules!r} selects is excluded "
                                    f"(exclude_modules={getattr(config, 'exclude_modules', None)!r}, "
                                    f"modules_to_save={config.modules_to_save!r}): {sorted(excluded)}")
    names = [name for name, _ in model.named_modules() if name and not name.startswith(skip)]
    if isinstance(target_modules, str):
        unmatched = [target_modules]
    else:
        unmatched = [e for e in target_modules if not any(_matches_list_entry(name, e) for name in names)]
    message = f"no module of the model matches target_modules={target_modules!r}"
    if unmatched:
        message += f": these patterns match no module name: {unmatched}"
    elif config.layers_to_transform is not None:
        message += (f": the modules they name are outside layers_to_transform={config.layers_to_transform!r} "
                    f"(layers_pattern={config.layers_pattern!r})")
    else:
        message += ": the modules they name are inside adapter layers already"
    return NoTargetModulesError(message)


def find_targets(model, config, condense=True):
    """{name: module} that ``config`` adapts in ``model``, in module order; the resolved target_modules (condensed
    as peft condenses a long list, unless not ``condense``).

    Raises NoTargetModulesError naming the patterns that matched nothing.
    """
    method = _method(config)
    skip = _wrapped_prefixes(model)
    target_modules = _resolve_target_modules(model, config, method, skip)
    if condense and not isinstance(target_modules, str):
        target_modules = _condensed(target_modules, [name for name, _ in model.named_modules()])
    targets, excluded = {}, []
    for key, module in model.named_modules():
        if not key or key.startswith(skip) or not _is_targeted(config, target_modules, key):
            continue
        if _is_excluded(config, key):
            excluded.append(key)
            continue
        if isinstance(module, AdapterLayer) and not isinstance(module, method.layer_class):
            raise TypeError(f"{key} is already a {type(module).__name__}; a module takes adapters of one method")
        if not (_is_linear(module) or isinstance(module, method.layer_class)):
            raise TypeError(f"target module {key} ({type(module).__module__}.{type(module).__qualname__}) is not "
                            "supported: only torch.nn.Linear and transformers' Conv1D can be adapted")
        targets[key] = module
    if not targets:
        raise _no_match_error(model, config, target_modules, excluded, skip)
    return targets, target_modules


# ----------------------------------------------------------------------------------------------------------------
# the model-level API

@dataclasses.dataclass
class InjectedAdapters:
    """What ``inject`` keeps on the model: the applied configs by adapter name, and the active ones."""

    configs: dict = dataclasses.field(default_factory=dict)
    active: list = dataclasses.field(default_factory=list)


def adapters(model):
    """The InjectedAdapters of a model ``inject`` has adapted; raises if it has none."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError("the model has no spectral_kernels adapters: call spectral_kernels.inject first")
    return state


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _adapter_layers(model):
    layer_classes = tuple(m.layer_class for m in METHODS.values())
    return [(name, m) for name, m in model.named_modules() if isinstance(m, layer_classes)]


def _upcast_adapter(model, adapter_name):
    """peft's cast_adapter_dtype: the float16/bfloat16 parameters of ``adapter_name`` in float32."""
    for _, layer in _adapter_layers(model):
        for dict_name in layer.adapter_layer_names:
            entries = getattr(layer, dict_name)
            entry = entries[adapter_name] if adapter_name in entries else None
            if isinstance(entry, nn.Parameter) and entry.dtype in (torch.float16, torch.bfloat16):
                entries[adapter_name] = nn.Parameter(entry.detach().float(), requires_grad=entry.requires_grad)
            elif isinstance(entry, nn.Module) and any(p.dtype in (torch.float16, torch.bfloat16)
                                                      for p in entry.parameters()):
                entry.float()


def _wrappers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ModulesToSave)]


def _add_modules_to_save(model, config, adapter_name):
    """Wrap the modules that ``config.modules_to_save`` names, as peft: a module under several names (shared or
    tied) once per name, none inside an adapter layer or a wrapper, and no adapter layer or container."""
    skip = tuple(f"{name}." for name, _ in _adapter_layers(model))
    found = False
    for key, module in list(model.named_modules(remove_duplicate=False)):
        if not key or key.startswith(skip) or not any(key.endswith(m) for m in config.modules_to_save or []):
            continue
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name)
        elif not any(key.startswith(f"{name}.") for name, _ in _wrappers(model)):
            if isinstance(module, (AdapterLayer, nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
                raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module)} ({key})")
            wrapper = ModulesToSave(module)
            wrapper.add_adapter(adapter_name)
            _set_submodule(model, key, wrapper)
        found = True
    if config.modules_to_save and not found:  # peft goes on silently: its checkpoints may hold such configs
        warnings.warn(f"no module of the model matches modules_to_save={config.modules_to_save!r}")


def inject(model, config, adapter_name="default", autocast_adapter_dtype=True):
    """Adapt the modules ``config`` targets with the fused layers, in place; returns ``model``. ``config`` is
    one of ours or peft's config of the same method (peft.FourierFTConfig, ...).

    The first adapter becomes the active one; a further adapter (another ``inject`` with
    a new name) is added inactive and frozen, as in peft. Only the active adapters'
    parameters (and biases as ``config.bias`` says) stay trainable. With
    ``autocast_adapter_dtype`` (peft's get_peft_model default) the adapter's float16 and
    bfloat16 parameters are made float32, so that small updates do not round away; the
    fused ops take them so (they accumulate in float32 whatever their dtype).
    """
    config = own_config(config)
    method = _method(config)
    state = getattr(model, STATE_ATTRIBUTE, None) or InjectedAdapters()
    if adapter_name in state.configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    if config.bias != "none" and any(c.bias != "none" for c in state.configs.values()):
        raise ValueError("only 1 adapter can have a bias, as in peft: when using multiple adapters, set bias to "
                         "'none' for all adapters")
    config = copy.deepcopy(config)
    # peft's FRoD builds its projections from the modules a long target_modules names before it condenses the list,
    # so from all of them, whatever layers_to_transform says
    named = find_targets(model, config, condense=False)[0] if method.prepare else None
    targets, config.target_modules = find_targets(model, config)
    keep = _wrapped(model)
    try:
        shared = method.prepare(model, named, adapter_name, config) if method.prepare else None
        for key, module in targets.items():
            layer = method.adapt(module, key, adapter_name, config, shared)
            if config.fan_in_fan_out != layer._conv1d:  # as peft: its saved config has the last module's layout
                warnings.warn(f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module is "
                              f"`{'Conv1D' if layer._conv1d else 'torch.nn.Linear'}`. Setting fan_in_fan_out to "
                              f"{layer._conv1d}.")
                config.fan_in_fan_out = layer._conv1d
            if layer is not module:
                _set_submodule(model, key, layer)
        if autocast_adapter_dtype:
            _upcast_adapter(model, adapter_name)
        _add_modules_to_save(model, config, adapter_name)
    except Exception:  # e.g. a module too small for n_frequency: no half-made adapter stays in the model
        _withdraw(model, adapter_name, keep)
        raise
    state.configs[adapter_name] = config
    state.active = state.active or [adapter_name]
    setattr(model, STATE_ATTRIBUTE, state)
    set_adapter(model, state.active)
    mark_only_adapters_as_trainable(model)
    return model


def set_adapter(model, adapter_names, inference_mode=False):
    """Activate ``adapter_names`` (a name or a list) on every layer, as peft's set_adapter: their parameters and
    modules_to_save copies train (unless ``inference_mode``), the other adapters' freeze, and the other
    parameters, biases included, keep their requires_grad. A merged layer is unmerged first, with peft's warning
    (it would otherwise go on running the merged adapters)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    configs = adapters(model).configs
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {list(configs)}")
    for _, layer in _adapter_layers(model):
        if layer.merged:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
            layer.unmerge()
    _activate(model, names, inference_mode)


def _activate(model, names, inference_mode=False):
    """set_adapter without its checks and unmerging (peft's delete_adapter leaves the merged layers merged)."""
    for _, wrapper in _wrappers(model):
        wrapper.set_adapter(names, inference_mode)
    for _, layer in _adapter_layers(model):
        layer.set_adapter([n for n in names if n in layer._adapters()], inference_mode)
    adapters(model).active = names


def delete_adapter(model, adapter_name):
    """Remove adapter ``adapter_name`` from the model, as peft's delete_adapter: its parameters and state in every
    layer, its modules_to_save copies and (FRoD) its projections. The other active adapters stay active; when it
    was the only active one, the first remaining one by name becomes active (with a warning), or none. A merged
    adapter must be unmerged first. The fused layers stay in place (``unload`` removes them)."""
    state = adapters(model)
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {list(state.configs)}")
    layers = [layer for _, layer in _adapter_layers(model)]
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"cannot delete adapter {adapter_name!r} while it is merged: unmerge it first")
    if adapter_name in state.active:  # as peft's layers: the others stay active, else the first name in sorted order
        active = [name for name in state.active if name != adapter_name]
        others = sorted(name for name in state.configs if name != adapter_name)
        if not active and others:
            active = others[:1]
            warn_new_active_adapter(adapter_name, active[0])
        _activate(model, active)  # first, so that no layer picks a new active adapter of its own
    _withdraw(model, adapter_name)
    del state.configs[adapter_name]


def _wrapped(model):
    """The names of the model's fused layers and modules_to_save wrappers."""
    return {name for name, _ in [*_adapter_layers(model), *_wrappers(model)]}


def _withdraw(model, adapter_name, keep=None):
    """Remove adapter ``adapter_name`` (also as far as a failed inject made it) from the layers, the
    modules_to_save wrappers and the methods' model attributes; layers and wrappers whose names are not in
    ``keep`` (default: all of them) give the model back the modules they wrap."""
    for name, module in [*_adapter_layers(model), *_wrappers(model)]:
        module._drop_adapter(adapter_name)
        if keep is not None and name not in keep:
            _set_submodule(model, name, module.original_module if isinstance(module, ModulesToSave)
                           else module.release_base_layer())
    for attribute in _model_attributes(model):
        holders = getattr(model, attribute)
        for key, holder in list(holders.items()):
            if adapter_name in holder:
                del holder[adapter_name]
            if not len(holder.keys()):  # a later adapter then builds its own for this key (FRoD's category)
                del holders[key]
        if not len(holders):
            delattr(model, attribute)


def mark_only_adapters_as_trainable(model):
    """Freeze everything but the active adapters' parameters, their modules_to_save copies and, per their
    configs' ``bias``, biases; the parameters of an adapter whose config has ``inference_mode`` stay frozen (its
    ``bias`` still applies, as in peft)."""
    state = adapters(model)
    layers, wrappers = [m for _, m in _adapter_layers(model)], [m for _, m in _wrappers(model)]
    trainable = set()
    for layer in layers:
        for attribute in layer.adapter_layer_names:
            trainable.update(id(p) for p in getattr(layer, attribute).parameters())
    for wrapper in wrappers:
        trainable.update(id(p) for p in wrapper.modules_to_save.parameters())
    for p in model.parameters():
        if id(p) not in trainable:
            p.requires_grad_(False)
    configs = [state.configs[name] for name in state.active]
    for config in configs:
        if config.bias == "all":
            for key, p in model.named_parameters():
                if (key == "bias" or key.endswith(".bias")) and ".original_module." not in key:
                    p.requires_grad_(True)
        elif config.bias != "none":  # "fourier_only", "oft_only": the adapted layers' biases
            for layer in layers:
                if layer.base_layer.bias is not None:
                    layer.base_layer.bias.requires_grad_(True)
    # Then, as peft orders it, an inference-mode adapter's own parameters (its modules_to_save copies too) freeze;
    # the biases that `bias` made trainable elsewhere stay so.
    for name, config in zip(state.active, configs):
        if config.inference_mode:
            for module in [*layers, *wrappers]:
                for attribute in module.adapter_layer_names:
                    if name in getattr(module, attribute):
                        getattr(module, attribute)[name].requires_grad_(False)


@contextlib.contextmanager
def disable_adapters(model):
    """Within the block the model runs without its adapters (merged ones are unmerged at its first call), and, as
    peft's disable_adapter, their parameters and modules_to_save copies are frozen; after it the active ones train
    again."""
    adapters(model)
    layers, wrappers = [m for _, m in _adapter_layers(model)], [m for _, m in _wrappers(model)]
    layer_states = [layer.disable_adapters for layer in layers]
    wrapper_states = [wrapper.disabled for wrapper in wrappers]
    for module in [*layers, *wrappers]:
        module.enable_adapters(False)
    try:
        yield model
    finally:
        for module, disabled in zip([*layers, *wrappers], [*layer_states, *wrapper_states]):
            module.enable_adapters(not disabled)


def _model_attributes(model):
    """The root submodules the methods' ``prepare`` put on ``model``."""
    return [a for m in METHODS.values() for a in m.model_attributes if a in model._modules]


def _unload(model, merge, safe_merge=False, adapter_names=None):
    adapters(model)
    for name, layer in _adapter_layers(model):
        if merge:
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        _set_submodule(model, name, layer.release_base_layer())
    for name, wrapper in _wrappers(model):  # as peft, the active adapter's copy, merged or not
        active = wrapper.active_adapter
        _set_submodule(model, name, wrapper.original_module if active is None else wrapper.modules_to_save[active])
    for attribute in _model_attributes(model):
        delattr(model, attribute)
    delattr(model, STATE_ATTRIBUTE)
    return model


def merge_and_unload(model, safe_merge=False, adapter_names=None):
    """Merge the adapters (the active ones, or ``adapter_names``) into the base weights and remove the
    fused layers; returns the plain model. modules_to_save keep the active adapter's copy."""
    return _unload(model, True, safe_merge, adapter_names)


def unload(model):
    """Remove the fused layers without merging (weights merged before stay merged, and modules_to_save keep the
    active adapter's copy, as in peft)."""
    return _unload(model, False)


def trainable_parameters(model):
    """(trainable, total) parameter counts, each parameter counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model):
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


# ----------------------------------------------------------------------------------------------------------------
# peft's adapter format

def _adapter_state_dict(model, adapter_name):
    """The adapter's tensors under peft's saved names: the adapter name dropped, PeftModel's prefix added
    (``base_model.model.`` for the model's modules, ``base_model.`` for tensors peft keeps on its tuner)."""
    config = adapters(model).configs[adapter_name]
    state = model.state_dict()
    out = {}
    for name, layer in _adapter_layers(model):
        for attribute in layer.adapter_layer_names:
            if adapter_name in getattr(layer, attribute):
                prefix = f"{name}.{attribute}.{adapter_name}"
                out.update({f"{name}.{attribute}{k[len(prefix):]}": v for k, v in state.items()
                            if k == prefix or k.startswith(prefix + ".")})
        if config.bias not in ("none", "all") and layer.base_layer.bias is not None:
            out[f"{name}.base_layer.bias"] = state[f"{name}.base_layer.bias"]
    if config.bias == "all":
        out.update({k: v for k, v in state.items() if k.endswith("bias")
                    and ".modules_to_save." not in k and ".original_module." not in k})
    for name, wrapper in _wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            prefix = f"{name}.modules_to_save.{adapter_name}."
            out.update({f"{name}.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)})
    out = {PEFT_KEY_PREFIX + k: v for k, v in out.items()}
    suffix = f".{adapter_name}"
    for attribute in _model_attributes(model):
        out.update({"base_model." + k.removesuffix(suffix): v for k, v in state.items()
                    if k.startswith(attribute + ".") and k.endswith(suffix)})
    # Tensors that share memory (tied biases under bias="all", as BERT's masked-LM decoder bias) go as copies after
    # the first, as peft saves them: safetensors refuses shared memory.
    storages, saved = set(), {}
    for k, v in out.items():
        v = v.detach().contiguous()
        storage = (v.device, v.untyped_storage().data_ptr())
        saved[k] = v.clone() if storage in storages else v
        storages.add(storage)
    return saved


def _model_key(key, adapter_name, layers, wrappers, attributes):
    """The model's state_dict key of a key in peft's saved adapter (the inverse of _adapter_state_dict)."""
    if not key.startswith(PEFT_KEY_PREFIX):
        key = key.removeprefix("base_model.")
        return f"{key}.{adapter_name}" if key.split(".")[0] in attributes else key
    key = key.removeprefix(PEFT_KEY_PREFIX)
    owner = next((n for n in (*layers, *wrappers) if key.startswith(n + ".")), None)
    rest = key[len(owner) + 1:] if owner else ""
    attribute, _, tail = rest.partition(".")
    if owner in layers and attribute in layers[owner].adapter_layer_names:
        return f"{owner}.{attribute}.{adapter_name}" + (f".{tail}" if tail else "")
    if owner in wrappers:
        return f"{owner}.modules_to_save.{adapter_name}.{rest}"
    return key


def _config_json(model, config, method):
    """adapter_config.json's text as peft writes a config without task_type (a task's head is in modules_to_save):
    sets as lists, and the model's class in auto_mapping (peft's AutoPeftModel reads it)."""
    fields = {k: sorted(v) if isinstance(v, set) else v for k, v in dataclasses.asdict(config).items()}
    if isinstance(fields["target_modules"], list):
        fields["target_modules"] = sorted(fields["target_modules"])
    model_config = getattr(model, "config", None)
    fields = {**fields, "peft_type": method.peft_type, "peft_version": PEFT_FORMAT_VERSION, "task_type": None,
              "inference_mode": True, "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
              "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}}
    return json.dumps(fields, indent=2, sort_keys=True)


def save_adapter(model, save_directory, adapter_name="default"):
    """Write adapter ``adapter_name`` in peft's format (adapter_config.json and adapter_model.safetensors):
    ``peft.PeftModel.from_pretrained(base_model, save_directory)`` loads it (except OFT on transformers Conv1D
    layers, which peft's OFT does not take: a warning says so; ``load_adapter`` loads it)."""
    from safetensors.torch import save_file

    config = adapters(model).configs.get(adapter_name)
    if config is None:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {list(adapters(model).configs)}")
    if isinstance(config, OFTConfig) and any(layer._conv1d and adapter_name in layer._adapters()
                                             for _, layer in _adapter_layers(model)):
        warnings.warn(f"adapter {adapter_name!r} adapts transformers Conv1D layers with OFT, which peft's OFT does "
                      "not take: peft cannot load what is saved here (spectral_kernels.load_adapter can)")
    text, state = _config_json(model, config, _method(config)), _adapter_state_dict(model, adapter_name)
    os.makedirs(save_directory, exist_ok=True)  # written once both are ready: a failure leaves no half-saved adapter
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        f.write(text)
    save_file(state, os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


def _check_oft_fields(directory, fields):
    """peft's checks of a saved OFT config (OFTConfig.check_kwargs): peft 0.14 changed OFT, and 0.18 its
    Neumann series (peft_version is written since 0.18)."""
    if "oft_block_size" not in fields:
        raise ValueError(f"{directory}: an OFT adapter saved by peft before 0.14.0, whose OFT was another method: "
                         "retrain it with a newer peft (peft 0.13 loads it)")
    version = re.match(r"(\d+)\.(\d+)", str(fields.get("peft_version") or "0.0"))
    if fields.get("use_cayley_neumann") and version and tuple(map(int, version.groups())) < (0, 18):
        warnings.warn(f"{directory}: an OFT adapter saved by peft before 0.18.0, whose Cayley-Neumann "
                      "parameterization differed slightly: retrain it with a newer peft (peft 0.17 runs it as saved)")


def _read_adapter(directory):
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        fields = json.load(f)
    if fields.get("peft_type") == METHODS[OFTConfig].peft_type:
        _check_oft_fields(directory, fields)
    config = _config_from_fields(fields.get("peft_type"), fields)
    if config is None:
        raise ValueError(f"{directory}: peft_type {fields.get('peft_type')!r} is not one of "
                         f"{sorted(m.peft_type for m in METHODS.values())}")
    path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if os.path.exists(path):
        from safetensors.torch import load_file

        weights = load_file(path)
    else:
        weights = torch.load(os.path.join(directory, WEIGHTS_NAME), map_location="cpu", weights_only=True)
    return config, weights


def load_adapter(model, directory, adapter_name="default", is_trainable=False, autocast_adapter_dtype=True):
    """Inject the adapter saved in peft's format in ``directory`` (by peft or ``save_adapter``) and load its
    weights; unless ``is_trainable``, its parameters are frozen and the model is put in eval mode, as by peft's
    from_pretrained (whose config's ``bias`` still makes biases trainable; ``autocast_adapter_dtype`` as for
    ``inject``). Returns ``model``. When the saved tensors do not fit, it raises and gives the model back its
    adapters and layers as they were."""
    config, weights = _read_adapter(directory)
    config.inference_mode = not is_trainable
    before = getattr(model, STATE_ATTRIBUTE, None)
    active, keep = list(before.active) if before else [], _wrapped(model)
    trainable = {p: p.requires_grad for p in model.parameters()}
    inject(model, config, adapter_name, autocast_adapter_dtype)
    try:
        _load_adapter_weights(model, directory, adapter_name, weights)
        if not is_trainable:  # as peft's load_adapter: dropout off
            model.eval()
    except Exception:  # mismatched names (ValueError) or shapes (load_state_dict's RuntimeError)
        _withdraw(model, adapter_name, keep)
        if before is None:
            delattr(model, STATE_ATTRIBUTE)
        else:
            del before.configs[adapter_name]
            before.active = active
        for p, requires_grad in trainable.items():
            p.requires_grad_(requires_grad)
        raise
    return model


def _load_adapter_weights(model, directory, adapter_name, weights):
    layers, wrappers = dict(_adapter_layers(model)), dict(_wrappers(model))
    attributes = _model_attributes(model)
    state = {_model_key(k, adapter_name, layers, wrappers, attributes): v for k, v in weights.items()}
    own = model.state_dict()
    unused = sorted(k for k in state if k.split(".")[0] in attributes and k not in own)
    if unused:  # as peft, which warns and builds its own
        warnings.warn(f"{directory}: the saved adapter's FRoD projections {unused[:3]} are not loaded (its config "
                      "has save_projection=False, or no layer here is in their category); the model's are used")
        state = {k: v for k, v in state.items() if k not in unused}
    # peft's bias="all" saves every tensor named "bias", a modules_to_save wrapper's inner ones too, which peft's
    # loading leaves unused (the wrapper's own entries hold the copy): so does this one (strict=False below).
    inner = tuple(f"{w}.modules_to_save.{adapter_name}.{part}." for w in wrappers
                  for part in ("modules_to_save", "original_module"))
    unexpected = sorted(k for k in state if k not in own and not (k.startswith(inner) and "bias" in k))
    if unexpected:
        raise ValueError(f"{directory}: the saved adapter has tensors the model does not: {unexpected[:5]}")
    missing = sorted(set(_adapter_state_dict(model, adapter_name)) - set(weights))
    if missing:
        raise ValueError(f"{directory}: the saved adapter lacks tensors the model needs: {missing[:5]}")
    model.load_state_dict(state, strict=False)
