"""The run-config schema: one typed config for every entrypoint (config/schema.py).

Import the submodules (`config.schema`, `config.loader`, ...): this file imports nothing, so that
the leaf modules (`config.base`, `config.atomic`) load without pulling in the model package, which
itself builds on `config.base`.
"""
