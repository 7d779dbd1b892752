"""Sparse SAM in the Hugging Face Trainer: SAMTrainer(..., sam={...}) instead of Trainer(...).

A tiny BERT built from a config (random weights, no download) learns whether a sequence starts with a low token.

    python examples/integrations/hf_trainer_ssam.py --opt ssamf --epochs 4
"""

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from ssam.integrations.transformers import SAMTrainer

VOCAB, LENGTH = 32, 8


def synthetic(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    labels = (ids[:, 0] < VOCAB // 2).long()
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--opt", default="ssamf", help="sam, ssamf, ssamd or an --opt form such as ssamd-sgd")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--output_dir", default=None)
    args = ap.parse_args()

    settings = {"sam": {}, "ssamf": {"sparsity": 0.5, "num_samples": 32}, "ssamd": {"sparsity": 0.5, "seed": 0}}
    sam = {"opt": args.opt, "rho": 0.05, **settings[args.opt.split("-")[0]]}
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            weight_decay=0.01,
            lr_scheduler_type="linear",
            logging_steps=2,
            save_strategy="epoch" if args.output_dir else "no",
            report_to="none",
            use_cpu=True,
            bf16=args.bf16,
            seed=0,
            disable_tqdm=True,
        )
        trainer = SAMTrainer(tiny_bert(), training_args, train_dataset=synthetic(), sam=sam)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    density = [h["mask_density"] for h in trainer.state.log_history if "mask_density" in h]
    print(f"loss first {losses[0]:.4f}")
    print(f"loss last {losses[-1]:.4f}")
    if density:
        print(f"mask_density {density[-1]:.4f}")


if __name__ == "__main__":
    main()
