"""Gin assembly: layered files, command-line overrides, and errors that name the mistake."""

import pytest

from tarflow_core import config
from tarflow_core.errors import ConfigError


@pytest.fixture(autouse=True)
def configured(components):
    yield
    config.gin.clear_config()


def test_command_line_binding_overrides_the_file(components):
    config.parse(["gin/mixture.gin"], ["TrainConfig.steps = 7", "MIX_K = 3"])
    assert config.configured("TrainConfig")().steps == 7
    model = config.configured("build_model")(vocab_size=5, seq_len=8, registry=components)
    assert {flow.coupling.num_components for flow in model.flows} == {3}


def test_misspelled_parameter_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match="has no parameter 'stpes'.*did you mean 'steps'"):
        config.parse(["gin/mixture.gin"], ["TrainConfig.stpes = 7"])


def test_a_bound_macro_that_nothing_reads_is_refused():
    with pytest.raises(ConfigError, match="'STEP' is bound but nothing.*did you mean 'STEPS'"):
        config.parse(["gin/mixture.gin"], ["STEP = 20"])

    # A macro read through another one, or inside a list, counts as read.
    config.parse(["gin/mixture.gin"], ["MIX_K = 4", "TrainConfig.steps = %STEPS"])


def test_misspelled_configurable_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown configurable 'TrainConfg'.*'TrainConfig'"):
        config.parse(["gin/mixture.gin"], ["TrainConfg.steps = 7"])


def test_missing_gin_file_lists_the_known_ones():
    with pytest.raises(ConfigError, match="no gin file 'gin/mixtur.gin'.*gin/mixture.gin"):
        config.parse(["gin/mixtur.gin"], [])


def test_operative_config_records_component_settings(components):
    config.parse(["gin/mixture.gin", "gin/runs/tiny.gin"], [])
    model = config.configured("build_model")(vocab_size=11, seq_len=8, registry=components)
    text = config.operative_config()
    flat = config.flat_bindings(text)
    assert flat["mixture.num_components"] == "4"
    assert flat["build_model.couplings"] == "['mixture', 'mixture', 'mixture']"
    assert len(model.flows) == 3


def test_flow_counts_must_agree(components):
    config.parse(["gin/mixture.gin"], ["build_model.layers_per_flow = [1, 2]"])
    with pytest.raises(ConfigError, match="layers_per_flow has 2 entries but there are 3"):
        config.configured("build_model")(vocab_size=5, seq_len=8, registry=components)
