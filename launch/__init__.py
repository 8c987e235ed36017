"""The entrypoints: each script here also runs as `python launch/NAME.py`; `hybrid-lm` (launch/cli.py)
dispatches to them and to the other stages' entrypoints."""
