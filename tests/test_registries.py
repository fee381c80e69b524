"""Every name list of the config schema is the list of its registry, so neither can drift alone."""

import pytest

from pipeline import backbones, fid, methods, sdedit
from pipeline.config import load_schema
from pipeline.makers import MAKERS


def schema_enum(*path: str) -> list[str]:
    node = load_schema()
    for key in path:
        node = node["properties"][key]
    return node["items"]["enum"] if node.get("type") == "array" else node["enum"]


@pytest.mark.parametrize(
    ("path", "registry"),
    [
        (("generate", "methods"), methods.METHODS),
        (("train", "backbone"), backbones.BACKBONES),
        (("fid", "features"), fid.FEATURE_EXTRACTORS),
        (("generate", "scheduler"), sdedit.SCHEDULERS),
    ],
)
def test_schema_enum_is_its_registry(path, registry):
    assert sorted(schema_enum(*path)) == sorted(registry)


def test_every_method_has_a_maker_and_known_needs():
    for method in methods.METHODS.values():
        assert method.kind in MAKERS, method.name
        assert method.needs <= methods.NEEDS, method.name


def test_the_report_reference_is_real_guidance_named_or_not():
    assert methods.real_guidance_reference(["baseline", "dafusion", "real-guidance-no-name"]) == "real-guidance-no-name"
    assert methods.real_guidance_reference(["real-guidance-no-name", "real-guidance"]) == "real-guidance"
    assert methods.real_guidance_reference(["baseline", "real-guidance+mixup"]) is None  # a variant trains otherwise
