"""What every adaptation of the diffusion model shares: textual inversion, DreamBooth-LoRA, ESD
erasure and the MVC image-conditioned fine-tune all optimise a loss of the UNet's prediction over
cached latents, one seeded step after another, and must resume a killed job to bitwise the weights
of an uninterrupted one. Each method's module keeps only what is its own: the trainable parameters,
the optimiser's settings and the loss of one step.

* `LatentCache`: the VAE's latent distribution of every training image, encoded once; each step
  draws its latents from it (mean + std * eps), as `latent_dist.sample()` would.
* `noised`: the noisy latents and the training target (epsilon or v, as the checkpoint's scheduler
  says) for given noise and timesteps.
* `Checkpoint`: a fingerprinted state file beside the output; a file of another configuration
  (settings, images, code numerics) is ignored, not resumed from.
* `FineTune`: the loop. The method gives it a function of the step number returning that step's
  loss and what to log of it; every random draw of step s must come from a generator seeded by
  (run key, s), so that the steps after a resume draw what they would have drawn. Mixed precision:
  the trainable parameters and the optimiser state stay fp32, the loss is scaled when the frozen
  weights run in fp16 (a no-op in fp32 and bf16).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import PipelineError
from pipeline.io import atomic_path
from pipeline.progress import progress

log = logging.getLogger(__name__)

# AdamW settings of diffusers' training examples (textual_inversion, dreambooth, instruct_pix2pix).
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHT_DECAY = 1e-2
ADAM_EPS = 1e-8
LOG_EVERY = 100


CHECKPOINT_FILE = "checkpoint.pt"  # in a checkpoint folder of a stage that runs one fine-tune


def checkpoint_dir_for(out_dir: Path) -> Path:
    """Where a stage's resumable state lives while it writes `out_dir`: beside it, `<out_dir>.ckpt/`."""
    return out_dir.with_name(out_dir.name + ".ckpt")


def adamw(params: list[nn.Parameter], learning_rate: float, weight_decay: float = ADAM_WEIGHT_DECAY) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=learning_rate, betas=ADAM_BETAS, weight_decay=weight_decay, eps=ADAM_EPS)


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to the frozen weights' dtype on an accelerator; nothing in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@dataclass
class LatentCache:
    """Latent distributions [n, c, h, w] (fp32) of n training images."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, distributions: list) -> LatentCache:
        """From diffusers' DiagonalGaussianDistribution objects, in order."""
        return cls(torch.cat([d.mean.float() for d in distributions]), torch.cat([d.std.float() for d in distributions]))

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[1:])

    def sample(self, rows: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Latents of images `rows` with standard-normal `eps` (drawn by the caller's generator)."""
        eps = eps.to(self.mean.device)
        return self.mean[rows] + self.std[rows] * eps


def noised(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, model_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy latents, the UNet's training target) for clean scaled `latents`."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise PipelineError(f"{model_id}: scheduler prediction_type {prediction_type!r} is not supported. Expected epsilon or v_prediction.")
    return scheduler.add_noise(latents, noise, timesteps), target


class Checkpoint:
    """The saved state of one fine-tuning run, valid only for the configuration `fingerprint` names."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint

    def load(self, device: torch.device) -> dict | None:
        """The saved state, or None when there is none or it belongs to another configuration."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location=device, weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring checkpoint %s: it belongs to another configuration", self.path)
            return None
        return state

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save({"fingerprint": self.fingerprint, **state}, tmp)


def _floats(record) -> tuple[float, ...]:
    return tuple(float(value) for value in record)


class FineTune:
    """A resumable optimisation of the named trainable `params` (fp32) for `steps` steps.

    With `checkpoint`, the state (parameters, optimiser, loss scaler, logged rows and `extra`, any
    tensors the method wants back on resume) is saved every `checkpoint_every` steps and, with
    `save_when_done`, when the run is done (a job of several runs keeps a finished run's result
    while a later one trains; a job of one run writes its output next and needs no such copy), and
    a matching saved state is resumed from: `start` tells the step it resumes at, `extra` what it
    saved, `finished` whether nothing is left to do.

    `to_row` turns what a step returns to log (kept on the device until the next milestone, so
    steps do not wait for the host) into that step's row; the first value of a row is the loss
    the progress log reports.
    """

    def __init__(
        self,
        label: str,
        params: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        steps: int,
        device: torch.device,
        dtype: torch.dtype,
        checkpoint: Checkpoint | None = None,
        checkpoint_every: int = 0,
        to_row: Callable[[Any], Any] = _floats,
        loss_name: str = "loss",
        save_when_done: bool = True,
    ):
        self.label, self.params, self.optimizer, self.steps = label, params, optimizer, steps
        self.checkpoint, self.checkpoint_every, self.to_row, self.loss_name = checkpoint, checkpoint_every, to_row, loss_name
        self.save_when_done = save_when_done
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.rows: list = []
        self.start = 0
        self.extra: dict = {}
        state = checkpoint.load(device) if checkpoint is not None else None
        if state is not None:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(state["params"][name])
            optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.rows, self.start, self.extra = list(state["rows"]), state["step"], dict(state["extra"])
            log.info("resuming %s at step %d/%d from %s", label, self.start, steps, checkpoint.path)

    @property
    def finished(self) -> bool:
        return self.start >= self.steps

    def run(self, step_loss: Callable[[int], tuple[torch.Tensor, Any]], extra: dict | None = None) -> list:
        """Train from `start` to `steps`; `step_loss(step)` returns (loss to minimise, what to log).
        Returns every step's row, those of a resumed run included."""
        pending: list = []

        def flush() -> None:
            self.rows += [self.to_row(record) for record in pending]
            pending.clear()

        for step in progress(range(self.start, self.steps), total=self.steps - self.start, desc=self.label):
            loss, record = step_loss(step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            pending.append(record)
            done = step + 1
            if done % LOG_EVERY == 0:
                flush()
                recent = [row[0] for row in self.rows[-LOG_EVERY:]]
                log.info("%s step %d/%d: %s %.5f (mean of the last %d)", self.label, done, self.steps, self.loss_name,
                         sum(recent) / len(recent), len(recent))  # fmt: skip
            periodic = self.checkpoint_every and done % self.checkpoint_every == 0 and done < self.steps
            if self.checkpoint is not None and (periodic or (done == self.steps and self.save_when_done)):
                flush()
                self.checkpoint.save({
                    "step": done,
                    "params": {name: param.detach() for name, param in self.params.items()},
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rows": self.rows,
                    "extra": extra or {},
                })  # fmt: skip
        flush()
        self.start = self.steps
        return self.rows
