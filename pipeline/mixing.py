"""MVC's mixing of visual concepts (Rahat and Venkateswara, Algorithm 1), on text-encoder outputs.

The text encoder's output for a caption is e in R^{m x d} (m = 77 token positions, d its width). A
mixed embedding starts from the embedding of one image's caption and takes P coarse swaps (rows r:s
replaced by the same rows of another caption of the same class) and Q fine swaps (columns u:v of one
row w replaced likewise). Each swap draws its other caption, rows and columns from the caller's
generator: the mvc fine-tune from its step's, generation from the synthetic image's own seed, so
shards stay shard- and batch-invariant. Row 0 (the start token, the same in every caption) is never
swapped. With one caption in the class, every swap takes from the caption itself: no change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mix:
    """The swaps of one mixed embedding: coarse (other, r, s) take rows r:s of caption `other`; fine
    (other, w, u, v) take columns u:v of its row w. `other` indexes the class's captions."""

    coarse: tuple[tuple[int, int, int], ...]
    fine: tuple[tuple[int, int, int, int], ...]


def other_index(generator: torch.Generator, own: int, count: int) -> int:
    """Another caption of the class than `own`, uniformly; `own` itself when the class has one."""
    if count == 1:
        return own
    pick = int(torch.randint(count - 1, (1,), generator=generator))
    return pick + (pick >= own)


def _span(generator: torch.Generator, low: int, high: int) -> tuple[int, int]:
    """A random non-empty span [a, b) within [low, high)."""
    a = int(torch.randint(low, high, (1,), generator=generator))
    b = int(torch.randint(a + 1, high + 1, (1,), generator=generator))
    return a, b


def draw_mix(generator: torch.Generator, own: int, count: int, rows: int, dim: int, coarse_swaps: int, fine_swaps: int) -> Mix:
    """The swaps of a mixed embedding of caption `own` among `count` captions of [rows, dim] each."""
    coarse = tuple((other_index(generator, own, count), *_span(generator, 1, rows)) for _ in range(coarse_swaps))
    fine = []
    for _ in range(fine_swaps):
        other = other_index(generator, own, count)
        w = int(torch.randint(1, rows, (1,), generator=generator))
        fine.append((other, w, *_span(generator, 0, dim)))
    return Mix(coarse, tuple(fine))


def apply_mix(embeddings: torch.Tensor, own: int, mix: Mix) -> torch.Tensor:
    """The mixed embedding [rows, dim] of caption `own`, from the class's caption embeddings [count, rows, dim]."""
    mixed = embeddings[own].clone()
    for other, r, s in mix.coarse:
        mixed[r:s] = embeddings[other, r:s]
    for other, w, u, v in mix.fine:
        mixed[w, u:v] = embeddings[other, w, u:v]
    return mixed


