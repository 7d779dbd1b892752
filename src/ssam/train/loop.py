"""The training loop, top to bottom: build the run, resume it, then epochs of steps, evaluation and checkpoints.

The step itself is ``step.train_step``; several processes: ``distributed``; the run folder: ``rundir``; the
counters a checkpoint carries: ``progress``; what an epoch and the run report: ``report``; random generators:
``rng``; configuration: ``config``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from argparse import Namespace
from functools import partial
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import VERSION
from ..data import GPULoader
from ..errors import Diverged, Interrupted, UsageError
from ..models import build_model
from ..optim import SAM, SparseSAM, TwoPassScaler
from ..optim.refresh import refresh_after_first_backward, refresh_before_epoch
from .builders import (
    EpochLR,
    build_data,
    build_loaders,
    build_optimizer,
    check_model_fits,
    micro_batch_plan,
    model_args,
    model_width,
    set_loader_epoch,
    settle_fisher_mode,
)
from .config import to_plain
from .cost import pass_cost, step_passes
from .distributed import (
    all_reduce_mean,
    broadcast_masks,
    check_masks_agree,
    elastic_restart,
    init_distributed,
    pick_device,
    unwrap,
    weights_agree,
)
from .evaluate import batch_sums, evaluate
from .memorization import memorization
from .progress import Progress
from .report import StepLog, epoch_line, epoch_record, run_header, run_summary
from .rng import rng_state, seed_everything, set_rng_state
from .rundir import RunDir, Trackers, checkpoint_to_resume
from .step import micro_batch_step, train_step
from .trajectory import build_trajectory

__all__ = ["Trainer"]


# ------------------------------------------------------------------------------------------ the run
class Trainer:
    """One training run from a configuration: ``Trainer(cfg).fit()``."""

    def __init__(self, cfg: Namespace) -> None:
        self.cfg = cfg
        self.rank, self.world, local_rank = init_distributed(cfg)
        self.device = pick_device(cfg, local_rank)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.gpu_data and self.world > 1:
            raise UsageError("--gpu_data is single-process; drop it under torchrun")
        seed_everything(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        data = build_data(cfg)
        self.train_ds, self.test_ds, self.train_plain, self.val_ds = data.train, data.test, data.train_plain, data.val
        self.model_args = model_args(cfg, data.info)
        self.model = build_model(
            cfg.model, data.info.num_classes, data.info.in_channels, data.info.image_size, width=model_width(cfg)
        ).to(self.device)
        # SSAM-F's --fisher_mode auto becomes the mode this model allows (and names the run) before anything is
        # written; an explicit 'train' the model cannot run is refused here.
        check_model_fits(cfg, self.model, data.train)
        self.fisher_note = settle_fisher_mode(cfg, self.model, data.train)
        self.run = RunDir(cfg, self.rank)
        if elastic_restart():
            # torchrun --max-restarts relaunched us after a rank died: continue from the last checkpoint.
            cfg.resume = True
        self.run.prepare(cfg, replace=False)
        self.run.prepare(cfg)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt: torch.optim.Optimizer = build_optimizer(cfg, self.model)
        # The same object, typed for what it can do: a SAM-type step (schedule, counters) and masks.
        self.sam: SAM | None = self.opt if isinstance(self.opt, SAM) else None
        self.sparse: SparseSAM | None = self.opt if isinstance(self.opt, SparseSAM) else None
        self.sched = EpochLR(self.opt, cfg)
        # SAF or MESA: a loss term against the model's own past predictions (ssam.train.trajectory), or None.
        self.trajectory = build_trajectory(cfg, self.model, len(data.train), data.info.num_classes, self.device)
        self.scaler = TwoPassScaler(enabled=cfg.amp == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        # How the optimizer's mask is refreshed (None: it has none); see ssam.optim.refresh.
        self.refresh: str | None = self.sparse.mask_refresh if self.sparse is not None else None
        # On a CPU, freed gradients come back as fresh pages to fault in on every backward (two per SAM step):
        # zeroing them in place measured ~3% faster for ResNet-18. Every parameter of these models gets a gradient
        # in every pass, so zeros and None step the same (train_step sets None itself when --skip_dead).
        self._grads_to_none = self.device.type != "cpu"

        self.progress = Progress(epoch=cfg.start_epoch)
        self._first_pass_cost = 1.0
        ckpt, self.flag_changes = checkpoint_to_resume(cfg, self.run, self.device)
        if ckpt is not None:
            self._restore(ckpt)

        self.net: torch.nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        if self.world > 1:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self.net = self.ddp
        if cfg.compile:
            self.net = cast(torch.nn.Module, torch.compile(self.net))

        loaders = build_loaders(cfg, data, self.device, self.rank, self.world)
        self.loader, self.val_loader = loaders.train, loaders.test
        self.holdout_loader, self.noisy_loader, self.fisher_source = loaders.holdout, loaders.noisy, loaders.fisher
        # m-sharpness: the chunks' ascents in two batched passes where the model allows (ssam.optim.msharp)
        self.vectorised, self.m_note = micro_batch_plan(cfg, self.model, self.sam is not None, self.refresh)
        if self.sam is not None:  # late:F places its boundary by the run's planned steps (a resume keeps it)
            per_epoch = min(len(self.loader), cfg.limit_train_batches or len(self.loader))
            self.sam.plan_steps(max(1, cfg.epochs * per_epoch))
        self.stop_signal: int | None = None
        self.trackers = Trackers(cfg, self.run) if not cfg.eval_only else None

    # ---------------------------------------------------------------- resume
    def _restore(self, ckpt: dict) -> None:
        try:
            unwrap(self.model).load_state_dict(ckpt["model"])
        except RuntimeError as e:
            first = str(e).splitlines()[0][:200]
            raise UsageError(f"checkpoint does not fit --model {self.cfg.model}: {first}") from None
        if self.cfg.eval_only:
            return
        try:
            self.opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UsageError(f"checkpoint optimizer state does not fit --opt {self.cfg.opt}: {e}") from None
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.trajectory is not None:
            self.trajectory.load_state_dict(ckpt["trajectory"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress.from_checkpoint(ckpt)
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])

    def checkpoint(self, epoch: int, step: int, partial: dict | None = None, finished: bool = False) -> dict:
        return {
            "version": VERSION,
            "model": unwrap(self.model).state_dict(),
            "model_args": self.model_args,
            "config": to_plain(self.cfg),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            **({"trajectory": self.trajectory.state_dict()} if self.trajectory is not None else {}),
            **self.progress.to_checkpoint(epoch, step, partial),
            "rng": rng_state(),
            "finished": finished,
        }

    # ---------------------------------------------------------------- steps
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(
        self, epoch: int, step: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch: its ``batch_sums`` and a flag, read later, of a non-finite loss/gradient.
        ``index``: the examples' positions in the training set (the loaders yield it for SAF)."""
        cfg, opt, sparse, traj = self.cfg, self.opt, self.sparse, self.trajectory
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        refresh = self.refresh
        # Mid-epoch resumes start at step > 0 with the checkpoint's mask; a run started at --start_epoch off the
        # update grid gets its first mask here too (refresh_mask makes one when there is none).
        if step == 0 and sparse is not None:
            fisher = (unwrap(self.model), self.fisher_source, cfg.seed)
            if refresh_before_epoch(sparse, epoch, *fisher, rank_world=(self.rank, self.world)):
                check_masks_agree(sparse, self.world, epoch)

        # The schedule's decision, known before pass one; a plain step is one synchronised pass.
        ascend = self.sam is not None and self.sam.ascent_due()
        # An SSAM-D refresh reads the dense gradient: the epoch's first step runs a full first pass.
        skip = cfg.skip_dead and ascend and not (step == 0 and refresh == "first_backward")
        direction = self.sam.direction if self.sam is not None else None

        def after_first_backward() -> None:
            if skip:  # what the skipping pass computed: the tensors that took a gradient
                params = list(self.model.parameters())
                self._first_pass_cost = pass_cost(params, [p.grad is not None for p in params])
            if step == 0 and sparse is not None and refresh_after_first_backward(sparse, epoch):
                if cfg.sam_first_pass == "local":
                    broadcast_masks(sparse, self.world)
                check_masks_agree(sparse, self.world, epoch)

        m = cfg.sam_micro_batch
        chunked = ascend and m is not None and m < len(y)
        first_backward = step == 0 and refresh == "first_backward"
        if chunked:
            assert self.sam is not None  # chunked implies an ascent, which only a SAM-type optimizer takes
            res = micro_batch_step(
                self.net,
                self.sam,
                x,
                y,
                cast(int, m),
                model=self.model,
                autocast=self._autocast,
                no_sync=self.ddp.no_sync if self.ddp else None,
                reduce_grads=all_reduce_mean if self.world > 1 else None,
                skip_dead=cfg.skip_dead,
                vectorised=self.vectorised,
                before_ascent=after_first_backward if first_backward else None,
            )
        else:
            k = cfg.grad_accum
            extras = traj.extras(x, cast(torch.Tensor, index)) if traj is not None else ()
            res = train_step(
                self.net,
                opt,
                list(zip(x.chunk(k), y.chunk(k), *(e.chunk(k) for e in extras))),
                traj.bind(epoch) if traj is not None else F.cross_entropy,
                model=self.model,
                scaler=self.scaler,
                autocast=self._autocast,
                no_sync=self.ddp.no_sync if self.ddp else None,
                sync_first_pass=not (ascend and cfg.sam_first_pass == "local"),
                skip_dead=skip,
                reduce_first_grads=all_reduce_mean if self.world > 1 else None,
                freeze_bn_second_pass=cfg.freeze_bn_second_pass,
                after_first_backward=after_first_backward,
                grads_to_none=self._grads_to_none,
                ascend=ascend,
            )
        first_cost = self._first_pass_cost if skip else 1.0
        sizes = [len(c) for c in y.chunk(cfg.grad_accum)]
        per_example = step_passes(ascend, chunked, first_backward, direction, first_cost, sizes)
        if traj is not None:
            traj.after_step(self.model)
            per_example += traj.extra_passes(epoch)
        self.progress.count(per_example, len(y) * self.world)
        return batch_sums(res.loss_sum, res.outputs, y), res.nonfinite

    # ---------------------------------------------------------------- epochs
    def evaluate(self, loader: Any = None, prefix: str = "test", predictions: list | None = None) -> dict:
        """Loss and accuracies on ``loader`` (default the test set); see ``evaluate.evaluate``."""
        cfg, test = self.cfg, loader is None
        shard = cfg.distributed_val and test  # the test set may be evaluated in shards; the rest on rank 0
        reduce: Any = None
        if self.world > 1:
            reduce = dist.all_reduce if shard else partial(dist.broadcast, src=0)
        return evaluate(
            self.model,
            self.val_loader if test else loader,
            device=self.device,
            autocast=self._autocast,
            channels_last=cfg.channels_last,
            limit=cfg.limit_val_batches if test else 0,
            run=self.rank == 0 or shard,
            reduce=reduce,
            prefix=prefix,
            predictions=predictions,
        )

    def measure_holdout(self, epoch: int, test_acc1: float) -> dict:
        """Validation accuracy and the memorization of the noisy labels, each when asked for; outside the timed
        part of the epoch. Also moves the early-stopped result (first epoch of best validation accuracy)."""
        out: dict = {}
        if self.holdout_loader is not None:
            val = self.evaluate(self.holdout_loader, "val")
            out.update(val_loss=val["val_loss"], val_acc1=val["val_acc1"])
            out["early_stopped_acc1"] = self.progress.note_validation(epoch, val["val_acc1"], test_acc1)
        if self.noisy_loader is not None:
            preds: list = []
            self.evaluate(self.noisy_loader, "train_plain", predictions=preds)
            ds = self.train_plain
            if preds:  # rank 0 (the others took part in the broadcast only)
                out.update(memorization(torch.cat(preds), ds.targets, ds.clean_targets, ds.noisy_indices))
        return out

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.model.train()
        self.sched.set_epoch(epoch)
        progress = self.progress
        start = progress.step if epoch == progress.epoch else 0
        if isinstance(self.loader, GPULoader):
            self.loader.set_epoch(epoch)
            steps = len(self.loader)
            batches: Any = itertools.islice(iter(self.loader), start, None)
        else:
            set_loader_epoch(self.loader, epoch, start * cfg.batch_size)
            steps = start + len(self.loader)
            batches = iter(self.loader)
        if cfg.limit_train_batches:
            steps = min(steps, cfg.limit_train_batches)
        acc = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss sum, top1, top5, n
        if start and progress.partial is not None:
            acc += progress.partial["acc"].to(self.device)
        seen_before = acc[3].item()
        skipped0 = self.scaler.skipped_steps
        taken0 = self.sam.steps_taken if self.sam is not None else (0, 0)
        if start and progress.partial is not None and "taken" in progress.partial:
            steps0, ascents0 = (int(t) for t in progress.partial["taken"])  # the epoch's counts from its first step
            taken0 = (steps0, ascents0)
        t0 = t_epoch = time.time()  # t0: since the last save (the run's elapsed time); t_epoch: this epoch's
        bar = StepLog(self.run.main, cfg.quiet, cfg.log_freq, epoch, cfg.epochs, steps - start)
        pending = None
        step = start
        for step in range(start, steps):
            try:
                x, y, *index = next(batches)  # (x, y, index) for SAF
            except StopIteration:
                break
            sums, bad = self.train_step(epoch, step, x, y, *index)
            # Read the previous step's flag now, so the check costs no pipeline stall.
            if pending is not None:
                self._raise_if_bad(pending, epoch)
            pending = (bad, sums[0], step)
            acc += sums
            bar.step(step, steps, acc)
            save_now = cfg.save_every_steps and (step + 1) % cfg.save_every_steps == 0 and step + 1 < steps
            if save_now or self.stop_signal is not None:
                self._raise_if_bad(pending, epoch)
                pending = None
                progress.elapsed += time.time() - t0
                t0 = time.time()
                self.run.save(
                    RunDir.LAST, self.checkpoint(epoch, step + 1, {"acc": acc.cpu(), "taken": torch.tensor(taken0)})
                )
                if self.stop_signal is not None:
                    bar.close()
                    raise Interrupted(
                        f"stopped by signal {self.stop_signal} at epoch {epoch + 1}, step {step + 1}; "
                        f"last.pt written in {self.run.path}; continue with the same command "
                        "and --resume"
                    )
        if pending is not None:
            self._raise_if_bad(pending, epoch)
        bar.close()
        progress.step, progress.partial = 0, None
        progress.elapsed += time.time() - t0
        dt = time.time() - t_epoch  # the epoch's steps (of this process: a resumed epoch counts from its resume)
        if self.world > 1:
            dist.all_reduce(acc)
        n = max(acc[3].item(), 1)
        images = acc[3].item() - seen_before * (self.world if self.world > 1 else 1)
        skipped = self.scaler.skipped_steps - skipped0
        progress.skipped_steps += skipped
        # The share of this epoch's optimizer steps that took SAM's ascent (a schedule's cost; SGD 0, SAM 1).
        taken = self.sam.steps_taken if self.sam is not None else (0, 0)
        steps_done = taken[0] - taken0[0]
        return {
            "ascent_share": (taken[1] - taken0[1]) / steps_done if steps_done else 0.0,
            "train_loss": acc[0].item() / n,
            "train_acc1": 100 * acc[1].item() / n,
            "train_acc5": 100 * acc[2].item() / n,
            "epoch_time": dt,
            "images_per_s": images / max(dt, 1e-9),
            "skipped_steps": skipped,
        }

    def _raise_if_bad(self, pending, epoch: int) -> None:
        bad, loss_sum, step = pending
        if bool(bad):
            what = "loss" if not torch.isfinite(loss_sum) else "gradient norm"
            raise Diverged(
                f"non-finite {what} at epoch {epoch + 1}, step {step + 1}; stopped. The last good "
                f"checkpoint is kept in {self.run.path}; lower --lr or --rho, or try --amp none"
            )

    def fit(self) -> dict:
        cfg, run = self.cfg, self.run
        if cfg.eval_only:
            res = self.evaluate()
            print(f"eval | test loss {res['test_loss']:.4f} acc1 {res['test_acc1']:.2f} acc5 {res['test_acc5']:.2f}")
            return res
        if run.main:
            run.path.mkdir(parents=True, exist_ok=True)
            run.write_text(RunDir.CONFIG, yaml.safe_dump(to_plain(cfg), sort_keys=True))
            run.truncate_metrics(self.progress.epoch)
        progress = self.progress
        noisy = self.train_ds.label_noise["count"] if cfg.label_noise else None
        for line in run_header(cfg, self.model, self.device, self.world, run.path, progress, noisy, self.m_note):
            run.log(line)
        if self.flag_changes:
            run.log(f"resumed with changed flags: {', '.join(self.flag_changes)}")
        if self.fisher_note:
            run.log(self.fisher_note)
        last: dict = {}
        if progress.epoch >= cfg.epochs:
            run.log("nothing to do: the run already finished all epochs")
        for epoch in range(progress.epoch, cfg.epochs):
            tr = self.train_epoch(epoch)
            te = self.evaluate()
            held = self.measure_holdout(epoch, te["test_acc1"])
            new_best = te["test_acc1"] > progress.best_acc1
            progress.best_acc1 = max(progress.best_acc1, te["test_acc1"])
            density = self.sparse.mask_density() if self.sparse is not None else 1.0
            rec = epoch_record(epoch, tr, te, held, progress, self.opt.param_groups[0]["lr"], density)
            run.append(RunDir.METRICS, json.dumps(rec))
            schedule = cfg.sam_schedule != "none" and self.sam is not None
            run.log(epoch_line(rec, cfg.epochs, mask=self.sparse is not None, ascent=schedule))
            if self.trackers:
                self.trackers.log(rec)
            ck = self.checkpoint(epoch + 1, 0, finished=epoch + 1 == cfg.epochs)
            run.save(RunDir.LAST, ck)
            if new_best:
                run.save(RunDir.BEST, ck)
            last = rec
        if self.sparse is not None:
            run.write_json(RunDir.MASKS, self.sparse.mask_stats())
        at_w = self.sam is None or self.sam.direction.at_w  # which pass the training loss is of
        summary = run_summary(progress, last, cfg.epochs, cfg.start_epoch, loss_at_w=at_w)
        if self.world > 1:
            summary["ranks_agree"] = weights_agree(self.model, self.sparse, self.world)
        # A resume with no epoch left keeps the summary of the run that trained them.
        if last or not (run.path / RunDir.SUMMARY).exists():
            run.write_json(RunDir.SUMMARY, summary)
        if self.trackers:
            self.trackers.close()
        return summary
