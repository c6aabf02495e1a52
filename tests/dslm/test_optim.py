import pytest

from dslm.optim import lr_factor
from dslm.trainer import TrainConfig


def factors(**settings):
    cfg = TrainConfig(lr=1.0, min_lr=0.1, max_steps=100, warmup_steps=10, **settings)
    return [lr_factor(step, cfg, cfg.max_steps) for step in range(cfg.max_steps + 1)]


def test_cosine_warms_up_then_decays_to_min_lr():
    f = factors()
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[100] == pytest.approx(0.1) and f[55] == pytest.approx(0.55)


def test_wsd_holds_then_decays_linearly_over_the_last_fraction():
    f = factors(schedule="wsd", decay_fraction=0.2)
    assert f[9:81] == [1.0] * 72
    assert f[90] == pytest.approx(0.55) and f[100] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "bad", [dict(schedule="linear"), dict(decay_fraction=0.0), dict(lr=0.0), dict(beta2=1.0), dict(weight_decay=-0.1)]
)
def test_bad_schedule_settings_name_the_field(bad):
    with pytest.raises(ValueError, match=f"train.{next(iter(bad))}"):
        TrainConfig(**bad)


def test_frozen_parameters_get_no_gradient_and_no_optimizer_group():
    from dslm.errors import DslmError
    from dslm.model import GPT, ModelConfig
    from dslm.optim import freeze, param_groups, parameter_order
    from dslm.trainer import freeze_patterns

    model = GPT(ModelConfig(preset="tiny", n_layer=3))
    patterns = freeze_patterns(TrainConfig(freeze=["ln_f.*"], freeze_blocks=1))
    assert patterns == ["ln_f.*", "wte.*", "wpe.*", "blocks.0.*"]
    frozen = freeze(model, patterns)
    assert "blocks.0.attn.qkv.weight" in frozen and "blocks.1.attn.qkv.weight" not in frozen
    assert all(not p.requires_grad for name, p in model.named_parameters() if name in frozen)
    grouped = {id(p) for group in param_groups(model, 0.1) for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(parameter_order(model)).isdisjoint(frozen)
    with pytest.raises(DslmError, match="'blocks.9.*' matches no parameter"):
        freeze(GPT(ModelConfig()), ["blocks.9.*"])
