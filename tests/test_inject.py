"""spectral_kernels.inject against peft: which modules are adapted, adapter handling, peft's saved format."""
import copy
import dataclasses
import itertools
import json
import random
import sys
import warnings

import peft
import pytest
import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import (TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING,
                                  TRANSFORMERS_MODELS_TO_FROD_TARGET_MODULES_MAPPING,
                                  TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING)
from transformers import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                          BertForTokenClassification, FalconConfig, FalconForCausalLM, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

import spectral_kernels as sk
from spectral_kernels.inject import (FOURIERFT_DEFAULT_TARGETS, FROD_DEFAULT_TARGETS, LINEAR_DEFAULT_TARGETS,
                                     STATE_ATTRIBUTE, ModulesToSave, NoTargetModulesError, _condensed, adapters)
from spectral_kernels.layers.base import AdapterLayer

from conftest import assert_close, assert_low_precision_close

PEFT_CONFIG = {sk.FourierFTConfig: peft.FourierFTConfig, sk.OFTConfig: peft.OFTConfig, sk.FrodConfig: peft.FrodConfig}


# Models built from configs, without dropout (they are in training mode).
def llama(layers=3):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=32))


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def bert(cls=BertForSequenceClassification):
    torch.manual_seed(0)
    return cls(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=64, max_position_embeddings=32,
                                                    num_labels=3, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0))


def t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=64,
                                               dropout_rate=0.0, decoder_start_token_id=0))


def each_method(targets):
    """Parametrize a test over a config of each method that adapts ``targets``, with random initial values."""
    return pytest.mark.parametrize("config", [
        sk.FourierFTConfig(n_frequency=20, target_modules=targets, init_weights=False),
        sk.OFTConfig(oft_block_size=8, target_modules=targets, init_weights=False),
        sk.FrodConfig(target_modules=targets, init_weights=False, progressbar=False),
    ], ids=["fourierft", "oft", "frod"])


def peft_config(config):
    """peft's config with the same field values (peft's FrodConfig has no exclude_modules)."""
    cls = PEFT_CONFIG[type(config)]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(config).items() if k in names})


def peft_injected(model, config, adapter_name="default"):
    """``model`` with peft's own layers for ``config`` (peft.inject_adapter_in_model on a bare model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.inject_adapter_in_model(peft_config(config), model, adapter_name)


def adapted(model, cls):
    return sorted(name for name, module in model.named_modules() if isinstance(module, cls))


def tokens(model, n=7):
    return torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))


def test_default_targets_are_peft_s():
    """The same defaults as peft's, for the same model types (rwkv, rwkv7, nemotron_h and gemma4 were missing)."""
    assert LINEAR_DEFAULT_TARGETS == TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
    assert FOURIERFT_DEFAULT_TARGETS == TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING
    assert FROD_DEFAULT_TARGETS == TRANSFORMERS_MODELS_TO_FROD_TARGET_MODULES_MAPPING


LLAMA_LINEARS = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
TARGETING = {
    "suffixes": dict(target_modules=["q_proj", "v_proj"]),
    "dotted-suffix": dict(target_modules=["self_attn.o_proj", "mlp.up_proj"]),
    "regex": dict(target_modules=r"model\.layers\.[02]\.self_attn\.(q|k)_proj"),
    "all-linear": dict(target_modules="all-linear"),
    "ALL-LINEAR": dict(target_modules="ALL-LINEAR"),
    "default": dict(),
    "layers-list": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
    "layers-int-pattern": dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
    "layers-list-pattern": dict(target_modules=["v_proj"], layers_to_transform=[1, 2], layers_pattern=["layers"]),
    "layers-zero-pattern": dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"),
    "layers-empty-pattern": dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern=""),
    "full-name-ignores-layers": dict(target_modules=["model.layers.1.mlp.up_proj"], layers_to_transform=[0]),
    "exclude-list": dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
    "exclude-suffix": dict(target_modules="all-linear", exclude_modules=["gate_proj", "self_attn.k_proj"]),
    "exclude-regex": dict(target_modules="all-linear", exclude_modules=r".*layers\.1\..*"),
    "modules-to-save-excluded": dict(target_modules="all-linear", modules_to_save=["o_proj"]),
    # 20 names or more: peft condenses them to suffixes, which layers_to_transform filters
    "long-list-layers": dict(target_modules=LLAMA_LINEARS, layers_to_transform=[1]),
    "long-list-partial-layers": dict(target_modules=LLAMA_LINEARS[:-1], layers_to_transform=[0, 2]),
}


@pytest.mark.parametrize("case", list(TARGETING))
def test_targets_like_peft(case):
    config = sk.FourierFTConfig(n_frequency=16, **TARGETING[case])
    ours = sk.inject(llama(), config)
    expected = adapted(peft_injected(llama(), config), BaseTunerLayer)
    assert adapted(ours, AdapterLayer) == expected and expected


@pytest.mark.parametrize("make", [llama, gpt2, bert])
def test_long_target_lists_condense_like_peft(make):
    """peft's inject_adapter replaces a target_modules list of 20 names or more by the suffixes its
    _find_minimal_target_modules picks, where that list is shorter; ours picks the same."""
    from peft.tuners.tuners_utils import _find_minimal_target_modules
    names = [name for name, _ in make().named_modules()]
    pick = random.Random(0)
    for size in (19, 20, 21, 30, len(names) - 1):
        targets = pick.sample(names[1:], size)
        others = [n for n in names if n not in targets and not n.endswith(tuple(f".{t}" for t in targets))]
        expected = _find_minimal_target_modules(targets, others) if size >= 20 else targets
        assert set(_condensed(targets, names)) == set(expected if len(expected) < size else targets)


@pytest.mark.parametrize("make, config", [
    (gpt2, sk.FourierFTConfig(n_frequency=16)),  # peft's default for GPT-2 FourierFT: mlp.c_proj (Conv1D)
    (gpt2, sk.FourierFTConfig(n_frequency=16, target_modules="all-linear")),  # Conv1D, not the lm_head
    (bert, sk.OFTConfig(oft_block_size=8)),
    (bert, sk.OFTConfig(oft_block_size=8, target_modules=["dense"], modules_to_save=["classifier"])),
], ids=["gpt2-default", "gpt2-all-linear", "bert-default", "bert-modules-to-save"])
def test_targets_like_peft_other_models(make, config):
    ours = sk.inject(make(), config)
    expected = peft_injected(make(), config)
    assert adapted(ours, AdapterLayer) == adapted(expected, BaseTunerLayer)
    assert adapted(ours, ModulesToSave) == adapted(expected, peft.utils.other.ModulesToSaveWrapper)


def test_n_frequency_pattern_like_peft():
    config = sk.FourierFTConfig(n_frequency=16, target_modules=["q_proj", "v_proj"],
                                n_frequency_pattern={"q_proj": 30, "layers.1.self_attn.v_proj": 40, "v": 50,
                                                     "model.layers.2.self_attn.v_proj": 60})  # a full name
    ours, theirs = sk.inject(llama(), config), peft_injected(llama(), config)
    counts = {n: m.fourierft_n_frequency["default"] for n, m in ours.named_modules() if isinstance(m, AdapterLayer)}
    assert counts == {n: m.fourierft_n_frequency["default"] for n, m in theirs.named_modules()
                      if isinstance(m, BaseTunerLayer)}
    assert sorted(set(counts.values())) == [16, 30, 40, 60]


