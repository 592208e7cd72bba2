"""tarflow core: interfaces, plugin registry, model assembly, training and the command line.

Core never imports a plugin; components arrive through the `tarflow.plugins` entry points.
"""

import importlib

__version__ = "0.1.0"

__all__ = ["Conditioner", "Coupling", "Decoder", "Direction", "Encoder", "Prior", "hookimpl"]

# Loaded on first use: the conformance kit's pytest plugin lives in this package and is
# imported by every pytest run in an environment where tarflow is installed, which should not
# pay for importing torch.
_HOMES = {"hookimpl": "tarflow_core.hookspecs"} | {
    name: "tarflow_core.interfaces" for name in __all__ if name != "hookimpl"
}


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'tarflow_core' has no attribute {name!r}")
