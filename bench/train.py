"""Training step: a small LLaMA-style model with q/k/v/o adapted, per method, end to end.

Every implementation gets its own LlamaForCausalLM built from the same LlamaConfig and
seed (random weights; on CPU 2 layers of width 512 and a batch of 128 tokens, on CUDA 8
layers of width 2048 and 4x1024 tokens) with q_proj, k_proj, v_proj and o_proj adapted:
ours (spectral_kernels.inject), peft's get_peft_model with the same adapter config, and
peft's LoRA r=32, the yardstick. A step is a forward with labels (causal-LM loss) on
one fixed batch, backward, AdamW step and zero_grad. After one untimed step per model
(it allocates the optimizer state) and the warm-up, the steps of all models are
interleaved like the layer cases. Reported per method: ms per step (median, min, max)
and its ratio to LoRA's; on CUDA also the memory a model holds between steps (weights,
adapter buffers, optimizer state) and its peak during a step. Both run with peft's
defaults, which keep adapter weights in float32 in a bfloat16 model.
"""
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import spectral_kernels
from spectral_kernels.layers.base import AdapterLayer

from . import timing
from .methods import configs, lora_config, ours, peft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Tiny on CPU, so that a quick run stays short; on CUDA a ~0.5B-parameter model with grouped-query attention.
MODEL_SIZES = {
    "cpu": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 2, "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": 2048},
    "cuda": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 16,
             "num_key_value_heads": 4, "vocab_size": 32000},
}
BATCH = {"cpu": (1, 128), "cuda": (4, 1024)}  # (sequences, tokens per sequence)


def llama(args):
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL_SIZES[args.device.type], max_position_embeddings=BATCH[args.device.type][1])
    with args.device:  # initialised in place: faster than on the CPU for the larger model
        return LlamaForCausalLM(config).to(getattr(torch, args.dtype))


def peft_model(model, config):
    """peft's get_peft_model, then moved to the model's device as training scripts do: peft builds some
    buffers (FRoD's projections) on the CPU."""
    with warnings.catch_warnings():  # transformers' deprecation notice for an attribute peft reads
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return peft.get_peft_model(model, config).to(model.device)


def injected(args, config, backend):
    """spectral_kernels.inject's model, its layers on ``backend`` (None: the automatic choice)."""
    model = spectral_kernels.inject(llama(args), config)
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.backend = backend
    return model


def models(args):
    """{name: builder}: ``<method>/ours`` (or ``<method>/ours-<backend>`` per --backends) and
    ``<method>/peft`` per method, then ``lora``."""
    builders = {}
    for method in args.methods:
        config, peft_config = configs(method, args, target_modules=TARGETS)
        for name, backend in ours(args).items():
            builders[f"{method}/{name}"] = lambda config=config, backend=backend: injected(args, config, backend)
        builders[f"{method}/peft"] = lambda config=peft_config: peft_model(llama(args), config)
    builders["lora"] = lambda: peft_model(llama(args), lora_config(target_modules=TARGETS))
    return builders


def training_step(model, args):
    sequences, length = BATCH[args.device.type]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (sequences, length), generator=generator).to(args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_training(args, budget_s, max_reps):
    """The "train" entry of the results: the model and, per method, the stats of ours, peft and lora."""
    cuda = args.device.type == "cuda"

    def allocated_mib():
        return torch.cuda.memory_allocated(args.device) / 2**20 if cuda else None

    steps, resident = {}, {}
    for name, build in models(args).items():
        print(f"train: building {name}", flush=True)
        before = allocated_mib()
        steps[name] = training_step(build(), args)
        steps[name]()
        resident[name] = allocated_mib() - before if cuda else None
    stats, elapsed, other_load = timing.measure({name: (step, lambda: None) for name, step in steps.items()},
                                                budget_s, max_reps, cuda, "lora")
    for name, entry in stats.items():
        step_peak = timing.peak_mem_mib(steps[name], lambda: None, args.device) if cuda else None
        entry["resident_mib"] = resident[name]
        entry["peak_mem_mib"] = resident[name] + step_peak if cuda else None
        print(f"train {name}: {entry['median_ms']:.1f} ms per step, {entry['ratio']:.2f}x lora", flush=True)
    sequences, length = BATCH[args.device.type]
    cases = [{"method": method, "impls": {impl: stats[f"{method}/{impl}"] for impl in (*ours(args), "peft")}
              | {"lora": stats["lora"]}} for method in args.methods]
    return {"model": {"type": "llama", **MODEL_SIZES[args.device.type], "sequences": sequences,
                      "tokens_per_sequence": length, "targets": TARGETS},
            "seconds": round(elapsed, 1), "other_load": round(other_load, 2), "cases": cases}