@pytest.mark.parametrize("ours, theirs", list(PEFT_CONFIG.items()), ids=["fourierft", "oft", "frod"])
def test_config_fields_are_peft_s(ours, theirs):
    """The same field names and defaults as peft's config (peft's own PeftConfig fields aside), so that configs
    and saved adapter_config.json files mean the same thing on both sides."""
    base = {f.name for f in dataclasses.fields(peft.PeftConfig)} - {"inference_mode"}
    own = {f.name: f.default for f in dataclasses.fields(ours)}
    peft_fields = {f.name: f.default for f in dataclasses.fields(theirs) if f.name not in base}
    assert own.keys() == peft_fields.keys()
    assert {k: v for k, v in own.items() if not isinstance(v, dataclasses._MISSING_TYPE)} == \
        {k: v for k, v in peft_fields.items() if not isinstance(v, dataclasses._MISSING_TYPE)}


def test_no_match_names_the_patterns():
    with pytest.raises(NoTargetModulesError, match=r"match no module name: \['qproj', 'mlp.fc9'\]"):
        sk.inject(llama(), sk.FourierFTConfig(target_modules=["q_proj", "qproj", "mlp.fc9"],
                                              layers_to_transform=[7]))
    with pytest.raises(NoTargetModulesError, match="outside layers_to_transform=\\[7\\]"):
        sk.inject(llama(), sk.FourierFTConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(NoTargetModulesError, match="match no module name"):
        sk.inject(llama(), sk.OFTConfig(target_modules=r".*\.nothing"))
    with pytest.raises(NoTargetModulesError, match="is excluded"):
        sk.inject(llama(), sk.FourierFTConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default for model type None"):
        sk.inject(model, sk.FourierFTConfig())
    with pytest.warns(UserWarning, match="modules_to_save"):  # peft goes on silently; it used to raise
        sk.inject(model, sk.FourierFTConfig(n_frequency=4, target_modules=["0"], modules_to_save=["head"]))


def test_bad_targets_and_configs():
    with pytest.raises(TypeError, match="embed_tokens .*Embedding.* is not supported"):
        sk.inject(llama(), sk.FourierFTConfig(target_modules=["embed_tokens"]))
    with pytest.raises(TypeError, match="unsupported config LoraConfig"):
        sk.inject(llama(), peft.LoraConfig(target_modules=["q_proj"]))
    model = sk.inject(llama(), sk.FourierFTConfig(n_frequency=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        sk.inject(model, sk.FourierFTConfig(n_frequency=8, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="already a FourierFTLinear"):
        sk.inject(model, sk.OFTConfig(oft_block_size=8, target_modules=["q_proj"]), "other")
    with pytest.raises(ValueError, match="unknown adapter"):
        sk.set_adapter(model, "other")
    with pytest.raises(ValueError, match="call spectral_kernels.inject first"):
        sk.set_adapter(llama(), "default")
    sequential = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="nn.Sequential would run them as layers"):
        sk.inject(sequential, sk.FrodConfig(target_modules=["0"], progressbar=False))
    assert list(sequential._modules) == ["0"] and isinstance(sequential[0], nn.Linear)
    model = sk.inject(nn.Sequential(nn.Linear(8, 8)), sk.OFTConfig(oft_block_size=4, target_modules=["0"]))
    assert isinstance(model[0], sk.OFTLinear) and model(torch.randn(2, 8)).shape == (2, 8)


def layers(model):
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


def load_peft_weights(ours, theirs):
    """Copy peft's adapter tensors into ours: the state_dict keys are the same, past a PeftModel's prefixes."""
    state = {k.removeprefix("base_model.model.").removeprefix("base_model."): v for k, v in theirs.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "fourierft" in k or "oft_R" in k]


def test_adapters_like_peft():
    """Second adapter (inactive, frozen), switching, disabling, merging and unloading, as peft does them."""
    first = sk.FourierFTConfig(n_frequency=20, target_modules=["q_proj", "v_proj"], init_weights=False)
    second = sk.FourierFTConfig(n_frequency=12, scaling=50.0, target_modules=["v_proj", "up_proj"],
                                init_weights=False, random_loc_seed=3)
    base = llama()
    ids = tokens(base)
    base_logits = base(ids).logits
    theirs = peft_injected(copy.deepcopy(base), first)
    peft_injected(theirs, second, "other")
    peft.tuners.tuners_utils.set_adapter(theirs, "default")  # a bare model's injection activates the new adapter
    ours = sk.inject(sk.inject(copy.deepcopy(base), first), second, "other")
    load_peft_weights(ours, theirs)
    assert sk.trainable_parameters(ours)[0] == 3 * 2 * 20  # only the active adapter trains
    for name, param in ours.named_parameters():
        assert param.requires_grad == (name.endswith("fourierft_spectrum.default")), name
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)

    sk.set_adapter(ours, "other")
    peft.tuners.tuners_utils.set_adapter(theirs, "other")
    assert sk.trainable_parameters(ours)[0] == 3 * 2 * 12
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)
    sk.set_adapter(ours, ["default", "other"])
    for module in theirs.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(["default", "other"])
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)
    adapted_logits = ours(ids).logits.detach()

    with sk.disable_adapters(ours):
        assert_close(ours(ids).logits, base_logits, torch.float32)
    assert_close(ours(ids).logits, adapted_logits, torch.float32)

    merged = sk.merge_and_unload(copy.deepcopy(ours), safe_merge=True)
    assert not adapted(merged, AdapterLayer) and not hasattr(merged, "spectral_kernels_adapters")
    assert_close(merged(ids).logits, adapted_logits, torch.float32)
    unloaded = sk.unload(ours)
    assert type(unloaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(unloaded(ids).logits, base_logits)


@each_method(["q_proj", "v_proj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_set_adapter_like_peft(config, dtype):
    """set_adapter as peft's: it activates the adapter and unmerges merged layers first (with peft's warning;
    a merged layer went on running the merged adapter), and leaves the requires_grad of other parameters as it
    finds them (biases made trainable by the first adapter's ``bias``, parameters the user unfroze)."""
    first, second = dataclasses.replace(config, bias="all"), dataclasses.replace(config, init_weights=False)
    theirs = peft.get_peft_model(llama().to(dtype), peft_config(first))
    theirs.add_adapter("other", peft_config(second))
    ours = sk.inject(sk.inject(llama().to(dtype), first), second, "other")
    load_peft_weights(ours, theirs)
    for model in (ours, theirs):
        model.get_submodule("model.norm" if model is ours else "base_model.model.model.norm").weight.requires_grad_()
    ids = tokens(ours)

    def trainable(model):
        return sorted(n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad)

    sk.set_adapter(ours, "other")
    theirs.set_adapter("other")
    assert trainable(ours) == trainable(theirs) and "model.norm.weight" in trainable(ours)
    assert_close(ours(ids).logits, theirs(ids).logits, dtype if type(config) is not sk.FourierFTConfig
                 else torch.float32)  # peft builds FourierFT's delta weight in float32

    for layer in layers(ours):
        layer.merge()
    theirs.merge_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sk.set_adapter(ours, "default")
        theirs.set_adapter("default")
    messages = [str(w.message) for w in caught if "merged" in str(w.message)]
    assert len(messages) == 2 * len(layers(ours)) and len(set(messages)) == 1  # each layer, on either side
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)  # peft unmerges OFT in float32 too
    assert not any(layer.merged for layer in layers(ours))


def adapter_flags(layer):
    """requires_grad of a layer's adapter parameters, by name."""
    return {n: p.requires_grad for n, p in layer.named_parameters() if not n.startswith("base_layer.")}


@each_method(["q_proj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_bookkeeping_like_peft(config, dtype):
    """Our layers against peft's, method by method, where their bookkeeping differed: active_adapter is a list;
    merge refuses a str and warns when all is merged; enable_adapters(False) freezes the adapters and leaves
    merged adapters merged until the next call, enable_adapters(True) makes the active ones trainable again;
    deleting an active adapter keeps the others active and trainable, or activates the first remaining name in
    sorted order."""
    def models():
        theirs = peft.get_peft_model(llama().to(dtype), peft_config(config))
        ours = sk.inject(llama().to(dtype), config)
        for name in ["zed", "b", "y"]:  # added in this order: not sorted
            theirs.add_adapter(name, peft_config(config))
            sk.inject(ours, config, name)
        load_peft_weights(ours, theirs)
        return ours, theirs

    ours, theirs = models()
    pairs = list(zip(layers(ours), [m for m in theirs.modules() if isinstance(m, BaseTunerLayer)], strict=True))
    ids = tokens(ours)

    def caught_warnings(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        return [str(w.message) for w in caught]

    for our_layer, their_layer in pairs:
        assert our_layer.active_adapter == their_layer.active_adapter == ["default"]
        for layer in (our_layer, their_layer):
            with pytest.raises(TypeError, match="adapter_names should be a list of strings"):
                layer.merge(adapter_names="default")
            layer.merge()
            assert caught_warnings(layer.merge) == ["All adapters are already merged, nothing to do."]
            layer.enable_adapters(False)
            assert layer.merged and not any(adapter_flags(layer).values())
            layer.enable_adapters(True)
            assert layer.merged
        assert adapter_flags(our_layer) == adapter_flags(their_layer)
        assert_close(our_layer.base_layer.weight, their_layer.base_layer.weight, torch.float32)
        for layer in (our_layer, their_layer):
            layer.unmerge()
    # Deletions last, layer by layer: FRoD's layers share their category's projections, which go with the first.
    for our_layer, their_layer in pairs:
        for layer in (our_layer, their_layer):
            layer.set_adapter(["default", "y"], inference_mode=True)
            layer.delete_adapter("y")
            assert layer.active_adapter == ["default"]
        assert adapter_flags(our_layer) == adapter_flags(their_layer) and any(adapter_flags(our_layer).values())
        assert caught_warnings(lambda: our_layer.delete_adapter("default")) == \
            caught_warnings(lambda: their_layer.delete_adapter("default"))
        assert our_layer.active_adapter == their_layer.active_adapter == ["b"]
        assert adapter_flags(our_layer) == adapter_flags(their_layer)
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)  # peft unmerges OFT in float32
    ours, theirs = models()
    theirs.delete_adapter("default")
    sk.delete_adapter(ours, "default")
    assert adapters(ours).active == theirs.active_adapters == ["b"]


@each_method(["query", "value"])
def test_disable_adapters_like_peft(config):
    """sk.disable_adapters as peft's disable_adapter: the base model's output inside, the adapters' parameters and
    modules_to_save copies frozen there, and the active ones trainable after it (also when they were loaded
    frozen: peft's enable_adapters makes them so)."""
    config = dataclasses.replace(config, modules_to_save=["classifier"], inference_mode=True)
    theirs = peft.get_peft_model(bert(), peft_config(config))
    ours = sk.inject(bert(), config)
    load_peft_weights(ours, theirs)
    ids = tokens(ours)

    def trainable(model):
        return sorted(n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad)

    base_logits = bert()(ids).logits
    with sk.disable_adapters(ours), theirs.disable_adapter():
        assert trainable(ours) == trainable(theirs)
        assert_close(ours(ids).logits, base_logits, torch.float32)
        assert_close(theirs(ids).logits, base_logits, torch.float32)
    assert trainable(ours) == trainable(theirs) and "classifier.modules_to_save.default.weight" in trainable(ours)
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)


@each_method(["q_proj", "v_proj"])
def test_one_adapter_with_bias_like_peft(config):
    """As peft: only one adapter can have a bias (they would share the biases they train and save)."""
    with_bias = dataclasses.replace(config, bias="all")
    theirs = peft.get_peft_model(llama(), peft_config(with_bias))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        theirs.add_adapter("other", peft_config(with_bias))
    ours = sk.inject(llama(), with_bias)
    with pytest.raises(ValueError, match="only 1 adapter can have a bias"):
        sk.inject(ours, with_bias, "other")
    assert list(adapters(ours).configs) == ["default"]
    sk.inject(ours, config, "other")  # bias="none"
    assert list(adapters(ours).configs) == ["default", "other"]


@each_method(["query", "value"])
def test_unload_keeps_the_active_modules_to_save_copy(config):
    """As peft's unload and merge_and_unload: a modules_to_save module comes back as the active adapter's
    (trained) copy, not the original."""
    config = dataclasses.replace(config, modules_to_save=["classifier"])
    theirs = peft.get_peft_model(bert(), peft_config(config))
    ours = sk.inject(bert(), config)
    for model in (ours, theirs):
        with torch.no_grad():
            model.get_submodule("classifier" if model is ours else "base_model.model.classifier") \
                .modules_to_save["default"].weight.add_(1.0)
    for unload in ("unload", "merge_and_unload"):
        kept = getattr(sk, unload)(copy.deepcopy(ours)).classifier
        expected = getattr(copy.deepcopy(theirs), unload)().classifier
        assert kept is not None and torch.equal(kept.weight, expected.weight)
        assert not torch.equal(kept.weight, bert().classifier.weight)


@pytest.mark.parametrize("task_type, model_class, head", [
    ("SEQ_CLS", BertForSequenceClassification, "classifier"), ("TOKEN_CLS", BertForTokenClassification, "classifier"),
    ("QUESTION_ANS", BertForQuestionAnswering, "qa_outputs")])
@each_method(["query", "value"])
def test_task_type_heads_like_peft(config, task_type, model_class, head):
    """peft's config with a task_type: as get_peft_model (PeftModelForSequenceClassification, ...), the task's head
    is trained and saved whole (modules_to_save) instead of being left frozen, or adapted by "all-linear"."""
    targets = ["all-linear"] if task_type == "SEQ_CLS" else []  # peft adapts the other tasks' heads, then fails
    for target_modules in [config.target_modules, *targets]:
        theirs_config = dataclasses.replace(peft_config(config), task_type=task_type, target_modules=target_modules)
        theirs = peft.get_peft_model(bert(model_class), copy.deepcopy(theirs_config))
        ours = sk.inject(bert(model_class), theirs_config)
        assert adapted(ours, AdapterLayer) == [n.removeprefix("base_model.model.")
                                               for n in adapted(theirs, BaseTunerLayer)]
        assert adapted(ours, ModulesToSave) == [head]
        trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
        assert trainable == sorted(n.removeprefix("base_model.model.") for n, p in theirs.named_parameters()
                                   if p.requires_grad)


def test_trainable_counts_and_bias_like_peft(capsys):
    # inference_mode freezes the adapter's own parameters; peft still applies `bias` (biases train)
    # peft reads any "..._only" as the adapted layers' biases
    for bias, inference_mode in itertools.product(("none", "all", "oft_only", "lora_only"), (False, True)):
        config = sk.OFTConfig(oft_block_size=8, target_modules=["query", "value"], bias=bias,
                              modules_to_save=["classifier"], inference_mode=inference_mode)
        ours = sk.inject(bert(), config)
        theirs = peft.get_peft_model(bert(), peft_config(config))
        assert sk.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
        trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
        assert trainable == sorted(n.removeprefix("base_model.model.") for n, p in theirs.named_parameters()
                                   if p.requires_grad)
    sk.print_trainable_parameters(ours)
    trainable, total = sk.trainable_parameters(ours)
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")
    frozen = sk.inject(bert(), sk.OFTConfig(oft_block_size=8, inference_mode=True))
    assert sk.trainable_parameters(frozen)[0] == 0


def test_modules_to_save_follow_the_adapter():
    config = sk.FourierFTConfig(n_frequency=20, target_modules=["query"], modules_to_save=["classifier"],
                                init_weights=False)
    model = sk.inject(bert(), config)
    head = model.classifier
    assert isinstance(head, ModulesToSave) and not head.original_module.weight.requires_grad
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    sk.inject(model, dataclasses.replace(config, modules_to_save=["classifier"]), "other")
    assert head.module() is head.modules_to_save["default"]
    sk.set_adapter(model, "other")
    assert head.module() is head.modules_to_save["other"] and head.modules_to_save["other"].weight.requires_grad
    with sk.disable_adapters(model):
        assert head.module() is head.original_module
    sk.set_adapter(model, "default")
    assert torch.equal(sk.merge_and_unload(model).classifier.weight, head.modules_to_save["default"].weight)


@pytest.mark.parametrize("config", [
    sk.FourierFTConfig(n_frequency=20, target_modules=["query", "value"], init_weights=False,
                       modules_to_save=["classifier"], bias="fourier_only"),
    sk.OFTConfig(oft_block_size=8, target_modules="all-linear", init_weights=False, bias="all"),
    sk.FrodConfig(target_modules=["query", "key", "dense"], init_weights=False, progressbar=False,
                  modules_to_save=["classifier"]),
], ids=["fourierft", "oft", "frod"])
def test_peft_format_round_trip(tmp_path, config):
    """save_adapter writes what peft loads, load_adapter reads what peft saves; same logits either way."""
    model = sk.inject(bert(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    ids = tokens(model)
    expected = model(ids).logits
    sk.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(bert(), tmp_path / "ours")
    assert isinstance(theirs.peft_config["default"], PEFT_CONFIG[type(config)])
    assert_close(theirs(ids).logits, expected, torch.float32)

    theirs.save_pretrained(tmp_path / "peft")
    loaded = sk.load_adapter(bert(), tmp_path / "peft")
    # not trainable, as peft loads it; `bias` still makes biases trainable there (peft's inference_mode)
    assert sk.trainable_parameters(loaded)[0] == theirs.get_nb_trainable_parameters()[0]
    assert_close(loaded(ids).logits, expected, torch.float32)
    first = dataclasses.replace(config, bias="none")  # only one adapter can have a bias
    saved = sk.inject(bert(), first)
    sk.load_adapter(saved, tmp_path / "ours", "again", is_trainable=True)
    sk.set_adapter(saved, "again")
    theirs = peft.get_peft_model(bert(), peft_config(first))
    theirs.load_adapter(tmp_path / "ours", "again", is_trainable=True)
    theirs.set_adapter("again")
    assert sk.trainable_parameters(saved)[0] == theirs.get_nb_trainable_parameters()[0]
    assert_close(saved(ids).logits, expected, torch.float32)


@pytest.mark.parametrize("model, config", [(gpt2, sk.FourierFTConfig(n_frequency=16)),
                                           (llama, sk.FrodConfig(fan_in_fan_out=True, progressbar=False))],
                         ids=["conv1d", "linear"])
def test_saved_config_records_the_layout_as_peft(tmp_path, model, config):
    """peft sets fan_in_fan_out in the config it saves to the adapted modules' layout (Conv1D or not), with a
    warning where the config said otherwise."""
    def layout_warnings(caught):
        return {str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)}

    with warnings.catch_warnings(record=True) as ours_caught:
        warnings.simplefilter("always")
        sk.save_adapter(sk.inject(model(), config), tmp_path / "ours")
    with warnings.catch_warnings(record=True) as theirs_caught:
        warnings.simplefilter("always")
        peft.get_peft_model(model(), peft_config(config)).save_pretrained(tmp_path / "peft")
    ours, theirs = (json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "peft"))
    assert ours["fan_in_fan_out"] is theirs["fan_in_fan_out"] is (model is gpt2)
    assert len(layout_warnings(ours_caught)) == 1 and layout_warnings(ours_caught) == layout_warnings(theirs_caught)


def test_saved_config_loads_through_peft_s_auto_classes(tmp_path):
    """A config holding a set (peft's configs make exclude_modules one) is saved as peft saves it (json.dump
    failed half way through the file), with the model's class in auto_mapping, which peft's AutoPeftModel reads."""
    llama().save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.FourierFTConfig(n_frequency=16, target_modules=["q_proj", "v_proj"], init_weights=False,
                                  exclude_modules=["model.layers.0.self_attn.q_proj"])
    assert isinstance(config.exclude_modules, set)
    sk.save_adapter(sk.inject(model, config), tmp_path / "ours")
    ids = tokens(model)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert_close(loaded(ids).logits, model(ids).logits, torch.float32)
    assert not isinstance(loaded.get_submodule("base_model.model.model.layers.0.self_attn.q_proj"), BaseTunerLayer)


def test_loads_peft_s_bias_all_with_modules_to_save(tmp_path):
    """peft's bias="all" saves the biases inside a modules_to_save wrapper too, which its loading leaves unused:
    load_adapter refused such checkpoints (every SEQ_CLS adapter with bias="all")."""
    theirs = peft.get_peft_model(bert(), peft.FourierFTConfig(n_frequency=16, target_modules=["query", "value"],
                                                              bias="all", task_type="SEQ_CLS", init_weights=False))
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    theirs.save_pretrained(tmp_path)
    ids = tokens(theirs)
    assert_close(sk.load_adapter(bert(), tmp_path)(ids).logits, theirs.eval()(ids).logits, torch.float32)


def test_saves_tied_biases_as_peft(tmp_path):
    """bias="all" on BERT's masked-LM head, whose decoder bias is the prediction bias: peft saves both keys, and
    save_adapter failed (safetensors refuses tensors that share memory)."""
    from transformers import BertForMaskedLM

    config = peft.FourierFTConfig(n_frequency=16, target_modules=["query", "value"], bias="all", init_weights=False)
    ours = sk.inject(bert(BertForMaskedLM), config)
    assert ours.cls.predictions.bias is ours.cls.predictions.decoder.bias
    with torch.no_grad():
        ours.cls.predictions.bias.add_(1.0)
    sk.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(bert(BertForMaskedLM), tmp_path)
    ids = tokens(ours)
    assert_close(theirs.eval()(ids).logits, ours.eval()(ids).logits, torch.float32)


def seeded_pair(make, config):
    """(ours, peft's model) with adapter ``config`` on models from ``make``, each built from the same RNG state."""
    torch.manual_seed(0)
    ours = sk.inject(make(), config)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ours, peft.get_peft_model(make(), peft_config(config))


def peft_state(model):
    """A PeftModel's state dict under the keys of the same model adapted by ``inject``."""
    return {k.removeprefix("base_model.model.").removeprefix("base_model."): v for k, v in model.state_dict().items()}


def two_adapters(make, first, second):
    """(ours, peft's model, peft's state dict under our keys) for adapters "default" (``first``) and "other"
    (``second``) on models from ``make``, each built from the same global RNG state."""
    torch.manual_seed(0)
    ours = sk.inject(sk.inject(make(), first), second, "other")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft_config(first))
        theirs.add_adapter("other", peft_config(second))
    return ours, theirs, peft_state(theirs)


@pytest.mark.parametrize("first_targets, second_targets, second_rate, categories", [
    # no new category: the first adapter's projections are shared
    (["q_proj", "v_proj", "down_proj"], ["v_proj"], 0.05, ["mlp_down_proj", "self_attn_q_proj", "self_attn_v_proj"]),
    # a new category: the second adapter's own, with its sparse_rate
    (["v_proj"], ["k_proj", "v_proj"], 0.1, ["self_attn_k_proj", "self_attn_v_proj"]),
], ids=["shared", "own"])
def test_frod_projections_like_peft(first_targets, second_targets, second_rate, categories):
    """Per-category projections, patterns, U and lambda as peft's FrodModel builds them, for two adapters."""
    first = sk.FrodConfig(target_modules=first_targets, init_weights=False, sparse_rate=0.05, progressbar=False)
    second = sk.FrodConfig(target_modules=second_targets, init_weights=False, sparse_rate=second_rate,
                           progressbar=False)
    ours, theirs, expected = two_adapters(llama, first, second)
    state = ours.state_dict()
    assert state.keys() == expected.keys() and any(k.startswith("frod_V.") for k in state)
    for key, value in state.items():
        assert_close(value, expected[key], torch.float32)
    layer = ours.model.layers[1].self_attn.v_proj
    assert_close(layer.frod_U["other"], theirs.base_model.model.model.layers[1].self_attn.v_proj.frod_U["other"],
                 torch.float32)
    assert sorted(ours.frod_V) == categories
    assert layer.frod_V is ours.frod_V["self_attn_v_proj"]  # shared by the category's layers, owned by the model
    ids = tokens(ours)
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)
    assert not any(name.startswith("frod_") for name, _ in sk.unload(ours).named_children())


def test_frod_projections_of_a_condensed_target_list_like_peft():
    """peft's FRoD builds its projections before it condenses a long target_modules list: from every module the list
    names, while layers_to_transform picks the layers it adapts."""
    config = sk.FrodConfig(target_modules=LLAMA_LINEARS, layers_to_transform=[1], init_weights=False,
                           progressbar=False)
    ours, theirs = seeded_pair(llama, config)
    expected, state = peft_state(theirs), ours.state_dict()
    assert state.keys() == expected.keys() and len(adapted(ours, AdapterLayer)) == 7
    for key, value in state.items():
        assert_close(value, expected[key], torch.float32)
    ids = tokens(ours)
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)


def test_frod_category_of_layers_of_different_widths():
    """One projection per module category is stacked from its layers' weights: peft's stack fails on layers of
    different in_features, ours names the category."""
    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.proj = nn.Linear(width, 8)

    model = nn.Module()
    model.blocks = nn.ModuleList([Block(8), Block(12)])
    with pytest.raises(ValueError, match=r"category 'proj' .* in_features differ \(\[8, 12\]\)"):
        sk.inject(model, sk.FrodConfig(target_modules=["proj"], progressbar=False))


def test_frod_second_adapter_on_a_root_module():
    """A root-level target keeps its category's projections at frod_V.<name>: the next adapter's target_modules
    match that name too, and, as in peft, leave it alone."""
    config = sk.FrodConfig(target_modules=["classifier", "query"], init_weights=False, progressbar=False)
    ours, theirs, expected = two_adapters(bert, config, config)
    assert ours.state_dict().keys() == expected.keys() and "frod_V.classifier.other" in expected
    ids = tokens(ours)
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)


