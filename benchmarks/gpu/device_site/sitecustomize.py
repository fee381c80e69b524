"""Smoke runs of run_on_device.sh only: this Python imports only what the GPU machine would have.

A top-level module that belongs to an installed distribution the machine's image lacks (neither in
DEVICE_DISTRIBUTIONS nor required by one of them) is looked for only in the folders of PYTHONPATH,
where run_on_device.sh puts the carried wheels and the repository; elsewhere it is not found, as there. A missing module is
then simply absent (`importlib.util.find_spec` gives None), so libraries that probe for optional
packages behave as they would there. The editable install of this repository is dropped too: there,
the repository is on PYTHONPATH instead. Package versions stay this machine's.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import re
import sys

from packaging.requirements import Requirement

# The Python packages of the GPU machine's image (its Python 3.12.3), as listed for it on 2026-11-17.
DEVICE_DISTRIBUTIONS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# Environment markers of the machine's Python, for requirements such as `tomli; python_version < "3.11"`.
DEVICE_MARKERS = {"extra": "", "python_version": "3.12", "python_full_version": "3.12.3"}


def _canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _with_requirements(distributions: set[str]) -> set[str]:
    """`distributions` and, transitively, what their versions installed here require on the
    machine's Python (extras aside).

    There, the machine's own versions of them come with their own requirements; here a newer
    version may need a package the machine's list lacks, which is no fault of this project.
    """
    found, todo = set(), list(distributions)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(DEVICE_MARKERS):
                todo.append(_canonical(requirement.name))
    return found


class DevicePathFinder(importlib.machinery.PathFinder):
    """The standard path finder, except that a top-level module of a distribution the machine lacks
    is searched for in the PYTHONPATH folders alone."""

    owners = importlib.metadata.packages_distributions()
    there = _with_requirements(DEVICE_DISTRIBUTIONS)
    brought = [folder for folder in os.environ.get("PYTHONPATH", "").split(os.pathsep) if folder]

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        distributions = cls.owners.get(fullname, [])
        if path is None and distributions and not any(_canonical(d) in cls.there for d in distributions):
            path = cls.brought
        return super().find_spec(fullname, path, target)


def _editable(finder) -> bool:
    """An editable install's finder (this repository's own, from `pip install -e`), which the machine has not."""
    return type(finder).__module__.startswith("__editable__")


sys.meta_path[:] = [
    DevicePathFinder if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path if not _editable(finder)
]
