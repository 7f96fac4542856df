"""Typed config schema, strict loader, validation and the mapping to Megatron-Core."""

from megaspan.config.loader import ConfigError, dump_config, load_config
from megaspan.config.schema import MegaspanConfig
from megaspan.config.validate import validate

__all__ = ["ConfigError", "MegaspanConfig", "dump_config", "load_config", "validate"]
