"""Lightning with automatic optimization against a plain loop built from first_step / second_step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

import ssam  # noqa: E402
from integrations_util import last_value, load_example, run_example  # noqa: E402
from ssam.integrations.lightning import SAMCallback, SAMMixedPrecision  # noqa: E402

OPT_KW = dict(lr=0.1, momentum=0.9, rho=0.05)
SPARSE_KW = {
    "sam-sgd": {},
    "ssamf-sgd": dict(sparsity=0.5, num_samples=16),
    "ssamd-sgd": dict(sparsity=0.5, seed=3, T_end=4),
}


def make_data(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


class Net(L.LightningModule):
    def __init__(self, opt="sam-sgd", sched=False, **kw):
        super().__init__()
        self.net = make_net()
        self.opt_name, self.kw, self.sched = opt, kw, sched

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = ssam.create_optimizer(self, self.opt_name, **OPT_KW, **self.kw)
        if not self.sched:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def fit(module, epochs=2, batch_size=8, callbacks=(), ckpt_path=None, **trainer_kw):
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, L.callbacks.ModelCheckpoint) for c in callbacks),
        callbacks=[SAMCallback(seed=5), *callbacks],
        **trainer_kw,
    )
    trainer.fit(module, DataLoader(make_data(), batch_size=batch_size, shuffle=False), ckpt_path=ckpt_path)
    return trainer


def plain_loop(opt_name, epochs=2, batch_size=8, accum=1, clip=None, sched=False, autocast=None, scaler=None, **kw):
    """SAM by hand: pass one over the micro-batches at w, first_step, pass two at w + e, second_step."""
    net = make_net()
    opt = ssam.create_optimizer(net, opt_name, **OPT_KW, **kw)
    lr_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if sched else None
    data = make_data()
    batches = list(DataLoader(data, batch_size=batch_size // accum, shuffle=False))
    windows = [batches[i : i + accum] for i in range(0, len(batches), accum)]

    def backward(window):
        for x, y in window:
            with torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False):
                loss = F.cross_entropy(net(x), y) / accum
            (scaler.scale(loss) if scaler else loss).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)

    for epoch in range(epochs):
        if opt_name.startswith("ssamf") and (epoch % opt.update_freq == 0 or not opt.has_masks()):
            g = torch.Generator().manual_seed(5 * 7919 + epoch)
            idx = torch.randperm(len(data), generator=g)[: opt.num_samples]
            opt.update_mask(net, [data[idx]])
        for step, window in enumerate(windows):
            opt.zero_grad()
            backward(window)
            if step == 0 and opt_name.startswith("ssamd"):
                opt.update_mask(epoch)
            if not opt.ascent_due():  # a plain step of the schedule: the gradient at w, one pass
                opt.step()
                continue
            if scaler is not None:
                if scaler.first_step(opt):
                    backward(window)
                    scaler.second_step(opt)
                scaler.update()
                continue
            opt.first_step(zero_grad=True)
            backward(window)
            opt.second_step(zero_grad=True)
        if lr_sched:
            lr_sched.step()
    return net, opt


def assert_same_weights(a, b, atol=1e-6):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=atol, rtol=0, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("opt_name", ["sam-sgd", "ssamf-sgd", "ssamd-sgd"])
def test_automatic_optimization_matches_plain_loop(opt_name):
    module = Net(opt_name, **SPARSE_KW[opt_name])
    trainer = fit(module)
    ref, ref_opt = plain_loop(opt_name, **SPARSE_KW[opt_name])
    assert_same_weights(module.net, ref)
    assert float(trainer.callback_metrics["train_loss"]) > 0
    if opt_name != "sam-sgd":
        opt = trainer.optimizers[0]
        assert torch.equal(opt.flat_mask(), ref_opt.flat_mask())
        assert opt.num_updates == ref_opt.num_updates
        assert trainer.callback_metrics["mask_density"].item() == pytest.approx(opt.mask_density())
        assert opt.mask_density() == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_accumulated_window_perturbs_from_all_micro_batches():
    # Lightning: 2 micro-batches of 4 per step; plain loop: the same 8 examples split the same way.
    module = Net("ssamd-sgd", **SPARSE_KW["ssamd-sgd"])
    fit(module, batch_size=4, accumulate_grad_batches=2)
    ref, _ = plain_loop("ssamd-sgd", batch_size=8, accum=2, **SPARSE_KW["ssamd-sgd"])
    assert_same_weights(module.net, ref)
    # Perturbing from the last micro-batch alone would give other weights: the comparison can fail.
    assert not module.net[0].weight.equal(plain_loop("ssamd-sgd", batch_size=4, **SPARSE_KW["ssamd-sgd"])[0][0].weight)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_schedule_takes_one_pass_plain_steps(accum):
    """every:2 under SAMCallback: steps 1, 3, ... are plain, as in the plain loop (with a window: no replay)."""
    kw = dict(SPARSE_KW["ssamd-sgd"], schedule="every:2")
    module = Net("ssamd-sgd", **kw)
    trainer = fit(module, batch_size=8 // accum, accumulate_grad_batches=accum)
    ref, ref_opt = plain_loop("ssamd-sgd", batch_size=8, accum=accum, **kw)
    assert_same_weights(module.net, ref)
    assert trainer.optimizers[0].steps_taken == ref_opt.steps_taken == (12, 6)
    # Ascending on every step gives other weights: the comparison can fail.
    assert not module.net[0].weight.equal(plain_loop("ssamd-sgd", batch_size=8, **SPARSE_KW["ssamd-sgd"])[0][0].weight)


@pytest.mark.slow
def test_gradient_clipping_and_lr_scheduler():
    module = Net("sam-sgd", sched=True)
    trainer = fit(module, epochs=3, gradient_clip_val=0.05)
    ref, ref_opt = plain_loop("sam-sgd", epochs=3, clip=0.05, sched=True)
    assert_same_weights(module.net, ref)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert ref_opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


@pytest.mark.slow
def test_bf16_mixed_matches_autocast_loop():
    module = Net("ssamf-sgd", **SPARSE_KW["ssamf-sgd"])
    fit(module, precision="bf16-mixed")
    ref, _ = plain_loop("ssamf-sgd", autocast=torch.bfloat16, **SPARSE_KW["ssamf-sgd"])
    assert_same_weights(module.net, ref, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("init_scale", [2.0**8, 2.0**120])
def test_fp16_plugin_matches_two_pass_scaler(init_scale):
    # float16 autocast on the CPU: the plugin's logic, not a GPU's numbers (see the module docstring).
    module = Net("sam-sgd")
    plugin = SAMMixedPrecision(device="cpu", scaler=ssam.TwoPassScaler(init_scale=init_scale))
    fit(module, plugins=[plugin])
    scaler = ssam.TwoPassScaler(init_scale=init_scale)
    ref, _ = plain_loop("sam-sgd", autocast=torch.float16, scaler=scaler)
    assert_same_weights(module.net, ref, atol=1e-5)
    assert plugin.scaler.skipped_steps == scaler.skipped_steps
    assert (scaler.skipped_steps > 0) == (init_scale > 2.0**100)


@pytest.mark.slow
@pytest.mark.parametrize("opt_name", ["ssamd-sgd", "ssamf-sgd"])
def test_resume_from_lightning_checkpoint_is_bit_exact(tmp_path, opt_name):
    kw = SPARSE_KW[opt_name]
    whole = Net(opt_name, **kw)
    t_whole = fit(whole, epochs=3)
    first = Net(opt_name, **kw)
    fit(first, epochs=1, callbacks=[L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    resumed = Net(opt_name, **kw)
    with torch.no_grad():  # a different start, so only the checkpoint can make it equal
        for p in resumed.parameters():
            p.add_(1.0)
    t_resumed = fit(resumed, epochs=3, ckpt_path=str(tmp_path / "last.ckpt"))
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    a, b = t_whole.optimizers[0], t_resumed.optimizers[0]
    assert torch.equal(a.flat_mask(), b.flat_mask())
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a.base_optimizer.state[p]["momentum_buffer"], b.base_optimizer.state[q]["momentum_buffer"])
    if opt_name == "ssamd-sgd":
        assert torch.equal(a._generator.get_state(), b._generator.get_state())


def test_without_sam_optimizer_the_callback_says_so():
    class Plain(Net):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="no SAM"):
        fit(Plain(), epochs=1)


class NoForward(Net):
    """training_step calls the submodule; the LightningModule itself has no forward()."""

    forward = L.LightningModule.forward  # undo Net's

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss


def start(callback, module, opt_name):
    """The callback's on_fit_start against a stand-in trainer holding the module's optimizer."""
    opt = ssam.create_optimizer(module, opt_name, **OPT_KW, **SPARSE_KW[opt_name])
    trainer = type("T", (), {"optimizers": [opt], "accumulate_grad_batches": 1})()
    callback.on_fit_start(trainer, module)
    return opt


def test_ssamf_without_forward_names_fisher_model():
    with pytest.raises(ValueError, match=r"NoForward defines no forward\(\); pass SAMCallback\(fisher_model=") as e:
        start(SAMCallback(), NoForward("ssamf-sgd"), "ssamf-sgd")
    assert "\n" not in str(e.value)
    # With fisher_model, or with an optimizer that measures no Fisher, nothing is missing.
    assert start(SAMCallback(fisher_model=lambda m: m.net), NoForward(), "ssamf-sgd").closure_passes == "both"
    for opt_name in ("sam-sgd", "ssamd-sgd"):
        assert start(SAMCallback(), NoForward(), opt_name).closure_passes == "both"


def test_fisher_model_must_be_a_function_returning_a_module():
    module = NoForward()
    with pytest.raises(ValueError, match="fisher_model=.*got Sequential; allowed: a function"):
        SAMCallback(fisher_model=module.net)
    with pytest.raises(ValueError, match="fisher_model=.*got str"):
        SAMCallback(fisher_model="net")
    with pytest.raises(ValueError, match="returned NoneType; allowed: an nn.Module"):
        start(SAMCallback(fisher_model=lambda m: None), module, "ssamf-sgd")


@pytest.mark.slow
def test_fisher_model_measures_the_submodule_like_forward():
    """SSAM-F on a module without forward(), measured through fisher_model: the same weights and masks as the plain
    loop (and as the module with forward, test_automatic_optimization_matches_plain_loop)."""
    module = NoForward("ssamf-sgd", **SPARSE_KW["ssamf-sgd"])
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[SAMCallback(seed=5, fisher_model=lambda m: m.net)],
    )
    trainer.fit(module, DataLoader(make_data(), batch_size=8, shuffle=False))
    ref, ref_opt = plain_loop("ssamf-sgd", **SPARSE_KW["ssamf-sgd"])
    assert_same_weights(module.net, ref)
    opt = trainer.optimizers[0]
    assert opt.num_updates == ref_opt.num_updates == 2
    assert torch.equal(opt.flat_mask(), ref_opt.flat_mask())


@pytest.mark.slow
def test_ssamf_without_forward_stops_fit_in_one_line():
    """Through Trainer.fit: the callback's line, not torch's 'missing the required forward function'."""
    with pytest.raises(ValueError, match="fisher_model"):
        fit(NoForward("ssamf-sgd", **SPARSE_KW["ssamf-sgd"]), epochs=1)


@pytest.mark.slow
def test_example_lightning_runs():
    out = run_example("lightning_ssam.py", "--epochs", "3")
    first, last = last_value(out, "loss")
    assert last < first


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    # Lightning's DistributedSampler shuffles with seed 0 (seed_everything) reseeded by the epoch; rank r takes
    # perm[r::2], so a step's 2 x 8 examples are perm[16 s : 16 s + 16]. With both passes synchronised, that is one
    # process stepping on those 16 (mean gradient of the same examples).
    out = tmp_path / "ddp.pt"
    run_example(
        "lightning_ssam.py",
        "--epochs",
        "2",
        "--devices",
        "2",
        "--opt",
        "ssamd-sgd",
        "--batch_size",
        "8",
        "--save",
        str(out),
    )
    ex = load_example("lightning_ssam.py")
    L.seed_everything(0, verbose=False)
    model = ex.Classifier("ssamd-sgd", 0.05)
    opt = ssam.create_optimizer(
        model,
        "ssamd-sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        no_decay_bias_norm=True,
        rho=0.05,
        sparsity=0.5,
        seed=0,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
    data = ex.synthetic()
    for epoch in range(2):
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
        for step in range(len(data) // 16):
            x, y = data[perm[16 * step : 16 * step + 16]]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if step == 0:
                opt.update_mask(epoch)
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        sched.step()
    got = torch.load(out)
    assert torch.equal(got["mask"], opt.flat_mask())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["model"][k], v, atol=1e-5, rtol=0, msg=k)


def one_pass_loop(ascent, epochs=2, batch_size=8):
    """A one-pass direction by hand: first_step (no gradient needed), one pass at w + e, second_step."""
    net = make_net()
    opt = ssam.create_optimizer(net, "sam-sgd", **OPT_KW, ascent=ascent)
    data = make_data()
    for _ in range(epochs):
        for i in range(0, len(data), batch_size):
            x, y = data[i : i + batch_size]
            opt.zero_grad()
            opt.first_step()
            F.cross_entropy(net(x), y).backward()
            opt.second_step()
    return net


@pytest.mark.slow
@pytest.mark.parametrize("ascent", ["previous", "momentum", "msam"])
def test_one_pass_direction_matches_the_hand_loop_with_one_forward_per_step(ascent):
    module = Net(ascent=ascent)
    calls = []
    forward = module.forward
    module.forward = lambda x: calls.append(1) or forward(x)
    fit(module)
    assert_same_weights(module.net, one_pass_loop(ascent))
    assert len(calls) == 2 * 6  # two epochs of six batches, one forward each


@pytest.mark.parametrize(
    "kw, says",
    [
        ({"ascent": "subbatch:0.5"}, "ascent 'subbatch:0.5' is not supported under Lightning"),
        ({"ascent": "previous", "accum": 2}, "with accumulate_grad_batches=2"),
    ],
)
def test_directions_lightning_cannot_drive_are_refused_in_one_line(kw, says):
    accum = kw.pop("accum", 1)
    with pytest.raises(ValueError, match=says):
        fit(Net(**kw), epochs=1, accumulate_grad_batches=accum)