def test_load_adapter_rejects_mismatch(tmp_path):
    model = sk.inject(bert(), sk.FourierFTConfig(n_frequency=20, target_modules=["query"]))
    sk.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        sk.save_adapter(model, tmp_path, "nope")
    smaller = bert()
    smaller.bert.encoder.layer = smaller.bert.encoder.layer[:1]
    before = copy.deepcopy(smaller)
    for _ in range(2):  # the model is left as it was, so the same error comes again
        with pytest.raises(ValueError, match="tensors the model does not"):
            sk.load_adapter(smaller, tmp_path)
    assert str(smaller) == str(before) and smaller.state_dict().keys() == before.state_dict().keys()
    assert not hasattr(smaller, STATE_ATTRIBUTE)
    other = sk.inject(bert(), sk.FourierFTConfig(n_frequency=30, target_modules=["query"]))  # other shapes
    sk.save_adapter(other, tmp_path / "other")
    (tmp_path / "other" / "adapter_config.json").write_text((tmp_path / "adapter_config.json").read_text())
    fresh = bert()
    with pytest.raises(RuntimeError, match="size mismatch"):
        sk.load_adapter(fresh, tmp_path / "other")
    assert str(fresh) == str(bert()) and not hasattr(fresh, STATE_ATTRIBUTE)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_sets_eval_mode_like_peft(tmp_path, is_trainable):
    """As peft's from_pretrained / load_adapter: a model loaded for inference is put in eval mode (its dropout,
    FRoD's frod_dropout too, off); one loaded to train is left as it is."""
    config = sk.FrodConfig(target_modules=["q_proj"], init_weights=False, frod_dropout=0.3, progressbar=False)
    sk.save_adapter(sk.inject(llama(), config), tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama().train(), tmp_path, is_trainable=is_trainable)
    ours = sk.load_adapter(llama().train(), tmp_path, is_trainable=is_trainable)
    assert ours.training == theirs.training == is_trainable
    if not is_trainable:
        ids = tokens(ours)
        assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)


