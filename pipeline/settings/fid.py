"""The fid stages' settings: real features, FID/KID of synthetic shards, and the oracle's scores."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class FidFeatureSettings(StageSettings):
    """What the Inception features of a split's real images depend on."""

    features: str = at("fid.features")
    resize: str = at("fid.resize")
    device: str = at("device", how=True)
    batch_size: int = at("fid.batch_size", how=True)


@dataclass(frozen=True)
class FidSettings(FidFeatureSettings):
    """What the FID and KID of synthetic shards depend on: the features', and KID's subsets."""

    seed: int = at("seed")
    kid_subsets: int = at("fid.kid_subsets")
    kid_subset_size: int = at("fid.kid_subset_size")


@dataclass(frozen=True)
class OracleScoreSettings(StageSettings):
    """What the oracle's agreement and pixel distances depend on: the oracle."""

    oracle: str | None = at("fid.oracle")
