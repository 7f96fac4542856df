"""Typed config schema, strict loader and validation. Torch-free: imports neither torch nor the
model wing (``megaspan.models``); the mapping to Megatron-Core lives in :mod:`megaspan.models`."""

from megaspan.config.capabilities import Capabilities
from megaspan.config.derived import ffn_hidden_size
from megaspan.config.layout import ParallelLayout
from megaspan.config.loader import config_to_dict, dump_config, load_config, norm_options
from megaspan.config.schema import MegaspanConfig
from megaspan.config.validate import validate
from megaspan.errors import ConfigError

__all__ = [
    "Capabilities",
    "ConfigError",
    "MegaspanConfig",
    "ParallelLayout",
    "config_to_dict",
    "dump_config",
    "ffn_hidden_size",
    "load_config",
    "norm_options",
    "validate",
]
