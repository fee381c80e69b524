"""The shared fine-tuning loop: seeded steps, checkpoints of one configuration only, resume."""

import logging
from types import SimpleNamespace

import pytest
import torch

from conftest import CountedCalls
from pipeline import PipelineError, finetune
from pipeline.rng import torch_generator


def toy_run(checkpoint: finetune.Checkpoint | None, steps: int = 6, every: int = 2):
    weight = torch.nn.Parameter(torch.zeros(3))
    run = finetune.FineTune("toy", {"weight": weight}, finetune.adamw([weight], 0.1), steps, torch.device("cpu"), torch.float32,
                            checkpoint, every)  # fmt: skip
    return weight, run


def toy_loss(weight):
    def step_loss(step: int):
        target = 1 + 0.1 * torch.randn(3, generator=torch_generator(7, "toy", step))
        loss = ((weight - target) ** 2).sum()
        return loss, (loss.detach(),)

    return step_loss


def test_a_killed_run_resumes_to_the_weights_and_rows_of_an_uninterrupted_one(tmp_path):
    weight, run = toy_run(None)
    expected_rows = run.run(toy_loss(weight))
    expected = weight.detach().clone()
    assert len(expected_rows) == 6 and expected_rows[-1][0] < expected_rows[0][0]

    checkpoint = finetune.Checkpoint(tmp_path / "ckpt" / "state.pt", "config-a")
    weight, run = toy_run(checkpoint)
    step = CountedCalls(toy_loss(weight), kill_at=4)
    with pytest.raises(KeyboardInterrupt):
        run.run(step)
    assert torch.load(checkpoint.path, weights_only=True)["step"] == 2

    weight, run = toy_run(checkpoint)
    assert run.start == 2 and not run.finished
    step = CountedCalls(toy_loss(weight))
    assert run.run(step, extra={"kept": torch.ones(2)}) == expected_rows
    assert step.calls == 4 and torch.equal(weight.detach(), expected)

    weight, run = toy_run(checkpoint)
    assert run.finished and torch.equal(weight.detach(), expected) and torch.equal(run.extra["kept"], torch.ones(2))


def test_a_checkpoint_of_another_configuration_is_ignored_with_a_warning(tmp_path, caplog):
    weight, run = toy_run(finetune.Checkpoint(tmp_path / "state.pt", "config-a"))
    run.run(toy_loss(weight))
    with caplog.at_level(logging.WARNING):
        weight, run = toy_run(finetune.Checkpoint(tmp_path / "state.pt", "config-b"))
    assert run.start == 0 and torch.equal(weight.detach(), torch.zeros(3))
    assert "belongs to another configuration" in caplog.text


def test_the_target_follows_the_schedulers_prediction_type():
    from diffusers import DDPMScheduler

    latents, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 500])
    noisy, target = finetune.noised(DDPMScheduler(), latents, noise, t, "m")
    assert torch.equal(target, noise) and not torch.equal(noisy, latents)
    v_scheduler = DDPMScheduler(prediction_type="v_prediction")
    _, target = finetune.noised(v_scheduler, latents, noise, t, "m")
    assert torch.allclose(target, v_scheduler.get_velocity(latents, noise, t))
    with pytest.raises(PipelineError, match=r"m: scheduler prediction_type 'sample' is not supported"):
        finetune.noised(SimpleNamespace(config=SimpleNamespace(prediction_type="sample")), latents, noise, t, "m")
