"""tarflow core: interfaces, plugin registry, model assembly, training and the command line.

Core never imports a plugin; components arrive through the `tarflow.plugins` entry points.
"""

from tarflow_core.hookspecs import hookimpl
from tarflow_core.interfaces import Conditioner, Coupling, Decoder, Direction, Encoder, Prior

__version__ = "0.1.0"

__all__ = ["Conditioner", "Coupling", "Decoder", "Direction", "Encoder", "Prior", "hookimpl"]