def test_load_adapter_skips_projections_saved_against_the_config(tmp_path):
    """A FRoD checkpoint that holds projections although its config has save_projection=False: peft warns, leaves
    them and builds the model's own from the base weights; so does load_adapter (it refused the checkpoint)."""
    config = sk.FrodConfig(target_modules=["q_proj", "v_proj"], init_weights=False, progressbar=False)
    sk.save_adapter(sk.inject(llama(), config), tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "save_projection": False}))
    with pytest.warns(UserWarning, match="Specified to not load FRoD projection tensors"):
        theirs = peft.PeftModel.from_pretrained(llama(), tmp_path)
    with pytest.warns(UserWarning, match="projections .* are not loaded"):
        ours = sk.load_adapter(llama(), tmp_path)
    ids = tokens(ours)
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)


@pytest.mark.parametrize("field,value", [("projection_prng_key", 1), ("save_projection", False),
                                         ("runtime_offload_base_weight", True)])
def test_frod_adapters_must_agree(field, value):
    """As peft's FrodModel: one projection seed, save_projection and offload flag per model."""
    model = sk.inject(llama(1), sk.FrodConfig(target_modules=["q_proj"], progressbar=False))
    with pytest.raises(ValueError, match=f"must share {field}"):
        sk.inject(model, sk.FrodConfig(target_modules=["q_proj"], progressbar=False, **{field: value}), "other")


