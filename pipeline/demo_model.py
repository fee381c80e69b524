"""The demo model: a small Stable Diffusion 1.x-architecture text-to-image model that has learned the
demo domain, trained by the project itself, offline, on a CPU.

Why it exists. A randomly initialised model draws noise, so on it no method can be shown to do what
its paper says. This one is what the embedded default generates with and what every method's
*effect* is measured on (oracle agreement, FID by t0, pixel distances, CAS; `pipeline.oracle`).

The setting mirrors DA-Fusion's. The corpus (`demo.pretraining_corpus`) is drawn like the demo's
scenes, but only from the `pretrain` share of each class's MNIST digits, which no demo split uses.
Its captions name five classes ("a photo of a red three and a blue digit") and call the other five
only "digit": the model learns to draw every class but can name only half of them, so the
pseudo-word of an unnamed class can only come from textual inversion (the paper's Leafy Spurge), while
the named classes give Real Guidance and concept erasure a name to act on. One caption in
`caption_dropout` is empty, so classifier-free guidance has an unconditional model to push from.

Training, in two phases, each seeded and deterministic on CPU (batch draws and noise come from
(seed, phase, step) alone, so a resumed run is bitwise an uninterrupted one):

1. `vae`: an AutoencoderKL (factor 4: 64 px images, 16x16x4 latents) on reconstruction (MSE) plus a
   small KL term, on seeded random crops (`vae_crop`); its `scaling_factor` is then set to 1 / std
   of the corpus latents, as SD's is.
2. `unet`: the CLIP text encoder (CLIP's BPE tokenizer from open-clip-torch, as `tiny_sd`) and the
   UNet with cross-attention, jointly, on SD's noise-prediction loss over the cached latents, with
   SD 1.4's training noise schedule.

On a GPU (`device`), the modules are initialised on the CPU and every draw still comes from the CPU's
seeded generators, so a CUDA run sees a CPU run's batches and noise; CUDA's kernels do not repeat the
CPU's last bits, and the device is part of the settings a checkpoint must match.

Checkpoints go to `<out>.partial/` every `checkpoint_every` steps; a killed run started again with
the same settings resumes from the last one. The saved folder is a plain diffusers checkpoint (PNDM
scheduler with SD 1.4's settings) loaded with `from_pretrained` like `CompVis/stable-diffusion-v1-4`.
`demo_model.json` beside it records the settings, the losses, the MNIST indices of the corpus and the
sha256 of every weights file, which `verify_checkpoint` checks at load time.
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.checkpoint import INFO_FILE, weight_hashes
from pipeline.device import resolve_device
from pipeline.io import atomic_path, grant_umask_permissions, write_json
from pipeline.progress import progress
from pipeline.rng import numpy_rng, torch_generator

log = logging.getLogger(__name__)

LOSS_FILE = "loss.csv"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that changes the demo model's weights (the config's `demo_model` section)."""

    seed: int
    resolution: int
    corpus_images: int
    max_objects: int
    named_classes: tuple[str, ...]
    caption_dropout: float
    vae_steps: int
    vae_batch_size: int
    vae_learning_rate: float
    vae_crop: int
    kl_weight: float
    unet_steps: int
    unet_batch_size: int
    unet_learning_rate: float
    warmup_steps: int
    cpu_threads: int  # torch's compute threads (pinned by the CLI): they move the weights' last bits
    checkpoint_every: int
    device: str = "cpu"  # "cpu" or "cuda": CUDA kernels give other last bits, and are not bitwise repeatable

    @classmethod
    def from_config(cls, config: dict) -> PretrainSettings:
        section = config["demo_model"]
        return cls(
            seed=config["seed"],
            resolution=config["model"]["resolution"],
            corpus_images=section["corpus_images"],
            max_objects=config["dataset"]["demo"]["max_objects"],
            named_classes=tuple(section["named_classes"]),
            caption_dropout=section["caption_dropout"],
            vae_steps=section["vae"]["steps"],
            vae_batch_size=section["vae"]["batch_size"],
            vae_learning_rate=section["vae"]["learning_rate"],
            vae_crop=section["vae"]["crop"],
            kl_weight=section["vae"]["kl_weight"],
            unet_steps=section["unet"]["steps"],
            unet_batch_size=section["unet"]["batch_size"],
            unet_learning_rate=section["unet"]["learning_rate"],
            warmup_steps=section["unet"]["warmup_steps"],
            cpu_threads=config["cpu_threads"],
            checkpoint_every=section["checkpoint_every"],
            device=resolve_device(config["device"]).type,
        )

    def key(self) -> dict:
        """What a checkpoint must match to be resumed: every field but the checkpoint interval."""
        return {k: v for k, v in asdict(self).items() if k != "checkpoint_every"}


