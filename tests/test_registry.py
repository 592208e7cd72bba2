"""The plugin line: discovery, name clashes, hooks without specs, and core's independence."""

import ast
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tarflow_core import registry
from tarflow_core.errors import PluginError, TarflowWarning, UnknownComponentError
from tarflow_core.hookspecs import hookimpl

CORE = Path(registry.__file__).resolve().parent


def plugin_module(name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, fn in functions.items():
        setattr(module, key, fn)
    return module


def test_core_never_imports_a_plugin_in_its_source():
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.startswith("tarflow_plugins") for n in names), path.name


def test_core_modules_load_without_plugins():
    code = (
        "import sys, tarflow_core.run, tarflow_core.train, tarflow_core.config; "
        "print(any(m.startswith('tarflow_plugins') for m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_builtins_arrive_through_the_entry_point_group():
    pm = registry.make_plugin_manager()
    registry.load_entry_point_plugins(pm)
    names = dict(pm.list_name_plugin())
    assert {"codebook", "basics", "conditioners", "affine", "mixture"} <= set(names)
    components = registry.collect_components(pm)
    assert components.component("coupling", "mixture").plugin == "mixture"


def test_two_plugins_claiming_one_name_is_an_error_naming_both():
    def register(registry):
        registry.add("coupling", "twin", object)

    pm = registry.make_plugin_manager()
    registry.register_plugin(
        pm, plugin_module("first", tarflow_register_components=hookimpl(register)), "first"
    )
    second = plugin_module("second", tarflow_register_components=hookimpl(register))
    registry.register_plugin(pm, second, "second")

    with pytest.raises(PluginError, match="'first' and 'second'"):
        registry.collect_components(pm)


def test_a_hook_without_specification_is_an_error_naming_the_plugin():
    def tarflow_on_something(value):
        pass

    pm = registry.make_plugin_manager()
    stray = plugin_module("stray", tarflow_on_something=hookimpl(tarflow_on_something))

    with pytest.raises(PluginError, match="'stray'.*tarflow_on_something"):
        registry.register_plugin(pm, stray, "stray")


def test_a_hook_with_wrong_arguments_is_an_error_naming_the_plugin():
    def tarflow_log_metrics(metrics, step, extra):
        pass

    pm = registry.make_plugin_manager()
    bad = plugin_module("bad_args", tarflow_log_metrics=hookimpl(tarflow_log_metrics))

    with pytest.raises(PluginError, match="bad_args"):
        registry.register_plugin(pm, bad, "bad_args")


def test_a_raising_registration_hook_is_skipped_with_a_warning_naming_it():
    def register(registry):
        raise RuntimeError("broken")

    pm = registry.make_plugin_manager()
    registry.register_plugin(
        pm, plugin_module("flaky", tarflow_register_components=hookimpl(register)), "flaky"
    )

    with pytest.warns(TarflowWarning, match="'flaky'"):
        components = registry.collect_components(pm)
    assert components.names("coupling") == []


def test_unknown_component_lists_what_is_registered(components):
    with pytest.raises(UnknownComponentError) as caught:
        components.get("coupling", "mixtur")
    message = str(caught.value)
    assert "did you mean 'mixture'" in message
    assert "affine" in message and "mixture_gaussian" in message


def test_unknown_kind_is_refused():
    reg = registry.Registry()
    with pytest.raises(PluginError, match="unknown kind"):
        reg.add("flavour", "x", object, plugin="p")
