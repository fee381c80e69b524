"""The work plan of a generation job: which synthetic images a subset gets, with which seed,
strength and prompt template, and which shard and batch makes each.

Every source image (sorted by image_id) gets `num_per_image` synthetic copies j. Copy
(image_id, j) owns the seed derive_seed(seed, "generate", method, image_id, j): its strength and
template draws and its noise come from it alone. Copies are grouped by strength (strength fixes the
denoising steps); the i-th copy of each group goes to shard i % num_shards (`shard_items`), and each
shard batches its copies by strength, `batch_size` at a time. Neither choice changes a seed, a
strength or a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import PipelineError, methods
from pipeline.rng import derive_seed, numpy_rng
from pipeline.settings.generate import GenerateSettings


@dataclass(frozen=True)
class WorkItem:
    """One synthetic image to make: copy j of source image `image_id` (txt2img: the j-th stand-in for it)."""

    synthetic_id: str
    image_id: str
    j: int
    label: int
    class_name: str
    path: str
    mask_path: str | None
    template: str | None  # None: the method conditions on captions
    strength: float | None  # None: text-to-image
    seed: int

    @property
    def prompt_key(self) -> tuple[str, str]:
        """What its prompt is made of: (template, class name)."""
        return self.template, self.class_name


def strength_for(settings: GenerateSettings, image_id: str, j: int) -> float | None:
    """Copy j's t0: the fixed one, else drawn from {1/k, ..., k/k}; None for text-to-image."""
    if methods.get(settings.method).start == "noise":
        return None
    if settings.strength is not None:
        return float(settings.strength)
    k = settings.num_intensities
    draw = numpy_rng(settings.seed, "generate", settings.method, image_id, j, "strength").integers(k)
    return (int(draw) + 1) / k


def lowest_strength(settings: GenerateSettings) -> float:
    """The smallest t0 a source-based method uses (its fixed t0, else 1/k)."""
    return settings.strength if settings.strength is not None else 1 / settings.num_intensities


def template_for(settings: GenerateSettings, image_id: str, j: int) -> str | None:
    """The method's prompt template; txt2img and real-guidance draw one of their template list
    (generate.txt2img_templates, generate.real_guidance_templates) per image, a DreamBooth model
    prompts as it was trained (dreambooth.instance_prompt), and a method that mixes captions has
    none (None)."""
    method = methods.get(settings.method)
    if method.captions:
        return None
    if method.adapter:
        return settings.adapter_prompt
    if not method.draws_template:
        return method.template
    templates = getattr(settings, method.templates)
    draw = numpy_rng(settings.seed, "generate", settings.method, image_id, j, "template").integers(len(templates))
    return templates[int(draw)]


def check_templates(settings: GenerateSettings) -> None:
    """Each template of the list the method draws from has a place for the class name."""
    method = methods.get(settings.method)
    for i, template in enumerate(getattr(settings, method.templates) if method.templates else ()):
        if "{}" not in template:
            raise PipelineError(f"generate.{method.templates}[{i}] {template!r} has no '{{}}'. Expected a place for the class name.")


def plan_items(settings: GenerateSettings, rows: list[dict]) -> list[WorkItem]:
    """Every synthetic image of the subset, in (image_id, j) order."""
    items = []
    for row in sorted(rows, key=lambda r: r["image_id"]):
        for j in range(settings.num_per_image):
            items.append(
                WorkItem(
                    synthetic_id=f"{settings.method}-{row['image_id']}-{j}",
                    image_id=row["image_id"],
                    j=j,
                    label=row["label"],
                    class_name=row["class_name"],
                    path=row["path"],
                    mask_path=row["mask_path"],
                    template=template_for(settings, row["image_id"], j),
                    strength=strength_for(settings, row["image_id"], j),
                    seed=derive_seed(settings.seed, "generate", settings.method, row["image_id"], j),
                )
            )
    return items


def resample_seed(settings: GenerateSettings, item: WorkItem, attempt: int) -> int:
    """Seed of re-draw `attempt` (1, 2, ...) of copy (image_id, j) after the safety checker flagged it."""
    return derive_seed(settings.seed, "generate", settings.method, item.image_id, item.j, "resample", attempt)


def plan_batches(items: list[WorkItem], batch_size: int, by_class: bool = False) -> list[list[WorkItem]]:
    """Items grouped by strength (ascending), each group chunked into batches in (image_id, j) order;
    with `by_class`, grouped by class first (a model adapted per class makes one class at a time).

    A method's items either all have a strength or none do (text-to-image): one group then.
    """
    batches = []
    classes = sorted({item.class_name for item in items}) if by_class else [None]
    for class_name in classes:
        of_class = [item for item in items if class_name is None or item.class_name == class_name]
        for strength in sorted({item.strength for item in of_class}, key=lambda s: -1.0 if s is None else s):
            group = [item for item in of_class if item.strength == strength]
            batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return batches


def shard_items(items: list[WorkItem], shard: int, num_shards: int) -> list[WorkItem]:
    """Shard `shard`'s items: the i-th item of each strength group (in (image_id, j) order) goes to
    shard i % num_shards.

    The split depends on neither the batch size nor the machine (with `batch_size: auto` shards on
    different GPUs batch differently), and every shard gets its share of each strength, which fixes
    the number of denoising steps: the same work.
    """
    seen: dict[float | None, int] = {}
    mine = []
    for item in items:
        position = seen.get(item.strength, 0)
        seen[item.strength] = position + 1
        if position % num_shards == shard:
            mine.append(item)
    return mine