def demo_architecture(resolution: int) -> dict[str, dict]:
    """Constructor arguments of the demo model's text encoder, VAE and UNet (SD 1.x's block types)."""
    return {
        "text_encoder": {
            "hidden_size": 48,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (16, 32, 64),
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": resolution,
        },
        "unet": {
            "sample_size": resolution // 4,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 48,
            # diffusers reads this as the number of heads; 2 wide heads instead of 8 of width 4-8,
            # because CPU attention over 4-wide heads took 45% of a training step (1.75x the time)
            "attention_head_dim": 2,
            "norm_num_groups": 16,
        },
    }


# -- corpus ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    images: torch.Tensor  # (N, 3, R, R) uint8
    input_ids: torch.Tensor  # (N, 77) CLIP token ids of the captions
    empty_ids: torch.Tensor  # (77,) ids of the empty caption (classifier-free guidance)
    captions: list[str]
    labels: np.ndarray


def render_corpus(settings: PretrainSettings, tokenizer) -> Corpus:
    from pipeline.demo import pretraining_corpus

    images, captions, labels = [], [], []
    scenes = pretraining_corpus(settings.corpus_images, settings.resolution, settings.max_objects, settings.seed, settings.named_classes)
    for scene in progress(scenes, total=settings.corpus_images, desc="demo model corpus"):
        images.append(scene.image)
        captions.append(scene.caption)
        labels.append(scene.label)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    tokens = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return Corpus(pixels, tokens(captions), tokens([""])[0], captions, np.array(labels))


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, R, R) -> float32 in [-1, 1], as the SD pipelines feed the VAE."""
    return images.float().div(127.5).sub(1.0)


def corpus_indices() -> list[int]:
    """The MNIST indices the corpus draws from (recorded with the model, checked against the demo)."""
    from pipeline.demo import load_mnist, split_digit_pools

    _, labels = load_mnist()
    return sorted(int(i) for pool in split_digit_pools(labels)["pretrain"] for i in pool)


# -- training --------------------------------------------------------------------------------------


def _batch_indices(settings: PretrainSettings, phase: str, step: int, batch_size: int) -> np.ndarray:
    return numpy_rng(settings.seed, "demo-model", phase, step).integers(0, settings.corpus_images, size=batch_size)


def random_crop(images: torch.Tensor, size: int, settings: PretrainSettings, step: int) -> torch.Tensor:
    """One seeded `size` x `size` window of the whole batch (the full images when size covers them).

    The VAE is convolutional, so it learns the same filters from crops, at a fraction of the cost
    per update; updates, not pixels, are what its training is short of here."""
    if size >= images.shape[-1]:
        return images
    top, left = (int(v) for v in numpy_rng(settings.seed, "demo-model", "crop", step).integers(0, images.shape[-1] - size + 1, size=2))
    return images[..., top : top + size, left : left + size]


def _learning_rate(base: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress_share = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_share)))


def vae_step(vae, batch: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    posterior = vae.encode(batch).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(batch.device)
    latents = posterior.mean + posterior.std * noise
    reconstruction = vae.decode(latents).sample
    return F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()


def unet_step(text_encoder, unet, scheduler, latents, input_ids, generator: torch.Generator) -> torch.Tensor:
    # drawn on the CPU generator whatever the device: a CUDA run sees the noise a CPU run sees
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden = text_encoder(input_ids)[0]
    return F.mse_loss(unet(noisy, timesteps, hidden).sample, noise)


class _Run:
    """The modules, optimisers and loss log of one pretraining run, saved and restored as a checkpoint."""

    def __init__(self, settings: PretrainSettings, tokenizer, partial_dir: Path):
        from pipeline.tiny_sd import build_modules

        torch.manual_seed(settings.seed)
        self.settings, self.partial_dir = settings, partial_dir
        # initialised on the CPU, then moved: a CUDA run starts from the CPU run's weights
        modules = build_modules(demo_architecture(settings.resolution), tokenizer)
        self.text_encoder, self.vae, self.unet = (module.to(settings.device) for module in modules)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
        unet_params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.unet_opt = torch.optim.AdamW(unet_params, lr=settings.unet_learning_rate, weight_decay=1e-2)
        self.done = {"vae": 0, "unet": 0}
        self.losses: list[tuple[str, int, float]] = []
        self.seconds = {"vae": 0.0, "unet": 0.0}

    def state(self) -> dict:
        return {
            "key": self.settings.key(),
            "modules": {name: getattr(self, name).state_dict() for name in ("text_encoder", "vae", "unet", "vae_opt", "unet_opt")},
            "done": self.done,
            "losses": self.losses,
            "seconds": self.seconds,
        }

    def save(self) -> None:
        tmp = self.partial_dir / (CHECKPOINT_FILE + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(self.partial_dir / CHECKPOINT_FILE)

    def restore(self) -> bool:
        path = self.partial_dir / CHECKPOINT_FILE
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=False, map_location=self.settings.device)
        if state["key"] != self.settings.key():
            log.warning("discarding %s: it was written with other settings", path)
            return False
        for name, values in state["modules"].items():
            getattr(self, name).load_state_dict(values)
        self.done, self.losses, self.seconds = state["done"], [tuple(r) for r in state["losses"]], state["seconds"]
        log.info("resuming demo model pretraining from %s (vae step %d, unet step %d)", path, self.done["vae"], self.done["unet"])
        return True


def _train_phase(run: _Run, phase: str, steps: int, batch_size: int, base_lr: float, warmup: int, optimizer, loss_of) -> None:
    settings = run.settings
    start, clock = run.done[phase], time.perf_counter()
    pending: list[tuple[int, torch.Tensor]] = []  # losses still on the device: reading each one would wait on the GPU every step

    def flush() -> None:
        if pending:
            values = torch.stack([loss for _, loss in pending]).tolist()
            run.losses.extend((phase, step, value) for (step, _), value in zip(pending, values))
            pending.clear()

    milestone_clock, milestone_step = clock, start
    for step in progress(range(start, steps), total=steps - start, desc=f"demo model {phase}"):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(base_lr, step, steps, warmup)
        indices = torch.from_numpy(_batch_indices(settings, phase, step, batch_size)).to(settings.device)
        loss = loss_of(indices, step, torch_generator(settings.seed, "demo-model", phase, "noise", step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pending.append((step, loss.detach()))
        run.done[phase] = step + 1
        if (step + 1) % 100 == 0:
            flush()
            recent = [r[2] for r in run.losses[-100:]]
            now = time.perf_counter()
            seconds_per_step = (now - milestone_clock) / (step + 1 - milestone_step)
            log.info("%s step %d/%d: loss %.4f (mean of last 100), %.3f s/step", phase, step + 1, steps, sum(recent) / len(recent), seconds_per_step)
            milestone_clock, milestone_step = now, step + 1
        if (step + 1) % settings.checkpoint_every == 0 and step + 1 < steps:
            flush()
            run.seconds[phase] += time.perf_counter() - clock
            clock = time.perf_counter()
            run.save()
    flush()
    run.seconds[phase] += time.perf_counter() - clock


@torch.no_grad()
def encode_corpus(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The posterior means of uint8 `images`, unscaled."""
    return torch.cat([vae.encode(to_unit_range(images[i : i + batch_size])).latent_dist.mean for i in range(0, len(images), batch_size)])


