"""Sparse SAM in PyTorch Lightning with automatic optimization: return the optimizer from configure_optimizers and
add SAMCallback. Runs on the CPU in seconds on synthetic data.

    python examples/integrations/lightning_ssam.py --opt ssamf-sgd --epochs 3
    python examples/integrations/lightning_ssam.py --devices 2      # DDP, 2 CPU processes (gloo)
"""

import argparse

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ssam
from ssam.integrations.lightning import SAMCallback


class Classifier(L.LightningModule):
    def __init__(self, opt: str, lr: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
        self.opt, self.lr = opt, lr
        self.epoch_losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self):
        self.epoch_losses.append(float(self.trainer.callback_metrics["train_loss"]))

    def configure_optimizers(self):
        # Any --opt form of `ssam train`; SSAM settings and the base optimizer's go in the same call.
        sparse = {"sam": {}, "ssamf": dict(sparsity=0.5, num_samples=64), "ssamd": dict(sparsity=0.5, seed=0)}
        opt = ssam.create_optimizer(
            self,
            self.opt,
            lr=self.lr,
            momentum=0.9,
            weight_decay=5e-4,
            no_decay_bias_norm=True,
            rho=0.05,
            **sparse[self.opt.split("-")[0]],
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}


def synthetic(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :4] @ torch.randn(4, 4, generator=g)).argmax(1)
    return TensorDataset(x, y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--opt", default="ssamf-sgd")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--save", default=None, help="write the final weights and mask here (rank 0)")
    args = ap.parse_args()

    L.seed_everything(0, verbose=False)
    model = Classifier(args.opt, args.lr)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        callbacks=[SAMCallback(seed=0)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(synthetic(), batch_size=args.batch_size, shuffle=True))
    if trainer.is_global_zero:
        print(f"loss after epoch 1 {model.epoch_losses[0]:.4f}")
        print(f"loss after epoch {args.epochs} {model.epoch_losses[-1]:.4f}")
        opt = trainer.optimizers[0]
        if args.save:
            mask = opt.flat_mask() if hasattr(opt, "flat_mask") else None
            torch.save({"model": model.state_dict(), "mask": mask}, args.save)


if __name__ == "__main__":
    main()