@pytest.mark.parametrize("config", [
    sk.FourierFTConfig(n_frequency=20, target_modules=["query", "value"], init_weights=False),
    sk.OFTConfig(oft_block_size=8, target_modules=["query", "value"], init_weights=False),
    sk.FrodConfig(target_modules=["query", "value", "dense"], init_weights=False, progressbar=False),
], ids=["fourierft", "oft", "frod"])
def test_built_and_run_in_inference_mode(config):
    """A model adapted inside torch.inference_mode (inference tensors have no version counter, so nothing made
    from them is cached): the logits of the same weights in a model built normally, also after an in-place
    change of the adapter's parameters."""
    with torch.inference_mode():
        served = sk.inject(bert(), config).eval()
    model = sk.inject(bert(), config).eval()
    model.load_state_dict(served.state_dict())
    ids = tokens(model)
    for _ in range(2):
        with torch.inference_mode():
            got = served(ids).logits
            assert_close(served(ids).logits, got, torch.float32)
            with torch.no_grad():
                expected = model(ids).logits
            assert_close(got, expected, torch.float32)
            for (name, p), q in zip(served.named_parameters(), model.parameters()):
                if any(key in name for key in ("fourierft_", "oft_", "frod_")):
                    p.add_(0.1)
                    q.add_(0.1)