def pretrain_demo_model(settings: PretrainSettings, out_dir: str | Path, tokenizer_files: str | Path | None = None) -> Path:
    """Train the demo model with `settings` and save it at `out_dir` (atomically) in diffusers format.

    `tokenizer_files`: a folder with CLIP's vocab.json and merges.txt, for machines without
    open-clip-torch (the lent GPU machine); by default they are written from open-clip-torch's BPE file."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from pipeline.tiny_sd import _sd14_scheduler, _tokenizer_files

    out_dir = Path(out_dir)
    partial_dir = out_dir.with_name(out_dir.name + ".partial")
    partial_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = _tokenizer_files(tokenizer_files, partial_dir / "bpe")
    tokenizer = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77)
    corpus = render_corpus(settings, tokenizer)
    device = torch.device(settings.device)
    images, input_ids, empty_ids = corpus.images.to(device), corpus.input_ids.to(device), corpus.empty_ids.to(device)

    run = _Run(settings, tokenizer, partial_dir)
    run.restore()
    vae, text_encoder, unet = run.vae, run.text_encoder, run.unet

    vae.train()
    _train_phase(
        run, "vae", settings.vae_steps, settings.vae_batch_size, settings.vae_learning_rate, 0, run.vae_opt,
        lambda idx, step, gen: vae_step(vae, to_unit_range(random_crop(images[idx], settings.vae_crop, settings, step)), settings.kl_weight, gen),
    )
    vae.eval().requires_grad_(False)
    latents = encode_corpus(vae, images)
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor

    train_scheduler = DDPMScheduler(**{k: _sd14_scheduler().config[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")})

    def unet_loss(idx, step, generator):
        ids = input_ids[idx].clone()
        dropped = numpy_rng(settings.seed, "demo-model", "dropout", step).random(len(idx)) < settings.caption_dropout
        ids[torch.from_numpy(dropped).to(device)] = empty_ids
        return unet_step(text_encoder, unet, train_scheduler, latents[idx], ids, generator)

    text_encoder.train()
    unet.train()
    _train_phase(run, "unet", settings.unet_steps, settings.unet_batch_size, settings.unet_learning_rate, settings.warmup_steps, run.unet_opt, unet_loss)
    text_encoder, unet, vae = (module.eval().to("cpu") for module in (text_encoder, unet, vae))

    with atomic_path(out_dir) as tmp:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_sd14_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
        grant_umask_permissions(tmp)
        _write_losses(tmp / LOSS_FILE, run.losses)
        write_json(tmp / INFO_FILE, {
            "note": "small SD 1.x-architecture model trained offline on captioned MNIST digit scenes (pipeline.demo_model)",
            "settings": asdict(settings),
            "named_classes": list(settings.named_classes),
            "corpus_mnist_indices": corpus_indices(),
            "train_seconds": run.seconds,
            "final_loss": {phase: _mean_last(run.losses, phase) for phase in ("vae", "unet")},
            "sha256": weight_hashes(tmp),
        })
    shutil.rmtree(partial_dir)
    log.info("demo model at %s: vae loss %.4f, unet loss %.4f, %.0f s", out_dir, _mean_last(run.losses, "vae"), _mean_last(run.losses, "unet"), sum(run.seconds.values()))
    return out_dir


def _mean_last(losses, phase: str, count: int = 100) -> float:
    values = [loss for p, _, loss in losses if p == phase][-count:]
    return sum(values) / len(values) if values else float("nan")


def _write_losses(path: Path, losses) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["phase", "step", "loss"])
        writer.writerows((phase, step, f"{loss:.6f}") for phase, step, loss in losses)
