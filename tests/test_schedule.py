"""Ascent schedules (every:K, looksam, aesam, late) against a hand-written reference loop, plain SAM bit for bit,
resume mid-interval, the trainer's pass count, and DDP ranks taking the same decisions."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ssam import SAM, SSAMF
from ssam.cli import main
from ssam.optim.schedule import parse_schedule

LR, RHO, EPS = 0.1, 0.2, 1e-7


def data(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


def flat_grad(m, w, x, y):
    """The loss gradient at weights ``w`` (a flat vector), by autograd on a functional copy."""
    shapes = [p.shape for p in m.parameters()]
    sizes = [p.numel() for p in m.parameters()]
    ws = [t.view(s).clone().requires_grad_(True) for t, s in zip(torch.split(w, sizes), shapes)]
    h = torch.tanh(x.double() @ ws[0].T + ws[1])
    loss = F.cross_entropy(h @ ws[2].T + ws[3], y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ws)])


def reference(schedule, steps, plan=None, batches=None):
    """Plain SGD (no momentum) with the schedule written out: (which steps ascend, the gradient each step used).
    Step t uses ``batches[t]``."""
    m = model()
    w = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    kind, args = (schedule.split(":") + [None])[0], schedule.split(":")[1:]
    gv, sq, ascended, used = None, [], [], []
    for t in range(steps):
        x, y = batches[t]
        g = flat_grad(m, w, x, y)
        if kind == "every":
            due = t % int(args[0]) == 0
        elif kind == "looksam":
            due = t % int(args[0]) == 0
        elif kind == "late":
            due = t >= math.floor((1 - float(args[0])) * plan)
        else:  # aesam: the previous step's |g|^2 against an EMA (momentum 0.9) of the ones before it
            c = float(args[0]) if args else 1.0
            if t < 3:
                due = True
            else:
                mean, var = sq[0], 0.0
                for v in sq[1 : t - 1]:
                    d = v - mean
                    mean, var = mean + 0.1 * d, 0.9 * (var + 0.1 * d * d)
                due = sq[t - 1] > mean + c * math.sqrt(var)
        sq.append(float((g * g).sum()))
        if due:
            gs = flat_grad(m, w + RHO * g / (g.norm() + EPS), x, y)
            if kind == "looksam":
                gv = gs - (g @ gs) / (g @ g) * g
            step = gs
        elif kind == "looksam":
            alpha = float(args[1]) if len(args) > 1 else 0.7
            step = g + alpha * g.norm() / gv.norm() * gv
        else:
            step = g
        w = w - LR * step
        ascended.append(due)
        used.append(step)
    return ascended, used


def run(schedule, steps, plan=None, batches=None, passes="both"):
    m = model()
    opt = SAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, schedule=schedule, closure_passes=passes)
    if plan:
        opt.plan_steps(plan)
    ascended, used = [], []
    for t in range(steps):
        x, y = batches[t]

        def closure(x=x, y=y):
            loss = F.cross_entropy(m(x.double()), y)
            loss.backward()
            return loss

        before = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        due = opt.ascent_due()
        opt.step(closure)
        after = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        ascended.append(due)
        used.append((before - after) / LR)
    return ascended, used, opt


@pytest.mark.parametrize("schedule", ["every:3", "looksam:2", "looksam:3:0.5", "aesam", "aesam:-0.3", "late:0.5"])
def test_each_schedule_against_the_reference_loop(schedule):
    steps = 24
    batches = [data(seed=t, n=8) for t in range(steps)]  # a new mini-batch each step: |g|^2 goes up and down
    want_due, want_used = reference(schedule, steps, plan=20, batches=batches)
    got_due, got_used, opt = run(schedule, steps, plan=20, batches=batches)
    assert got_due == want_due
    assert 0 < sum(got_due) < steps  # the schedule has both kinds of step here
    for a, b in zip(got_used, want_used):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert opt.steps_taken == (steps, sum(want_due))


def test_every_1_is_plain_sam_bit_for_bit():
    x, y = data()
    for passes in ("both", "second"):
        outs = []
        for schedule in (None, "every:1"):
            m = model()
            opt = SAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, schedule=schedule)
            opt.closure_passes = passes
            for _ in range(4):
                if passes == "second":
                    opt.zero_grad()
                    F.cross_entropy(m(x.double()), y).backward()
                opt.step(lambda: F.cross_entropy(m(x.double()), y).backward())
            outs.append([p.detach().clone() for p in m.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("schedule", ["looksam:3", "aesam:0.1", "every:3"])
def test_resume_mid_interval_is_bit_identical(schedule):
    x, y = data(1)

    def build():
        m = model()
        opt = SSAMF(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, sparsity=0.5, schedule=schedule)
        opt.update_mask(m, [(x.double(), y)])
        opt.closure_passes = "both"
        return m, opt

    def closure_of(m):
        return lambda: F.cross_entropy(m(x.double()), y).backward()

    m1, o1 = build()
    for _ in range(7):
        o1.step(closure_of(m1))
    m2, o2 = build()
    for _ in range(4):  # stop between two ascents
        o2.step(closure_of(m2))
    saved_model, saved_opt = m2.state_dict(), o2.state_dict()
    m3, o3 = build()
    m3.load_state_dict(saved_model)
    o3.load_state_dict(saved_opt)
    assert o3.steps_taken == o2.steps_taken
    for _ in range(3):
        o3.step(closure_of(m3))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))


def test_bad_schedules_are_one_line_value_errors():
    for spec, what in (
        ("every:0", "K '0'"),
        ("looksam:2:-1", "ALPHA -1"),
        ("aesam:x", "C 'x'"),
        ("late:0", "FRACTION 0"),
        ("late:1.5", "FRACTION 1.5"),
        ("sometimes", "'sometimes'"),
    ):
        with pytest.raises(ValueError, match=f"schedule: got .*{what}") as e:
            parse_schedule(spec)
        assert "\n" not in str(e.value)
    m = model()
    with pytest.raises(ValueError, match="plan_steps"):
        SAM(m.parameters(), torch.optim.SGD, lr=0.1, schedule="late:0.5").ascent_due()


def test_trainer_counts_passes_and_ascents(tmp_path, one_thread):
    args = ["train", "--output_dir", str(tmp_path), "--quiet", "--epochs", "2", "--limit_train_batches", "4"]
    assert main([*args, "--output_name", "e2", "--opt", "sam-sgd", "--sam_schedule", "every:2"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "e2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ascent_share"] for r in recs] == [0.5, 0.5]
    assert json.loads((tmp_path / "e2" / "summary.json").read_text())["passes_per_example"] == 1.5
    # late:0.5 over the 8 planned steps: the second epoch ascends; a resume with more epochs keeps the boundary.
    assert main([*args, "--output_name", "late", "--opt", "sam-sgd", "--sam_schedule", "late:0.5"]) == 0
    assert main([*args, "--output_name", "late", "--opt", "sam-sgd", "--sam_schedule", "late:0.5", "--resume",
                 "--epochs", "3"]) == 0  # fmt: skip
    recs = [json.loads(x) for x in (tmp_path / "late" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ascent_share"] for r in recs] == [0.0, 1.0, 1.0]


def test_aesam_with_local_first_pass_is_refused(tmp_path, capsys):
    rc = main(["train", "--output_dir", str(tmp_path), "--opt", "sam-sgd", "--sam_schedule", "aesam",
               "--sam_first_pass", "local"])  # fmt: skip
    assert rc == 2 and "--sam_first_pass local" in capsys.readouterr().err
    assert not tmp_path.joinpath("digits").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["aesam:0.2", "looksam:2"])
def test_ddp_ranks_take_the_same_decisions(tmp_path, schedule):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ssam.cli",
           "train", "--output_dir", str(tmp_path), "--output_name", "d", "--opt", "ssamf-sgd", "--epochs", "2",
           "--limit_train_batches", "6", "--quiet", "--device", "cpu", "--sam_schedule", schedule,
           "--update_freq", "1", "--num_samples", "16"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    # A rank that took a plain step while the other ascended would have other weights (or hang in DDP's reducer).
    assert summary["ranks_agree"] is True
    shares = [json.loads(x)["ascent_share"] for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < s <= 1 for s in shares)


def test_a_negative_aesam_c_names_its_run_folder_without_a_double_dash():
    from ssam.train.config import parse_args

    name = parse_args(["--opt", "sam-sgd", "--sam_schedule", "aesam:-1"]).output_name
    assert "_aesam-m1_" in name and "--" not in name