@pytest.mark.parametrize("config,factor", [
    (sk.FourierFTConfig(n_frequency=20, scaling=1500.0, target_modules=["query", "value"]), 1),
    (sk.OFTConfig(oft_block_size=8, target_modules=["query", "value"], init_weights=False), 10),
    (sk.FrodConfig(target_modules=["query", "value"], sparse_rate=0.1, init_weights=False, progressbar=False), 30),
], ids=["fourierft", "oft", "frod"])
def test_half_precision_models_get_float32_adapters_like_peft(tmp_path, config, factor):
    """peft's get_peft_model and from_pretrained upcast a bf16/fp16 model's adapter parameters to float32
    (autocast_adapter_dtype); so do inject and load_adapter, and the model's hidden states are as close to the
    float64 model's as peft's are (with adapters that move them by far more than that)."""
    def half():
        return bert().to(torch.bfloat16)

    def trainable(model):
        return {p.dtype for p in model.parameters() if p.requires_grad}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(half(), peft_config(config))
    ours = sk.inject(half(), config)
    assert trainable(ours) == trainable(theirs) == {torch.float32}
    assert trainable(sk.inject(half(), config, autocast_adapter_dtype=False)) == {torch.bfloat16}
    with torch.no_grad():  # adapters that move the hidden states by far more than bfloat16 rounds them
        for p in theirs.parameters():
            p.mul_(factor if p.requires_grad else 1)
    ours.load_state_dict(theirs.base_model.model.state_dict(), strict=False)  # FRoD's projections: same values
    ids = tokens(ours)

    def hidden(model):  # the last hidden states: the logits of this small random model are ~0.01
        return model(ids, output_hidden_states=True).hidden_states[-1]

    exact, got = hidden(copy.deepcopy(theirs).double()), hidden(ours)
    assert_low_precision_close(got, hidden(theirs), exact)
    moved = (exact - hidden(bert().double())).abs().max().item()
    assert moved > 10 * (got.double() - exact).abs().max().item()
    sk.save_adapter(ours, tmp_path)
    loaded = sk.load_adapter(half(), tmp_path, is_trainable=True)
    assert trainable(loaded) == {torch.float32}


def test_fourierft_draws_peft_s_random_numbers():
    """With init_weights=True peft still draws the spectrum before zeroing it: so do we, and the global RNG
    stream after the injection is the same (dropout masks and later initialisations match peft's run)."""
    config = sk.FourierFTConfig(n_frequency=20, target_modules=["query", "value"], init_weights=True)
    model, reference = bert(), bert()
    torch.manual_seed(5)
    sk.inject(model, config)
    ours = torch.rand(3)
    torch.manual_seed(5)
    peft_injected(reference, config)
    assert torch.equal(ours, torch.rand(3))
    assert all(not p.any() for n, p in model.named_parameters() if "fourierft_spectrum" in n)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(16, 12), nn.Linear(12, 16)

    def forward(self, x):
        return self.v_proj(self.q_proj(x))


def test_fourierft_on_the_meta_device():
    """Built on 'meta' (low-memory loading), then materialised and loaded: the spectrum positions were kept on
    the CPU, as in peft, so the model computes what the same adapter built on the CPU does."""
    config = sk.FourierFTConfig(n_frequency=20, target_modules=["q_proj", "v_proj"], init_weights=False)
    source = sk.inject(TwoLayers(), config)
    with torch.device("meta"):
        model = sk.inject(TwoLayers(), config)
    model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    x = torch.randn(3, 16)
    assert_close(model(x), source(x), torch.float32)


@pytest.mark.parametrize("config", [
    sk.FourierFTConfig(n_frequency=20, target_modules=["q_proj", "v_proj"], init_weights=False),
    sk.OFTConfig(oft_block_size=4, target_modules=["q_proj", "v_proj"], init_weights=False),
    sk.FrodConfig(target_modules=["q_proj", "v_proj"], init_weights=False, progressbar=False),
], ids=["fourierft", "oft", "frod"])
def test_adapters_made_empty_on_a_real_model(config):
    """Adapters added under accelerate's init_empty_weights (on 'meta', as peft's low_cpu_mem_usage makes them) to a
    model with real weights, then filled with load_state_dict(assign=True): the model computes what the source does."""
    from accelerate import init_empty_weights
    source = sk.inject(TwoLayers(), config)
    model = TwoLayers()
    model.load_state_dict({k.replace(".base_layer", ""): v for k, v in source.state_dict().items()}, strict=False)
    with init_empty_weights():
        model = sk.inject(model, config)
    assert any(p.is_meta for p in model.parameters())
    model.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(3, 16)
    assert_close(model(x), source(x), torch.float32)


@pytest.mark.parametrize("make", [
    lambda **kw: sk.FourierFTLinear(nn.Linear(16, 12), config=sk.FourierFTConfig(n_frequency=20, **kw)),
    lambda **kw: sk.OFTLinear(nn.Linear(16, 12), config=sk.OFTConfig(oft_block_size=4, **kw)),
    lambda **kw: sk.FrodLinear(nn.Linear(16, 12), config=sk.FrodConfig(progressbar=False, **kw)),
], ids=["fourierft", "oft", "frod"])
def test_layers_take_inference_mode_like_peft(make):
    """As peft's layers: a config's inference_mode freezes the new adapter, and set_adapter(..., inference_mode)
    activates adapters frozen."""
    def trainable(layer):  # the adapter's (the base layer is left as it is, as by peft's layers)
        return {n for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base_layer.")}

    assert not trainable(make(inference_mode=True))
    layer = make()
    own = trainable(layer)
    assert own
    layer.set_adapter("default", inference_mode=True)
    assert not trainable(layer)
    layer.set_adapter("default")
    assert trainable(layer) == own


def test_frod_later_adapter_of_a_half_precision_model_like_peft():
    """On the CPU peft makes a later FRoD adapter in the dtype of the layer's existing ones (float32, once
    autocast_adapter_dtype upcast a bf16 model's first), so its random initial values are drawn there, not in bf16."""
    config = sk.FrodConfig(target_modules=["query", "value"], init_weights=False, progressbar=False)
    models = bert().to(torch.bfloat16), bert().to(torch.bfloat16)
    torch.manual_seed(1)
    ours = sk.inject(sk.inject(models[0], config), config, "other")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(models[1], peft_config(config))
        theirs.add_adapter("other", peft_config(config))
    expected = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if "frod_lambda" in n}
    own = {n: p for n, p in ours.named_parameters() if "frod_lambda" in n}
    assert own.keys() == expected.keys() and any(".other" in n for n in own)
    for name, p in own.items():
        assert p.dtype == torch.float32 and torch.equal(p, expected[name]), name


