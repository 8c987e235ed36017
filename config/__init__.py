"""The run-config schema: one typed config for every entrypoint (see config/schema.py)."""

from config.loader import ConfigError
from config.schema import RunConfig, load_run_config, save_run_config

__all__ = ["ConfigError", "RunConfig", "load_run_config", "save_run_config"]
