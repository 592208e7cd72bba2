"""The plugin manager and the registry that maps (kind, name) to a component factory."""

import difflib
import importlib.metadata
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pluggy

from tarflow_core import hookspecs
from tarflow_core.errors import PluginError, TarflowWarning, UnknownComponentError

logger = logging.getLogger(__name__)

KINDS = ("encoder", "decoder", "prior", "direction", "conditioner", "coupling")


@dataclass(frozen=True)
class Component:
    """One registered component: a factory and the plugin that added it."""

    kind: str
    name: str
    factory: Callable
    plugin: str


class Registry:
    """Component factories by kind and name, each claimed by exactly one plugin."""

    def __init__(self):
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, name: str, factory: Callable, *, plugin: str) -> None:
        if kind not in KINDS:
            raise PluginError(
                f"plugin {plugin!r} registers {name!r} under unknown kind {kind!r}",
                hint=f"kinds are {', '.join(KINDS)}",
            )
        if not name.isidentifier():
            raise PluginError(
                f"plugin {plugin!r} registers {kind} {name!r}: names must be identifiers",
                hint="use letters, digits and underscores, so gin can bind it",
            )
        taken = self._components[kind].get(name)
        if taken is not None:
            raise PluginError(
                f"{kind} {name!r} is claimed by two plugins: {taken.plugin!r} and {plugin!r}",
                hint="uninstall one of them or rename the component",
            )
        self._components[kind][name] = Component(kind, name, factory, plugin)

    def get(self, kind: str, name: str) -> Callable:
        """The factory of a component, or an error listing what is registered."""
        return self.component(kind, name).factory

    def component(self, kind: str, name: str) -> Component:
        if kind not in KINDS:
            raise UnknownComponentError(f"unknown component kind {kind!r}", hint=", ".join(KINDS))
        found = self._components[kind].get(name)
        if found is None:
            known = sorted(self._components[kind])
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"registered {kind}s: {', '.join(known) or 'none'}"
            if close:
                hint = f"did you mean {close[0]!r}? " + hint
            raise UnknownComponentError(f"no {kind} named {name!r}", hint=hint)
        return found

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def components(self, kind: str | None = None) -> list[Component]:
        kinds = KINDS if kind is None else (kind,)
        return [self._components[k][n] for k in kinds for n in sorted(self._components[k])]

    def replace_factory(self, kind: str, name: str, factory: Callable) -> None:
        """Swap a factory for a wrapped one (the gin module wraps them all)."""
        old = self.component(kind, name)
        self._components[kind][name] = Component(kind, name, factory, old.plugin)


class PluginRegistry:
    """The view of the registry one plugin sees: what it adds is recorded under its name."""

    def __init__(self, registry: Registry, plugin: str):
        self._registry = registry
        self.plugin = plugin

    def add(self, kind: str, name: str, factory: Callable) -> None:
        self._registry.add(kind, name, factory, plugin=self.plugin)


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def load_entry_point_plugins(pm: pluggy.PluginManager) -> list[str]:
    """Register every plugin of the entry point group; return the names of those that failed.

    A plugin that fails to import is reported as a warning naming it, and the others still
    load: one broken third-party package should not take the framework down with it.
    """
    failed = []
    seen: dict[str, str] = {}
    for entry_point in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist else "unknown distribution"
        if entry_point.name in seen:
            # The same distribution can be visible twice (for example an editable install
            # beside a built one); only a different distribution is a real clash.
            if seen[entry_point.name] == dist:
                continue
            raise PluginError(
                f"plugin name {entry_point.name!r} is claimed by {seen[entry_point.name]!r} "
                f"and {dist!r}",
                hint="uninstall one of the two packages",
            )
        seen[entry_point.name] = dist
        try:
            module = entry_point.load()
        except Exception as error:  # any import-time failure of foreign code
            warnings.warn(
                f"plugin {entry_point.name!r} (from {dist}) failed to import and is skipped: "
                f"{type(error).__name__}: {error}",
                TarflowWarning,
                stacklevel=2,
            )
            failed.append(entry_point.name)
            continue
        register_plugin(pm, module, entry_point.name)
    return failed


def register_plugin(pm: pluggy.PluginManager, plugin, name: str) -> None:
    """Register one plugin and check that every hook it implements has a specification."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as error:
        raise PluginError(f"plugin {name!r} is invalid: {error}") from None
    except ValueError as error:
        raise PluginError(f"plugin {name!r} cannot be registered: {error}") from None
    for hook_name, caller in vars(pm.hook).items():
        if hook_name.startswith("_") or caller.spec is not None:
            continue
        if any(impl.plugin_name == name for impl in caller.get_hookimpls()):
            raise PluginError(
                f"plugin {name!r} implements {hook_name!r}, which is no tarflow hook",
                hint="hooks are: "
                + ", ".join(n for n in dir(hookspecs) if n.startswith("tarflow_")),
            )


def collect_components(pm: pluggy.PluginManager) -> Registry:
    """Ask every plugin for its components, one plugin at a time so that each is named."""
    registry = Registry()
    for impl in pm.hook.tarflow_register_components.get_hookimpls():
        try:
            impl.function(registry=PluginRegistry(registry, impl.plugin_name))
        except PluginError:
            raise
        except Exception as error:
            warnings.warn(
                f"plugin {impl.plugin_name!r} raised in tarflow_register_components and its "
                f"components are skipped: {type(error).__name__}: {error}",
                TarflowWarning,
                stacklevel=2,
            )
    return registry


_loaded: tuple[pluggy.PluginManager, Registry] | None = None


def load(refresh: bool = False) -> tuple[pluggy.PluginManager, Registry]:
    """The process-wide plugin manager and registry, built on first use."""
    global _loaded
    if _loaded is None or refresh:
        pm = make_plugin_manager()
        load_entry_point_plugins(pm)
        _loaded = (pm, collect_components(pm))
        names = {kind: _loaded[1].names(kind) for kind in KINDS}
        logger.debug("plugins: %s; components: %s", pm.list_name_plugin(), names)
    return _loaded


def plugin_summary(registry: Registry) -> str:
    """A readable listing of the registry for `--list-components`."""
    lines = []
    for kind in KINDS:
        lines.append(f"{kind}:")
        for component in registry.components(kind):
            lines.append(f"  {component.name:<24} (plugin {component.plugin})")
    return "\n".join(lines)