def test_fourierft_computes_shapes_on_meta_tensors():
    """A FourierFT layer on 'meta' computes shapes, forward and backward, as peft's does (its index check has no
    values to read there)."""
    with torch.device("meta"):
        layer = sk.FourierFTLinear(nn.Linear(16, 12), config=sk.FourierFTConfig(n_frequency=20))
        x = torch.randn(2, 3, 16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.is_meta and y.shape == (2, 3, 12) and x.grad.shape == x.shape
    assert layer.fourierft_spectrum["default"].grad.shape == (20,)


@each_method(["query", "value"])
def test_inject_takes_peft_s_config(config):
    """A peft script's config goes to inject unchanged: the same model as with ours of the same values."""
    torch.manual_seed(3)
    ours = sk.inject(bert(), config)
    torch.manual_seed(3)
    theirs = sk.inject(bert(), peft_config(config))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key
    assert type(adapters(theirs).configs["default"]) is type(config)
    with pytest.raises(TypeError, match="or peft's config of the same method"):
        sk.inject(bert(), peft.LoraConfig(target_modules=["query"]))


def test_saving_oft_on_conv1d_warns_that_peft_cannot_load_it(tmp_path):
    """peft's OFT does not take transformers Conv1D layers, which inject adapts: saving says peft cannot load the
    adapter, and load_adapter still can."""
    model = sk.inject(gpt2(), sk.OFTConfig(oft_block_size=8, target_modules=["c_attn"], init_weights=False))
    with pytest.warns(UserWarning, match="peft cannot load"):
        sk.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="not supported"):
            peft.PeftModel.from_pretrained(gpt2(), tmp_path)
    ids = tokens(model)
    assert_close(sk.load_adapter(gpt2(), tmp_path)(ids).logits, model(ids).logits, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.save_adapter(sk.inject(gpt2(), sk.FourierFTConfig(n_frequency=16, fan_in_fan_out=True)),
                        tmp_path / "fourierft")


def peft_state(theirs):
    """peft's state dict under our keys."""
    return {k.removeprefix("base_model.model.").removeprefix("base_model."): v for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("first, second", [
    (sk.FourierFTConfig(n_frequency=20, target_modules=["q_proj", "v_proj"], init_weights=False),
     sk.FourierFTConfig(n_frequency=12, target_modules=["v_proj", "up_proj"], init_weights=False, random_loc_seed=3,
                        modules_to_save=["lm_head"])),
    (sk.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"], init_weights=False),
     sk.OFTConfig(oft_block_size=4, target_modules=["v_proj", "up_proj"], init_weights=False)),
    (sk.FrodConfig(target_modules=["v_proj"], init_weights=False, sparse_rate=0.05, progressbar=False),
     sk.FrodConfig(target_modules=["k_proj", "v_proj"], init_weights=False, sparse_rate=0.1, progressbar=False)),
], ids=["fourierft", "oft", "frod"])
@pytest.mark.parametrize("order", [("default", "other"), ("other", "default")], ids=["active-first", "inactive-first"])
def test_delete_adapter_like_peft(first, second, order):
    """delete_adapter removes what peft's removes (the layers' tensors, modules_to_save copies, FRoD's projections)
    and activates what peft activates; the model then computes what peft's does, and the base model at the end."""
    ours, theirs, expected = two_adapters(llama, first, second)
    assert ours.state_dict().keys() == expected.keys()
    ids = tokens(ours)
    for step, name in enumerate(order):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.delete_adapter(name)
        remaining = list(theirs.peft_config)
        if name == "default" and remaining:
            with pytest.warns(UserWarning, match=f"Setting active adapter to {remaining[0]}"):
                sk.delete_adapter(ours, name)
        else:
            sk.delete_adapter(ours, name)
        state = ours.state_dict()
        assert state.keys() == peft_state(theirs).keys()
        for key, value in peft_state(theirs).items():
            assert torch.equal(state[key], value), key
        assert adapters(ours).active == remaining
        assert list(adapters(ours).configs) == remaining
        if remaining:
            theirs.set_adapter(remaining[0])  # the PeftModel keeps the deleted name active until told
            assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)
            assert sk.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    assert_close(ours(ids).logits, theirs.base_model.model(ids).logits, torch.float32)
    assert not any(p.requires_grad for p in ours.parameters())
    sk.inject(ours, first, "again")  # the emptied model takes a new adapter
    assert adapters(ours).active == ["again"] and sk.trainable_parameters(ours)[0] > 0


@pytest.mark.parametrize("cls, config", [
    (sk.FourierFTLinear, sk.FourierFTConfig(n_frequency=20, init_weights=False)),
    (sk.OFTLinear, sk.OFTConfig(oft_block_size=4, init_weights=False)),
    (sk.FrodLinear, sk.FrodConfig(init_weights=False, progressbar=False)),
], ids=["fourierft", "oft", "frod"])
def test_layer_delete_adapter(cls, config):
    """A layer's delete_adapter as peft's: the adapter's entries go from every per-adapter table, the other active
    adapters stay active, the first remaining one takes over (with peft's warning) from a sole active one; it
    refuses a merged adapter and an unknown name. Without adapters the layer computes its base layer."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = cls(copy.deepcopy(base), config=config)
    layer.update_layer("b", config)
    x = torch.randn(3, 16)
    layer.set_adapter("b")
    expected = layer(x).detach()
    layer.set_adapter(["default", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.delete_adapter("default")
    assert layer.active_adapters == ["b"]
    assert not [t for t in layer.adapter_layer_names + layer.other_param_names if "default" in getattr(layer, t)]
    assert_close(layer(x), expected, torch.float32)
    layer.update_layer("c", config)
    with pytest.warns(UserWarning, match="Setting active adapter to c"):
        layer.delete_adapter("b")
    assert layer.active_adapters == ["c"]
    layer.merge()
    with pytest.raises(ValueError, match="while it is merged"):
        layer.delete_adapter("c")
    layer.unmerge()
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        layer.delete_adapter("b")
    layer.delete_adapter("c")
    assert layer.active_adapters == [] and all(n.startswith("base_layer.") for n, _ in layer.named_parameters())
    assert_close(layer(x), base(x), torch.float32)


def test_delete_adapter_refuses_merged_and_unknown_adapters():
    config = sk.FourierFTConfig(n_frequency=20, target_modules=["query"], init_weights=False)
    model = sk.inject(sk.inject(bert(), config), config, "other")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        sk.delete_adapter(model, "nope")
    model.bert.encoder.layer[1].attention.self.query.merge()
    with pytest.raises(ValueError, match="while it is merged"):
        sk.delete_adapter(model, "default")
    assert list(adapters(model).configs) == ["default", "other"]


def test_failed_load_adapter_leaves_the_adapters_as_they_were(tmp_path):
    """A load that does not fit a model with adapters raises and leaves its adapters, layers and trainable
    parameters as they were, so that the same load fails the same way again."""
    saved = sk.FourierFTConfig(n_frequency=20, target_modules=["query", "value"], modules_to_save=["classifier"])
    sk.save_adapter(sk.inject(bert(), saved), tmp_path)
    model = sk.inject(bert(), sk.FourierFTConfig(n_frequency=10, target_modules=["query"], init_weights=False))
    model.bert.encoder.layer = model.bert.encoder.layer[:1]  # the saved adapter has tensors for two layers
    before = str(model), copy.deepcopy(model.state_dict()), [n for n, p in model.named_parameters() if p.requires_grad]
    for _ in range(2):
        with pytest.raises(ValueError, match="tensors the model does not"):
            sk.load_adapter(model, tmp_path, "loaded")
    assert str(model) == before[0] and model.state_dict().keys() == before[1].keys()
    assert all(torch.equal(value, before[1][key]) for key, value in model.state_dict().items())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == before[2]
    assert list(adapters(model).configs) == adapters(model).active == ["default"]


def test_failed_inject_leaves_the_model_as_it_was():
    """An inject that fails part way leaves nothing of the adapter behind, in a fresh model or one with adapters:
    all-linear reaches the classifier, too small for n_frequency, after the encoder's layers were adapted;
    modules_to_save naming an adapter layer fail after all layers were, FRoD's projections made."""
    model = bert()
    fresh = str(model)
    with pytest.raises(ValueError, match="n_frequency"):
        sk.inject(model, sk.FourierFTConfig(target_modules="all-linear"))
    assert str(model) == fresh and not hasattr(model, STATE_ATTRIBUTE)
    assert all(p.requires_grad for p in model.parameters())
    sk.inject(model, sk.FourierFTConfig(n_frequency=20, target_modules=["query"]))
    before = str(model), copy.deepcopy(model.state_dict()), [n for n, p in model.named_parameters() if p.requires_grad]
    for config, error, match in [
        (sk.FourierFTConfig(target_modules="all-linear"), ValueError, "n_frequency"),
        (sk.FourierFTConfig(n_frequency=20, target_modules=["value"], modules_to_save=["query"]), TypeError,
         "modules_to_save"),
        (sk.FrodConfig(target_modules=["value"], modules_to_save=["query"], progressbar=False), TypeError,
         "modules_to_save"),
    ]:
        with pytest.raises(error, match=match):
            sk.inject(model, config, "other")
        assert str(model) == before[0] and model.state_dict().keys() == before[1].keys()
        assert all(torch.equal(value, before[1][key]) for key, value in model.state_dict().items())
        assert [n for n, p in model.named_parameters() if p.requires_grad] == before[2]
        assert list(adapters(model).configs) == adapters(model).active == ["default"]
    sk.inject(model, sk.FourierFTConfig(n_frequency=20, target_modules=["value"]), "other")
    assert list(adapters(model).configs) == ["default", "other"]


@each_method(["q", "wo"])
def test_layers_expose_the_base_layer_as_peft_s(config):
    """T5's feed-forward casts to ``wo.weight.dtype`` in its forward: the layers expose the base layer's weight and
    bias, and get_base_layer, as peft's do, and compute what peft's do there."""
    ours, theirs = seeded_pair(t5, config)
    layer = ours.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(layer, AdapterLayer) and layer.get_base_layer() is layer.base_layer
    assert layer.weight is layer.base_layer.weight and layer.bias is None
    ids = tokens(ours)
    assert_close(ours(input_ids=ids, decoder_input_ids=ids).logits,
                 theirs(input_ids=ids, decoder_input_ids=ids).logits, torch.float32)


@each_method("all-linear")
def test_falcon_adds_into_the_layer_outputs_in_place(config):
    """Falcon's decoder layer does ``mlp_output += attention_output``: training through it works (the fused ops'
    outputs are no views made inside them) and gives peft's logits and gradients."""
    def make():
        torch.manual_seed(0)
        return FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0))

    ours = sk.inject(make(), config)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft_config(config))
    ids = tokens(ours)
    logits = ours(ids).logits, theirs(ids).logits
    assert_close(*logits, torch.float32)
    for out in logits:
        out.square().sum().backward()
    expected = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    own = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert own.keys() == expected.keys() and own
    for name, grad in own.items():
        assert_close(grad, expected[name], torch.float32)


