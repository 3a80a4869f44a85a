"""The configs, as the package `mdfnet_hydra.conf` (pyproject.toml maps this directory onto it).

Hydra's `pkg://` search path, which every entry point uses, needs a regular package, hence this
file; Hydra lists only the *.yaml files and directories here as configs and groups. Edit the YAML
files in this directory; an installed wheel carries a copy of them.
"""
