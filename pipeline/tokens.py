"""Learned class tokens on disk, and loading them into a Stable Diffusion pipeline.

A tokens folder (written by `pipeline.invert`) holds:

* `learned_embeds.safetensors`: `{token: float32 tensor[num_vectors, dim]}` for every class;
* `<slug>/learned_embeds.safetensors`: the same tensor alone, one folder per class. diffusers'
  `load_textual_inversion` accepts only files holding a single token, so these are the files to
  hand to it (or to other tools) directly;
* `tokens.json`: `{"tokens": {class_name: token}, "num_vectors": n, "dim": d, "model": ..., ...}`.

A token with n > 1 vectors occupies n tokenizer entries, named as diffusers names them:
`<dog>`, `<dog>_1`, ..., `<dog>_{n-1}`; a prompt mentions all of them (`format_prompt`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline import PipelineError
from pipeline.io import grant_umask_permissions, read_json, write_json
from pipeline.layout import EMBEDDINGS_FILE, TOKENS_FILE, class_slug, token_class_dir



def token_for_class(class_name: str) -> str:
    return f"<{class_slug(class_name)}>"


def vector_tokens(token: str, num_vectors: int) -> list[str]:
    """Tokenizer entries of a token with `num_vectors` vectors, named the way diffusers names them."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def format_prompt(template: str, token: str, num_vectors: int) -> str:
    """`template` (with "{}") filled with every vector of `token`, e.g. "a photo of a <dog> <dog>_1".

    Equals `pipe.maybe_convert_prompt(template.format(token), pipe.tokenizer)` once the token is loaded.
    """
    return template.format(" ".join(vector_tokens(token, num_vectors)))


def write_token_files(out_dir: Path, class_tokens: dict[str, str], vectors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write the combined file, one file per class, and tokens.json into the existing folder `out_dir`.

    The caller owns atomicity (it writes into a temporary folder renamed when complete).
    """
    tensors = {token: vectors[token].detach().to("cpu", torch.float32).contiguous() for token in class_tokens.values()}
    save_file(tensors, str(out_dir / EMBEDDINGS_FILE))
    for token in class_tokens.values():
        class_dir = Path(token_class_dir(out_dir, token))
        class_dir.mkdir()
        save_file({token: tensors[token]}, str(class_dir / EMBEDDINGS_FILE))
    grant_umask_permissions(out_dir)
    dims = {t.shape[1] for t in tensors.values()}
    write_json(out_dir / TOKENS_FILE, {"tokens": class_tokens, "dim": dims.pop(), **metadata})


def load_token_file(tokens_dir: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """({class_name: token}, {token: float32 tensor[num_vectors, dim]}) from a tokens folder, validated.

    Raises PipelineError when a file is missing, empty or unreadable, when tokens.json and the
    embeddings disagree on which tokens exist, or when a tensor has the wrong shape or non-finite values.
    """
    tokens_dir = Path(tokens_dir)
    meta_path, embeds_path = tokens_dir / TOKENS_FILE, tokens_dir / EMBEDDINGS_FILE
    for path in (meta_path, embeds_path):
        if not path.is_file():
            raise PipelineError(f"{path} does not exist. Expected the output folder of `invert` at {tokens_dir}.")
    meta = read_json(meta_path)
    class_tokens = meta.get("tokens") if isinstance(meta, dict) else None
    if not isinstance(class_tokens, dict) or not class_tokens:
        raise PipelineError(f"{meta_path}: expected a non-empty 'tokens' mapping of class name to token. Got {class_tokens!r}")
    num_vectors, dim = meta.get("num_vectors"), meta.get("dim")
    try:
        vectors = load_file(str(embeds_path))
    except (SafetensorError, OSError) as exc:
        raise PipelineError(f"{embeds_path} is not a readable safetensors file: {exc}") from None
    if not vectors:
        raise PipelineError(f"{embeds_path} holds no tensors. Expected one per class of {meta_path}.")
    missing = sorted(set(class_tokens.values()) - set(vectors))
    extra = sorted(set(vectors) - set(class_tokens.values()))
    if missing or extra:
        raise PipelineError(
            f"{embeds_path} and {meta_path} disagree: tokens without a tensor {missing}, tensors without a class {extra}"
        )
    for token, tensor in vectors.items():
        if tensor.ndim != 2 or tensor.shape != (num_vectors, dim) or not tensor.is_floating_point():
            raise PipelineError(
                f"{embeds_path}: token {token!r} has a {tensor.dtype} tensor of shape {tuple(tensor.shape)}. "
                f"Expected floating point of shape ({num_vectors}, {dim}) as {meta_path} says."
            )
        if not torch.isfinite(tensor).all():
            raise PipelineError(f"{embeds_path}: token {token!r} has non-finite values (training diverged?)")
    return dict(class_tokens), {token: tensor.float() for token, tensor in vectors.items()}


def add_tokens_to_pipeline(pipe, tokens_dir: str | Path, class_names: list[str]) -> dict[str, str]:
    """Load the tokens of `class_names` from `tokens_dir` into a diffusers pipeline; return {class_name: token}.

    Goes through `pipe.load_textual_inversion` with in-memory tensors (never a path, which it would
    silently skip if wrong), then checks the tokenizer and text encoder really hold every vector.
    """
    class_tokens, vectors = load_token_file(tokens_dir)
    missing = [name for name in class_names if name not in class_tokens]
    if missing:
        raise PipelineError(
            f"{Path(tokens_dir) / TOKENS_FILE} has no token for classes {missing}. Got tokens for {sorted(class_tokens)}"
        )
    embedding = pipe.text_encoder.get_input_embeddings()
    selected = {name: class_tokens[name] for name in class_names}
    for name, token in selected.items():
        if vectors[token].shape[1] != embedding.embedding_dim:
            raise PipelineError(
                f"{Path(tokens_dir) / EMBEDDINGS_FILE}: token {token!r} (class {name!r}) has dimension "
                f"{vectors[token].shape[1]}, but the text encoder of this model embeds in {embedding.embedding_dim}. "
                "Expected tokens learned on the same model."
            )
        already = [t for t in vector_tokens(token, vectors[token].shape[0]) if t in pipe.tokenizer.get_vocab()]
        if already:
            raise PipelineError(f"tokens {already} (class {name!r}) are already in the pipeline's tokenizer")
    pipe.load_textual_inversion([{token: vectors[token]} for token in selected.values()])

    weight = pipe.text_encoder.get_input_embeddings().weight
    for name, token in selected.items():
        ids = pipe.tokenizer.convert_tokens_to_ids(vector_tokens(token, vectors[token].shape[0]))
        expected = vectors[token].to(weight.device, weight.dtype)
        if pipe.tokenizer.unk_token_id in ids or not torch.equal(weight[ids].detach(), expected):
            raise PipelineError(f"loading token {token!r} (class {name!r}) from {tokens_dir} into the pipeline failed")
    return selected
