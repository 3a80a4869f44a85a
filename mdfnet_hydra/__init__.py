"""Enhanced MDF-Net: Hydra-composed training of a multimodal chest X-ray model.

The entry points read their configs as the package `mdfnet_hydra.conf` (`pkg://mdfnet_hydra.conf`).
An installed wheel carries it inside this package; a source checkout keeps it as the top-level
`conf/` directory, where users edit it. Imported from a checkout (an editable install, or the
checkout on PYTHONPATH), that checkout's `conf/` is bound here, so that a run always reads the
configs next to the code it runs, never another checkout's an environment also knows.
"""

import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


def _bind_checkout_conf() -> None:
    here = _Path(__file__).resolve().parent
    checkout_conf = here.parent / "conf"
    name = f"{__name__}.conf"
    if (here / "conf").is_dir() or name in _sys.modules or not (checkout_conf / "__init__.py").is_file():
        return  # an installed copy (the configs inside the package), or no checkout around it
    spec = _util.spec_from_file_location(
        name, checkout_conf / "__init__.py", submodule_search_locations=[str(checkout_conf)]
    )
    module = _util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["conf"] = module  # as importing the submodule would


_bind_checkout_conf()