def test_old_oft_checkpoints_as_peft(tmp_path):
    """peft's checks of saved OFT configs: one without oft_block_size (before peft 0.14, another OFT) raises,
    one with use_cayley_neumann saved before 0.18 (another series) warns; load_adapter loaded both silently."""
    model = sk.inject(llama(1), sk.OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    sk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    path.write_text(json.dumps({**fields, "use_cayley_neumann": True, "peft_version": "0.17.1"}))
    with pytest.warns(UserWarning, match="before 0.18.0"):
        sk.load_adapter(llama(1), tmp_path)
    del fields["oft_block_size"]
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="before 0.14.0"):
        sk.load_adapter(llama(1), tmp_path)


class _SharedQ(nn.Module):
    """Two blocks sharing one Linear (as ALBERT shares layers), and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        q = nn.Linear(8, 8)
        self.layers = nn.ModuleList([nn.ModuleDict({"q_proj": q, "v_proj": nn.Linear(8, 8)}) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer["v_proj"](layer["q_proj"](x))
        return self.head(x)


def test_modules_to_save_like_peft():
    """modules_to_save as peft's: a module under two names is wrapped under each (it was wrapped under the first
    only, the second ran the frozen original); adapter layers and containers are refused (they were wrapped, or
    failed in the forward); attributes the wrapper lacks are the running module's (model code reads
    ``lm_head.weight.dtype``: an AttributeError)."""
    config = sk.FourierFTConfig(n_frequency=8, target_modules=["v_proj"], modules_to_save=["q_proj"],
                                init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_SharedQ(), peft_config(config)).base_model.model
    ours = sk.inject(_SharedQ(), config)
    assert adapted(ours, ModulesToSave) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 8)
    assert_close(ours(x), theirs(x), torch.float32)
    assert ours.layers[1]["q_proj"].weight is ours.layers[1]["q_proj"].modules_to_save["default"].weight
    for target, modules_to_save, match in (("q_proj", ["_proj"], "FourierFTLinear"), ("head", ["layers"], "List")):
        with pytest.raises(TypeError, match=f"modules_to_save cannot be applied to modules of type .*{match}"):
            sk.inject(_SharedQ(), dataclasses.replace(config, modules_to_save=modules_to_save, target_modules=[target]))


def test_all_linear_keeps_the_output_embedding_of_transformers_models_only(monkeypatch):
    """peft's "all-linear" leaves out the output embedding of a transformers PreTrainedModel only: a plain module
    with get_output_embeddings has its head adapted too (ours left it out); transformers is not needed for it."""
    class WithHead(_SharedQ):
        def get_output_embeddings(self):
            return self.head

    config = sk.OFTConfig(oft_block_size=4, target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(WithHead(), peft_config(config)).base_model.model
    assert adapted(sk.inject(WithHead(), config), AdapterLayer) == adapted(theirs, BaseTunerLayer)
    assert "head" in adapted(theirs, BaseTunerLayer)
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    assert adapted(sk.inject(WithHead(), config), AdapterLayer) == adapted(theirs, BaseTunerLayer)


def test_modules_to_save_keeps_private_attributes():
    """The wrapper reads public attributes from the module it runs, not private ones: copy.deepcopy found a
    parametrized module's __deepcopy__ there and copied that module in the wrapper's place."""
    model = _SharedQ()
    torch.nn.utils.parametrize.register_parametrization(model.head, "weight", nn.Identity())
    model = sk.inject(model, sk.FourierFTConfig(n_frequency=8, target_modules=["v_proj"], modules_to_save=["head"]))
    assert model.head.in_features == 8
    assert isinstance(copy.deepcopy(model).head, ModulesToSave)
