"""The plugin conformance kit: property tests every registered component must pass.

`tarflow_core.conformance.kit` holds the tests and `tarflow_core.conformance.common` what they
share; `tarflow_core.conformance.plugin` is the pytest plugin (entry point `pytest11`) that runs
them on the components of named plugins:

    pytest --tarflow-conformance=my_plugin        # the entry point name of the plugin
    pytest --tarflow-conformance=all              # everything the registry holds

This package imports nothing heavy: every pytest run in the environment loads the plugin.
"""
