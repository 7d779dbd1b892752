"""A run's counters (ssam.train.progress) and what the run reports from them (ssam.train.report)."""

import dataclasses

import pytest
import torch

from ssam.train.progress import Progress
from ssam.train.report import epoch_line, epoch_record, run_summary


def test_checkpoint_entries_round_trip_and_old_checkpoints_default():
    p = Progress(epoch=1, step=0, best_acc1=71.5, elapsed=12.25, skipped_steps=2, passes=3.0e4, examples=2 * 10**4)
    p.note_validation(0, 60.0, 70.0)
    saved = p.to_checkpoint(epoch=3, step=7, partial={"acc": torch.zeros(4)})
    back = Progress.from_checkpoint(saved)
    expected = dataclasses.replace(p, epoch=3, step=7, resumed=True)
    assert dataclasses.asdict(back).keys() == dataclasses.asdict(expected).keys()
    for k in ("epoch", "step", "best_acc1", "elapsed", "skipped_steps", "passes", "examples", "best_val", "resumed"):
        assert getattr(back, k) == getattr(expected, k), k
    assert torch.equal(back.partial["acc"], torch.zeros(4))
    # A checkpoint of the first release holds the epoch alone.
    old = Progress.from_checkpoint({"epoch": 4})
    assert (old.epoch, old.step, old.best_acc1, old.passes, old.best_val, old.partial) == (4, 0, 0.0, 0.0, {}, None)


def test_cost_counts_and_the_early_stopped_epoch_is_the_first_best():
    p = Progress()
    p.count(2.0, 96)  # a SAM step on 96 examples
    p.count(1.0, 32)  # a plain step
    assert p.passes_per_example == pytest.approx((2 * 96 + 32) / 128)
    assert [p.note_validation(e, v, t) for e, v, t in [(0, 50, 60), (1, 55, 61), (2, 55, 64), (3, 54, 66)]] == [
        60,
        61,
        61,  # a tie does not move it: the first epoch of best validation accuracy
        61,
    ]
    assert p.best_val == {"val_acc1": 55, "epoch": 1, "test_acc1": 61}


def _record(epoch, **held):
    train = dict(train_loss=0.5, train_acc1=80.0, train_acc5=99.0, epoch_time=2.0, images_per_s=500.0, skipped_steps=0)
    test = dict(test_loss=0.6, test_acc1=78.0, test_acc5=98.0)
    p = Progress(best_acc1=78.0, passes=300.0, examples=200)
    return epoch_record(epoch, {**train, "ascent_share": 0.5}, test, held, p, lr=0.1, mask_density=0.5), p


def test_epoch_record_line_and_summary():
    rec, p = _record(4, val_acc1=70.0, noisy_memorized=0.25, noisy_true=0.5, clean_train_acc=90.0)
    assert rec["epoch"] == 4 and rec["passes_per_example"] == 1.5 and rec["ascent_share"] == 0.5
    line = epoch_line(rec, 10, mask=True, ascent=True)
    assert line.startswith("epoch   5/10 | train loss 0.5000")
    for part in ("mask 0.500", "ascent 0.50", "val acc1 70.00", "noisy fit 0.250 true 0.500", "500 img/s"):
        assert part in line, part
    plain = epoch_line(_record(0)[0], 10, mask=False, ascent=False)
    assert "mask" not in plain and "ascent" not in plain and "val acc1" not in plain and "noisy" not in plain
    p.elapsed = 30.0
    p.note_validation(2, 71.0, 77.0)
    s = run_summary(p, rec, epochs=10, start_epoch=4)
    assert s["time_per_epoch"] == 5.0 and s["final_acc1"] == 78.0 and s["passes_per_example"] == 1.5
    assert (s["early_stopped_acc1"], s["best_val_acc1"], s["best_val_epoch"]) == (77.0, 71.0, 2)
    assert s["final_noisy_memorized"] == 0.25 and s["final_clean_train_acc"] == 90.0
    assert "early_stopped_acc1" not in run_summary(Progress(), rec, 10, 0)


def test_batch_sums_count_top1_and_top5_by_hand():
    from ssam.train.evaluate import batch_sums

    torch.manual_seed(0)
    out = torch.randn(7, 6)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    order = out.argsort(dim=1, descending=True).tolist()
    top1 = sum(order[i][0] == int(y[i]) for i in range(7))
    top5 = sum(int(y[i]) in order[i][:5] for i in range(7))
    sums = batch_sums(torch.tensor(3.5), out, y)
    assert sums.dtype == torch.float64 and sums.tolist() == [3.5, top1, top5, 7]
    # Fewer than five classes: top-5 is every class.
    assert batch_sums(torch.tensor(0.0), out[:, :3], torch.tensor([2] * 7))[2] == 7
