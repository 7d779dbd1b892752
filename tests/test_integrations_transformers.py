"""SAMTrainer (Hugging Face Trainer) against a plain first_step / second_step loop; resume; bf16; the example."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import SequentialSampler

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainingArguments  # noqa: E402
from transformers.data.data_collator import default_data_collator  # noqa: E402

from integrations_util import last_value, load_example, run_example  # noqa: E402
from ssam.integrations.transformers import SAMTrainer  # noqa: E402

example = load_example("hf_trainer_ssam.py")


class OrderedTrainer(SAMTrainer):
    """Batches in dataset order, so that a plain loop can see the same ones."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def args_for(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        num_train_epochs=1,
        per_device_train_batch_size=16,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kw})


def plain_loop(data, opt_name, batch_size, accum, epochs=1, **sam_kw):
    import ssam

    model = example.tiny_bert()
    opt = ssam.create_optimizer(model, opt_name, lr=0.05, no_decay_bias_norm=True, **sam_kw)
    micro = [default_data_collator(data[i : i + batch_size]) for i in range(0, len(data), batch_size)]
    windows = [micro[i : i + accum] for i in range(0, len(micro), accum)]

    def backward(window):
        for b in window:
            (model(**b).loss / len(window)).backward()

    model.train()
    for epoch in range(epochs):
        for step, window in enumerate(windows):
            opt.zero_grad()
            backward(window)
            if step == 0 and opt_name.startswith("ssamd"):
                opt.update_mask(epoch)
            if not opt.ascent_due():  # a plain step of the schedule
                opt.step()
                opt.zero_grad()
                continue
            opt.first_step(zero_grad=True)
            backward(window)
            opt.second_step(zero_grad=True)
    return model


def train(tmp_path, sam, accum=1, batch_size=16, epochs=1, resume=None, **kw):
    trainer = OrderedTrainer(
        example.tiny_bert(),
        args_for(
            tmp_path,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accum,
            num_train_epochs=epochs,
            **kw,
        ),
        train_dataset=example.synthetic(64),
        sam=sam,
    )
    # BERT's classification loss ignores the Trainer's token count, so let the Trainer average over micro-batches.
    trainer.model_accepts_loss_kwargs = False
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_sam_trainer_matches_plain_loop(tmp_path, accum):
    sam = {"opt": "ssamd-sgd", "rho": 0.1, "sparsity": 0.5, "seed": 2, "T_end": 4}
    trainer = train(tmp_path, sam, accum=accum, batch_size=16 // accum)
    ref = plain_loop(example.synthetic(64), "ssamd-sgd", 16 // accum, accum, rho=0.1, sparsity=0.5, seed=2, T_end=4)
    for (n, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-5, rtol=0, msg=n)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(h["mask_density"] == pytest.approx(0.5, abs=0.01) for h in logged)


@pytest.mark.slow
def test_schedule_takes_plain_steps_with_one_pass(tmp_path):
    sam = {"opt": "ssamd-sgd", "rho": 0.1, "sparsity": 0.5, "seed": 2, "T_end": 4, "schedule": "every:2"}
    trainer = train(tmp_path, sam, accum=2, batch_size=8)
    kw = dict(rho=0.1, sparsity=0.5, seed=2, T_end=4)
    ref = plain_loop(example.synthetic(64), "ssamd-sgd", 8, 2, schedule="every:2", **kw)
    for (n, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-5, rtol=0, msg=n)
    assert trainer.sam.steps_taken == (4, 2)


@pytest.mark.slow
def test_resume_continues_where_the_checkpoint_left(tmp_path):
    sam = {"opt": "ssamd", "rho": 0.05, "sparsity": 0.5, "seed": 1}
    whole = train(tmp_path / "whole", sam, epochs=2)
    train(tmp_path / "part", sam, epochs=1, save_strategy="epoch")
    ckpt = tmp_path / "part" / "checkpoint-4"
    assert (ckpt / "optimizer.pt").exists()
    resumed = train(tmp_path / "part", sam, epochs=2, resume=str(ckpt))
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert torch.equal(whole.sam.flat_mask(), resumed.sam.flat_mask())
    assert resumed.sam.num_updates == whole.sam.num_updates == 2


@pytest.mark.slow
def test_bf16_trains(tmp_path):
    trainer = train(
        tmp_path,
        {"opt": "ssamf", "sparsity": 0.5, "num_samples": 16},
        bf16=True,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert trainer.sam.mask_density() == pytest.approx(0.5, abs=0.01)


def test_fp16_and_plain_optimizers_are_refused(tmp_path):
    args = args_for(tmp_path)
    object.__setattr__(args, "fp16", True)  # (fp16 arguments themselves need a GPU to be built)
    with pytest.raises(ValueError, match="fp16"):
        SAMTrainer(example.tiny_bert(), args, train_dataset=example.synthetic(8), sam={"opt": "sam"})
    with pytest.raises(ValueError, match="plain optimizer"):
        train(tmp_path, {"opt": "adamw"})


@pytest.mark.slow
def test_example_loss_falls():
    out = run_example("hf_trainer_ssam.py", "--opt", "ssamf", "--epochs", "3")
    first, last = last_value(out, "loss")
    assert last < first
    assert last_value(out, "mask_density") == [pytest.approx(0.5, abs=0.01)]


def one_pass_or_subbatch_loop(data, ascent, batch_size, accum):
    """By hand: pass one on the first ceil(F b) examples of each micro-batch (subbatch) or none (a stored
    direction), first_step, the window at w + e, second_step."""
    import ssam

    model = example.tiny_bert()
    opt = ssam.create_optimizer(
        model, "sam-sgd", lr=0.05, no_decay_bias_norm=True, rho=0.1, ascent=ascent, momentum=0.9
    )
    micro = [default_data_collator(data[i : i + batch_size]) for i in range(0, len(data), batch_size)]
    windows = [micro[i : i + accum] for i in range(0, len(micro), accum)]
    model.train()
    for window in windows:
        opt.zero_grad()
        if not opt.direction.one_pass:
            for b in window:
                k = opt.direction.pass_one_size(len(b["labels"]))
                (model(**{n: v[:k] for n, v in b.items()}).loss / len(window)).backward()
        opt.first_step(zero_grad=True)
        for b in window:
            (model(**b).loss / len(window)).backward()
        opt.second_step(zero_grad=True)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("ascent, accum", [("momentum", 1), ("previous", 2), ("subbatch:0.5", 2)])
def test_sam_trainer_directions_match_the_hand_loop(tmp_path, ascent, accum):
    trainer = train(
        tmp_path, {"opt": "sam-sgd", "rho": 0.1, "ascent": ascent, "momentum": 0.9}, accum=accum, batch_size=16 // accum
    )
    ref = one_pass_or_subbatch_loop(example.synthetic(64), ascent, 16 // accum, accum)
    for (n, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-5, rtol=0, msg=n)
