"""The measurement columns of the comparison's tables: which metrics, in which order, under which headers, and
which are read from each run's summary. ``report`` computes them, ``tables`` prints them."""

from __future__ import annotations

STD_NOTE = "sample standard deviation over seeds (n-1 in the denominator)"
# (key, column header, decimals when the column has no spread: see numbers.py for the rule with one)
METRICS = (
    ("best_acc1", "best acc1 (%)", 2),
    ("final_acc1", "final acc1 (%)", 2),
    ("early_stopped_acc1", "early-stopped acc1 (%)", 2),
    ("final_noisy_memorized", "wrong labels fit", 3),
    ("final_train_loss", "final train loss", 4),
    ("passes_per_example", "passes/example", 2),
    ("time_per_epoch", "s/epoch", 2),
    ("mask_density", "mask density", 3),
    ("lambda_max", "λ_max", 1),
    ("trace", "trace", 0),
)
HEADERS = {k: h for k, h, _ in METRICS}
DEFAULT_DECIMALS = {k: d for k, _, d in METRICS}
# Shown whenever the table is; the others only when some run measured them (a validation split, label noise, ...).
ALWAYS = ("best_acc1", "final_acc1", "final_train_loss", "time_per_epoch")
HESSIAN = ("lambda_max", "trace")
FROM_SUMMARY = (
    "best_acc1",
    "final_acc1",
    "early_stopped_acc1",
    "final_noisy_memorized",
    "final_train_loss",
    "passes_per_example",
    "time_per_epoch",
    "wall_time",
    "epochs",
)
# Compared with the base optimizer's run of the same seed.
PAIRED = ("final_acc1", "best_acc1", "early_stopped_acc1")
