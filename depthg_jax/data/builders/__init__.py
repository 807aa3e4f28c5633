"""TFDS builders of the DepthG datasets (ArrayRecord, no TensorFlow); see `base`."""

from depthg_jax.data.builders.base import DepthGBuilder, DepthGConfig
from depthg_jax.data.builders.cityscapes27 import Cityscapes27
from depthg_jax.data.builders.cocostuff27 import Cocostuff27
from depthg_jax.data.builders.directory import Directory
from depthg_jax.data.builders.potsdam3 import Potsdam3

BUILDERS: dict[str, type[DepthGBuilder]] = {
    "cocostuff27": Cocostuff27,
    "cityscapes27": Cityscapes27,
    "potsdam3": Potsdam3,
    "directory": Directory,
}
CONFIGS = ("train", "eval")

__all__ = [
    "BUILDERS",
    "CONFIGS",
    "Cityscapes27",
    "Cocostuff27",
    "DepthGBuilder",
    "DepthGConfig",
    "Directory",
    "Potsdam3",
]
