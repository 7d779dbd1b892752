"""The training loop: one readable function per stage, every knob from the configuration.

A SAM-family step, as in the paper:
    first forward + backward at w (grad-accumulated over micro-batches)
    mask refresh when scheduled (SSAM-F before the epoch's first step, SSAM-D from that step's gradient)
    perturb to w + e, second forward + backward there, restore w, base optimizer step
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import random
import shutil
import signal
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from ..data import GPULoader, build_datasets
from ..errors import UsageError
from ..models import build_model
from ..optim import SAM, SSAMD, SSAMF, TwoPassScaler, frozen_bn_stats
from .builders import EpochLR, build_optimizer, eval_loader, train_loader
from ..checkpoint import VERSION, load_checkpoint
from ..errors import Diverged, Interrupted
from ..io import save_torch as save_atomic, write_atomic
from .config import parse_opt, to_plain
from .step import train_step


# ------------------------------------------------------------------------------------------ setup
def init_distributed(cfg: Namespace) -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():
        pass
    elif cfg.dist_url == "env://" and "MASTER_ADDR" in os.environ:
        # Keys of a previous torchrun attempt stay in the agent's store; a fresh prefix per attempt keeps a
        # restarted job (--max-restarts) from dialling the dead ranks' addresses.
        rank, attempt = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=(not agent and rank == 0), timeout=datetime.timedelta(minutes=10))
        dist.init_process_group(backend, store=dist.PrefixStore(f"ssam/attempt{attempt}", store), rank=rank,
                                world_size=world)
    else:
        dist.init_process_group(backend, init_method=cfg.dist_url)
    return dist.get_rank(), dist.get_world_size(), local_rank


def elastic_restart() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def pick_device(cfg: Namespace, local_rank: int) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as tensors and plain values, so it loads with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                    "gauss": float(gauss)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"].cpu())
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# ------------------------------------------------------------------------------------------ run folder
class RunDir:
    """The run folder; only rank 0 writes, and nothing is written before the configuration is known good."""

    def __init__(self, cfg: Namespace, rank: int) -> None:
        self.path = Path(cfg.output_dir) / cfg.output_name
        self.rank = rank
        self.main = rank == 0

    def holds_run(self) -> bool:
        return any((self.path / f).exists() for f in ("last.pt", "summary.json", "metrics.jsonl"))

    def finished(self) -> bool:
        try:
            return bool(json.loads((self.path / "summary.json").read_text()).get("finished"))
        except (OSError, ValueError):
            return False

    def prepare(self, cfg: Namespace) -> None:
        if cfg.eval_only:
            return
        if self.holds_run() and not (cfg.resume or cfg.resume_path) and not cfg.overwrite:
            kind = "a finished run" if self.finished() else "a run"
            raise UsageError(f"output folder {self.path} already holds {kind}; pass --resume to continue it or "
                             "--overwrite to replace it")
        if cfg.overwrite and self.main and self.path.exists() and not (cfg.resume or cfg.resume_path):
            shutil.rmtree(self.path)

    def write_text(self, name: str, text: str) -> None:
        if self.main:
            write_atomic(self.path / name, text.encode())

    def append(self, name: str, line: str) -> None:
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.path / name, "a") as f:
                f.write(line.rstrip("\n") + "\n")

    def log(self, line: str, quiet: bool = False) -> None:
        if self.main:
            if not quiet:
                print(line, flush=True)
            self.append("log.txt", line)

    def save(self, name: str, obj: dict) -> None:
        if self.main:
            save_atomic(obj, self.path / name)

    def truncate_metrics(self, epoch: int) -> None:
        """On resume, forget records of epochs that will be run again."""
        f = self.path / "metrics.jsonl"
        if self.main and f.exists():
            keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] < epoch]
            self.write_text("metrics.jsonl", "".join(ln + "\n" for ln in keep))


# ------------------------------------------------------------------------------------------ trackers
class Trackers:
    """Optional wandb / TensorBoard; asked for but not installed is a one-line error before any work."""

    def __init__(self, cfg: Namespace, run: RunDir) -> None:
        self.wandb = self.tb = None
        if not run.main:
            return
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UsageError("--wandb needs the wandb package: pip install wandb (or pip install 'ssam[wandb]')") from None
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or cfg.output_name,
                                    config=to_plain(cfg), dir=str(run.path), resume="allow")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(run.path / "tensorboard"))

    def log(self, record: dict) -> None:
        if self.wandb is not None:
            self.wandb.log(record, step=record["epoch"])
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, record["epoch"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------ masks across ranks
def mask_hash(opt: SAM) -> torch.Tensor:
    flat = opt.flat_mask()
    idx = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    # Two position-weighted sums: equal masks give equal pairs; a moved entry changes them.
    return torch.stack([(idx * flat).sum(), ((idx * 2654435761) % 1000000007 * flat).sum()])


def same_on_all_ranks(value: torch.Tensor, world: int) -> bool:
    if world <= 1:
        return True
    gathered = [torch.zeros_like(value) for _ in range(world)]
    dist.all_gather(gathered, value)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def check_masks_agree(opt: SAM, world: int, epoch: int) -> None:
    if not same_on_all_ranks(mask_hash(opt), world):
        raise RuntimeError(f"SSAM masks differ across ranks after the update at epoch {epoch}; "
                           "refusing to train with inconsistent perturbations")


def _all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum per-parameter tensors over ranks with one collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [f.view_as(t) for f, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)]


def broadcast_masks(opt: SAM, world: int) -> None:
    if world > 1:
        flat = opt.flat_mask().to(torch.uint8)
        dist.broadcast(flat, 0)
        opt.set_flat_mask(flat.bool())


# ------------------------------------------------------------------------------------------ the run
class Trainer:
    def __init__(self, cfg: Namespace) -> None:
        self.cfg = cfg
        self.rank, self.world, local_rank = init_distributed(cfg)
        self.device = pick_device(cfg, local_rank)
        self.run = RunDir(cfg, self.rank)
        if elastic_restart():
            # torchrun --max-restarts relaunched us after a rank died: continue from the last checkpoint.
            cfg.resume = True
        self.run.prepare(cfg)
        self.wrapper, _ = parse_opt(cfg.opt)
        seed_everything(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.train_ds, self.test_ds, info = build_datasets(cfg.dataset, cfg.datadir, cfg.download, augment=True)
        self.model_args = {"name": cfg.model, "num_classes": info.num_classes, "in_channels": info.in_channels,
                           "image_size": info.image_size}
        self.model = build_model(cfg.model, info.num_classes, info.in_channels, info.image_size).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = build_optimizer(cfg, self.model)
        self.sched = EpochLR(self.opt, cfg)
        self.scaler = TwoPassScaler(enabled=cfg.amp == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        # On a CPU, freed gradients come back as fresh pages to fault in on every backward (two per SAM step):
        # zeroing them in place measured ~3% faster for ResNet-18. Every parameter of these models gets a gradient
        # in every pass, so zeros and None step the same.
        self._grads_to_none = self.device.type != "cpu"

        self.start_epoch, self.start_step, self.best_acc1, self.elapsed = cfg.start_epoch, 0, 0.0, 0.0
        self.partial: dict | None = None
        self.skipped_total = 0
        ckpt = self._checkpoint_to_resume()
        if ckpt is not None:
            self._restore(ckpt)

        self.net: torch.nn.Module = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)

        if cfg.gpu_data:
            self.loader = GPULoader.from_dataset(self.train_ds, cfg.batch_size, device=self.device, augment=True,
                                                 shuffle=True, drop_last=True, seed=cfg.seed)
            if self.world > 1:
                raise UsageError("--gpu_data is single-process; drop it under torchrun")
        else:
            self.loader = train_loader(cfg, self.train_ds, self.rank, self.world)
        val_world = self.world if cfg.distributed_val else 1
        self.val_loader = eval_loader(cfg, self.test_ds, self.rank if cfg.distributed_val else 0, val_world)
        self.fisher_source = self.loader.dataset if not cfg.gpu_data else self.train_ds
        self.stop_signal: int | None = None
        self.trackers = Trackers(cfg, self.run) if not cfg.eval_only else None

    # ---------------------------------------------------------------- resume
    def _checkpoint_to_resume(self) -> dict | None:
        cfg = self.cfg
        if cfg.eval_only:
            path = Path(cfg.resume_path) if cfg.resume_path else self.run.path / "best.pt"
        elif cfg.resume_path:
            path = Path(cfg.resume_path)
        elif cfg.resume:
            path = self.run.path / "last.pt"
            if not path.exists():
                if self._allow_fresh_resume():
                    return None
                if self.run.holds_run():
                    raise UsageError(f"--resume: no checkpoint at {path}; the folder holds a run that never "
                                     "finished an epoch: pass --overwrite to start again")
                raise UsageError(f"--resume: no checkpoint at {path}")
        else:
            return None
        if not path.exists():
            raise UsageError(f"--resume: no checkpoint at {path}")
        ckpt = load_checkpoint(path, map_location=self.device)
        saved = ckpt.get("config", {})
        for key in ("model", "opt", "dataset"):
            if key in saved and saved[key] != getattr(cfg, key):
                raise UsageError(f"checkpoint {path} was written with --{key} {saved[key]}; this run has "
                                 f"--{key} {getattr(cfg, key)}: use the same --{key} or another --output_name")
        return ckpt

    def _allow_fresh_resume(self) -> bool:
        # `ssam compare` resumes every run folder it manages; an empty one simply starts.
        return os.environ.get("SSAM_RESUME_OR_START") == "1" or elastic_restart()

    def _restore(self, ckpt: dict) -> None:
        try:
            unwrap(self.model).load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UsageError(f"checkpoint does not fit --model {self.cfg.model}: {str(e).splitlines()[0][:200]}") from None
        if self.cfg.eval_only:
            return
        try:
            self.opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UsageError(f"checkpoint optimizer state does not fit --opt {self.cfg.opt}: {e}") from None
        self.sched.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"])
        self.start_step = int(ckpt.get("step", 0))
        self.best_acc1 = float(ckpt.get("best_acc1", 0.0))
        self.elapsed = float(ckpt.get("elapsed", 0.0))
        self.skipped_total = int(ckpt.get("skipped_steps", 0))
        self.partial = ckpt.get("partial")
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        self.resumed_from = (self.start_epoch, self.start_step)

    def checkpoint(self, epoch: int, step: int, partial: dict | None = None, finished: bool = False) -> dict:
        return {
            "version": VERSION, "model": unwrap(self.model).state_dict(), "model_args": self.model_args,
            "config": to_plain(self.cfg), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step, "best_acc1": self.best_acc1,
            "elapsed": self.elapsed, "skipped_steps": self.skipped_total, "rng": rng_state(),
            "partial": partial, "finished": finished,
        }

    # ---------------------------------------------------------------- steps
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, epoch: int, step: int, x: torch.Tensor, y: torch.Tensor):
        cfg, opt = self.cfg, self.opt
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        refresh = _mask_refresh(opt)
        # A run started at --start_epoch off the update grid still needs a first mask.
        if refresh == "before_epoch" and ((step == 0 and opt.should_update(epoch)) or not opt.has_masks()):
            self.update_fisher_mask(epoch)

        def after_first_backward() -> None:
            if step == 0 and refresh == "first_backward" and _refresh_mask(opt, epoch):
                if cfg.sam_first_pass == "local":
                    broadcast_masks(opt, self.world)
                check_masks_agree(opt, self.world, epoch)

        res = train_step(
            self.net, opt, list(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum))), model=self.model,
            scaler=self.scaler, autocast=self._autocast, no_sync=self.net.no_sync if self.world > 1 else None,
            sync_first_pass=not (self.wrapper is not None and cfg.sam_first_pass == "local"),
            freeze_bn_second_pass=cfg.freeze_bn_second_pass, after_first_backward=after_first_backward,
            grads_to_none=self._grads_to_none)
        top5 = res.outputs.topk(min(5, res.outputs.shape[1]), dim=1).indices
        hit = top5 == y[:, None]
        return res.loss_sum, hit[:, 0].sum(), hit.any(1).sum(), res.nonfinite

    @torch.no_grad()
    def update_fisher_mask(self, epoch: int) -> None:
        cfg, opt = self.cfg, self.opt
        # The Fisher examples of an epoch depend only on (seed, epoch): resumes and ranks agree.
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        src = self.fisher_source
        if hasattr(src, "epoch"):
            src.epoch = epoch
        chosen = torch.randperm(len(src), generator=g)[: opt.num_samples].tolist()
        shard = chosen[self.rank::self.world]  # each rank measures its share; the sum is all-reduced
        opt.update_mask(unwrap(self.model), [_as_batch(src, shard)],
                        reduce=_all_reduce_sum if self.world > 1 else None)
        check_masks_agree(opt, self.world, epoch)

    # ---------------------------------------------------------------- epochs
    @torch.no_grad()
    def evaluate(self) -> dict:
        model, cfg = self.model, self.cfg
        was = model.training
        model.eval()
        tot = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, top1, top5, n
        if self.rank == 0 or cfg.distributed_val:
            for i, (x, y) in enumerate(self.val_loader):
                if cfg.limit_val_batches and i >= cfg.limit_val_batches:
                    break
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    out = model(x)
                loss = F.cross_entropy(out.float(), y, reduction="sum")
                hit = out.topk(min(5, out.shape[1]), 1).indices == y[:, None]
                tot += torch.stack([loss.double(), hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                    torch.tensor(float(len(y)), device=self.device, dtype=torch.float64)])
        if self.world > 1:
            if cfg.distributed_val:
                dist.all_reduce(tot)
            else:
                dist.broadcast(tot, 0)
        model.train(was)
        n = max(tot[3].item(), 1)
        return {"test_loss": tot[0].item() / n, "test_acc1": 100 * tot[1].item() / n, "test_acc5": 100 * tot[2].item() / n}

    def _progress(self, total: int, epoch: int):
        from tqdm import tqdm
        show = self.run.main and not self.cfg.quiet and sys.stderr.isatty()
        return tqdm(total=total, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False, disable=not show,
                    dynamic_ncols=True)

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.model.train()
        self.sched.set_epoch(epoch)
        start = self.start_step if epoch == self.start_epoch else 0
        if isinstance(self.loader, GPULoader):
            self.loader.set_epoch(epoch)
            steps = len(self.loader)
            batches = itertools.islice(iter(self.loader), start, None)
        else:
            self.loader.batch_sampler.sampler.set_epoch(epoch, start * cfg.batch_size)
            self.loader.dataset.epoch = epoch
            steps = start + len(self.loader)
            batches = iter(self.loader)
        if cfg.limit_train_batches:
            steps = min(steps, cfg.limit_train_batches)
        acc = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss sum, top1, top5, n
        if start and self.partial is not None:
            acc += self.partial["acc"].to(self.device)
        seen_before = acc[3].item()
        skipped0 = self.scaler.skipped_steps
        t0 = time.time()
        bar = self._progress(steps - start, epoch)
        pending = None
        step = start
        for step in range(start, steps):
            try:
                x, y = next(batches)
            except StopIteration:
                break
            loss_sum, c1, c5, bad = self.train_step(epoch, step, x, y)
            # Read the previous step's flag now, so the check costs no pipeline stall.
            if pending is not None:
                self._raise_if_bad(pending, epoch)
            pending = (bad, loss_sum, step)
            acc += torch.stack([loss_sum.double(), c1.double(), c5.double(),
                                torch.tensor(float(len(y)), dtype=torch.float64, device=self.device)])
            bar.update(1)
            if (step + 1) % cfg.log_freq == 0 and self.run.main:
                if bar.disable and not cfg.quiet:
                    print(f"  epoch {epoch + 1} step {step + 1}/{steps} loss {acc[0].item() / acc[3].item():.4f}",
                          flush=True)
                else:
                    bar.set_postfix(loss=f"{acc[0].item() / acc[3].item():.4f}")
            save_now = cfg.save_every_steps and (step + 1) % cfg.save_every_steps == 0 and step + 1 < steps
            if save_now or self.stop_signal is not None:
                self._raise_if_bad(pending, epoch)
                pending = None
                self.elapsed += time.time() - t0
                t0 = time.time()
                self.run.save("last.pt", self.checkpoint(epoch, step + 1, {"acc": acc.cpu()}))
                if self.stop_signal is not None:
                    bar.close()
                    raise Interrupted(f"stopped by signal {self.stop_signal} at epoch {epoch + 1}, step {step + 1}; "
                                      f"last.pt written in {self.run.path}; continue with the same command "
                                      "and --resume")
        if pending is not None:
            self._raise_if_bad(pending, epoch)
        bar.close()
        self.start_step = 0
        self.partial = None
        dt = time.time() - t0
        self.elapsed += dt
        if self.world > 1:
            dist.all_reduce(acc)
        n = max(acc[3].item(), 1)
        images = acc[3].item() - seen_before * (self.world if self.world > 1 else 1)
        skipped = self.scaler.skipped_steps - skipped0
        self.skipped_total += skipped
        return {"train_loss": acc[0].item() / n, "train_acc1": 100 * acc[1].item() / n,
                "train_acc5": 100 * acc[2].item() / n, "epoch_time": dt, "images_per_s": images / max(dt, 1e-9),
                "skipped_steps": skipped}

    def _raise_if_bad(self, pending, epoch: int) -> None:
        bad, loss_sum, step = pending
        if bool(bad):
            what = "loss" if not torch.isfinite(loss_sum) else "gradient norm"
            raise Diverged(f"non-finite {what} at epoch {epoch + 1}, step {step + 1}; stopped. The last good "
                           f"checkpoint is kept in {self.run.path}; lower --lr or --rho, or try --amp none")

    def fit(self) -> dict:
        cfg, run = self.cfg, self.run
        if cfg.eval_only:
            res = self.evaluate()
            print(f"eval | test loss {res['test_loss']:.4f} acc1 {res['test_acc1']:.2f} acc5 {res['test_acc5']:.2f}")
            return res
        if run.main:
            run.path.mkdir(parents=True, exist_ok=True)
            run.write_text("config.yaml", yaml.safe_dump(to_plain(cfg), sort_keys=True))
            run.truncate_metrics(self.start_epoch)
        n_params = sum(p.numel() for p in self.model.parameters())
        resumed = f", resumed at epoch {self.start_epoch + 1} step {self.start_step}" if hasattr(self, "resumed_from") else ""
        run.log(f"ssam train | {cfg.dataset} {cfg.model} ({n_params:,} params) {cfg.opt} | {self.device}"
                f"{f' x{self.world}' if self.world > 1 else ''} | {run.path}{resumed}", quiet=cfg.quiet)
        last = {}
        if self.start_epoch >= cfg.epochs:
            run.log("nothing to do: the run already finished all epochs", quiet=cfg.quiet)
        for epoch in range(self.start_epoch, cfg.epochs):
            tr = self.train_epoch(epoch)
            te = self.evaluate()
            new_best = te["test_acc1"] > self.best_acc1
            self.best_acc1 = max(self.best_acc1, te["test_acc1"])
            density = self.opt.mask_density() if isinstance(self.opt, (SSAMF, SSAMD)) else 1.0
            rec = {"epoch": epoch, **{k: tr[k] for k in ("train_loss", "train_acc1", "train_acc5")}, **te,
                   "best_acc1": self.best_acc1, "lr": self.opt.param_groups[0]["lr"], "mask_density": density,
                   "epoch_time": tr["epoch_time"], "images_per_s": tr["images_per_s"],
                   "skipped_steps": tr["skipped_steps"]}
            run.append("metrics.jsonl", json.dumps(rec))
            run.log(
                f"epoch {epoch + 1:>3}/{cfg.epochs} | train loss {tr['train_loss']:.4f} acc1 {tr['train_acc1']:.2f} "
                f"acc5 {tr['train_acc5']:.2f} | test loss {te['test_loss']:.4f} acc1 {te['test_acc1']:.2f} "
                f"acc5 {te['test_acc5']:.2f} | best {self.best_acc1:.2f} | lr {rec['lr']:.4g} | mask {density:.3f} | "
                f"{tr['epoch_time']:.1f}s {tr['images_per_s']:.0f} img/s"
                + (f" | {tr['skipped_steps']} fp16 steps skipped" if tr["skipped_steps"] else ""), quiet=cfg.quiet)
            if self.trackers:
                self.trackers.log(rec)
            finished = epoch + 1 == cfg.epochs
            ck = self.checkpoint(epoch + 1, 0, finished=finished)
            run.save("last.pt", ck)
            if new_best:
                run.save("best.pt", ck)
            last = rec
        if isinstance(self.opt, (SSAMF, SSAMD)):
            run.write_text("masks.json", json.dumps(self.opt.mask_stats(), indent=1))
        summary = {"finished": True, "best_acc1": self.best_acc1, "final_acc1": last.get("test_acc1"),
                   "final_train_loss": last.get("train_loss"), "epochs": cfg.epochs, "wall_time": self.elapsed,
                   "time_per_epoch": self.elapsed / max(1, cfg.epochs - cfg.start_epoch),
                   "skipped_steps": self.skipped_total}
        if self.world > 1:
            summary["ranks_agree"] = self._weights_agree()
        # A resume with no epoch left keeps the summary of the run that trained them.
        if last or not (run.path / "summary.json").exists():
            run.write_text("summary.json", json.dumps(summary, indent=1))
        if self.trackers:
            self.trackers.close()
        return summary

    def _weights_agree(self) -> bool:
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.model.parameters()])
        h = torch.stack([flat.sum(), (flat * torch.arange(flat.numel(), device=flat.device)).sum()])
        ok = same_on_all_ranks(h, self.world)
        if isinstance(self.opt, (SSAMF, SSAMD)):
            ok = same_on_all_ranks(mask_hash(self.opt), self.world) and ok
        return ok


# TODO(C1): drop these two once the optimizers carry the mask refresh protocol (helper A).
def _mask_refresh(opt) -> str | None:
    if hasattr(opt, "mask_refresh"):
        return opt.mask_refresh
    return {SSAMF: "before_epoch", SSAMD: "first_backward"}.get(type(opt))


def _refresh_mask(opt, epoch: int) -> bool:
    if hasattr(opt, "refresh_mask"):
        return opt.refresh_mask(epoch)
    if opt.should_update(epoch):
        opt.update_mask(epoch)
        return True
    return False


def _as_batch(dataset, indices: list[int]):
    """The chosen examples as one (inputs, targets) batch for the Fisher."""
    items = [dataset[i] for i in indices]
    xs = torch.stack([torch.as_tensor(x) for x, _ in items]) if items else torch.zeros(0)
    ys = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
    return xs, ys


def train(cfg: Namespace) -> dict:
    """Run a whole training from a parsed configuration; exceptions carry the exit status (see cli)."""
    trainer = Trainer(cfg)
    previous = {}

    def on_signal(signum, _frame):
        if trainer.stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        trainer.stop_signal = signum
        print(f"\nssam: signal {signum} received; finishing the current step and writing last.pt", file=sys.stderr)

    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[s] = signal.signal(s, on_signal)
        except ValueError:  # not the main thread
            pass
    try:
        return trainer.fit()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()
