import importlib.metadata

import pytest

from dslm.compat import has_method, import_attr, pinned_version, require
from dslm.errors import DslmError


def test_pins_are_read_from_dslms_own_requirements():
    assert pinned_version("deepspeed") == importlib.metadata.version("deepspeed")
    assert pinned_version("no-such-package") == "?"


def test_a_broken_assumption_is_one_line_naming_package_version_and_pin():
    require("torch", "anything", True)
    with pytest.raises(DslmError) as e:
        require("deepspeed", "X has y()", False)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"deepspeed {importlib.metadata.version('deepspeed')}: X has y()")
    assert f"deepspeed=={pinned_version('deepspeed')}" in line


def test_method_checks_look_at_the_signature():
    class Thing:
        def go(self, fast=True):
            pass

    assert has_method(Thing(), "go", ("fast",))
    assert not has_method(Thing(), "go", ("slow",)) and not has_method(Thing(), "stop")


def test_import_attr_finds_or_names_what_is_missing():
    assert import_attr("deepspeed", "deepspeed.runtime.zero.config", "ZeroStageEnum").__name__ == "ZeroStageEnum"
    with pytest.raises(DslmError, match="deepspeed.runtime.zero.config.NoSuchThing exists does not hold"):
        import_attr("deepspeed", "deepspeed.runtime.zero.config", "NoSuchThing")
    with pytest.raises(DslmError, match="deepspeed.no_such_module.X"):
        import_attr("deepspeed", "deepspeed.no_such_module", "X")


def test_the_overflow_check_guard_fails_on_an_optimizer_without_the_assumed_attributes():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from dslm.engine import drop_redundant_overflow_check

    bare = object.__new__(DeepSpeedZeroOptimizer)  # a "version" whose optimizer lacks check_grad_overflow
    with pytest.raises(DslmError, match="deepspeed .*DeepSpeedZeroOptimizer has check_grad_overflow"):
        drop_redundant_overflow_check(bare)
