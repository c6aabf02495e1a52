"""The memory estimate dslm-train checks before building anything: against DeepSpeed's own
estimators, against the tensors a real forward pass keeps, and the refusal it gives."""

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from dslm.data.loader import DataConfig
from dslm.lora import LoraConfig
from dslm.memory import ModelStates, activation_bytes, available_host_memory, estimate, memory_problem, model_states
from dslm.model import GPT, ModelConfig
from dslm.trainer import TrainConfig

ZERO2 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}


def total(states) -> int:
    return states.weights + states.gradients + states.optimizer


@pytest.mark.parametrize("preset", ["tiny", "code-33m", "gpt-12l-1024d"])
@pytest.mark.parametrize("ranks", [1, 2, 8])
def test_model_states_are_deepspeeds_estimates(preset, ranks):
    cfg = ModelConfig(preset=preset)
    params = cfg.num_params()
    _, zero2 = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=ranks, cpu_offload=False)
    assert total(model_states(params, params, 2, ranks, element=2)) == pytest.approx(zero2, abs=2)
    # ZeRO-3: DeepSpeed's 18 bytes per parameter over the ranks, less the gathered layer it adds,
    # plus the 16-bit gradients it leaves out
    _, zero3, layer = estimate_zero3_model_states_mem_needs(
        params, cfg.largest_layer_params(), num_gpus_per_node=ranks, cpu_offload=False, zero_init=False
    )
    assert total(model_states(params, params, 3, ranks, element=2)) == pytest.approx(
        zero3 - layer + 2 * params / ranks, abs=3
    )
    per_stage = [total(model_states(params, params, stage, ranks, element=2)) for stage in range(4)]
    assert per_stage == sorted(per_stage, reverse=True) and per_stage[0] == 20 * params


def test_frozen_weights_take_no_gradient_or_optimizer_state():
    assert model_states(1000, 0, 0, 1, element=2) == ModelStates(weights=2000, gradients=0, optimizer=0)
    fp32 = model_states(1000, 1000, 0, 1, element=4)  # no master copy: weights, gradients, AdamW's moments
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4000, 4000, 8000)


def saved_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """Bytes of the tensors a bf16 forward pass keeps for the backward pass (torch's saved-tensor
    hooks, each storage once), the model's own weights left out."""
    model = GPT(cfg).to(torch.bfloat16).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (storage := t.untyped_storage()).data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, ids)
    return sum(kept.values())


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(n_layer=4), dict(vocab_size=4000), dict(intermediate_size=1000), dict(n_embd=256, n_head=8)]
)
def test_activations_are_what_a_forward_pass_keeps(kwargs):
    """The estimate is a lower bound close to the real figure: what autograd keeps, plus the 16-bit
    logits and their fp32 copy, alive beside the log-softmax while the loss is computed."""
    cfg = ModelConfig(preset="tiny", **kwargs)
    batch, seq_len = 4, 128
    real = saved_activation_bytes(cfg, batch, seq_len) + batch * seq_len * cfg.padded_vocab_size * (2 + 4)
    assert 0.9 * real <= activation_bytes(cfg, batch, seq_len, checkpointing=False, element=2) <= real
    checkpointed = activation_bytes(cfg, batch, seq_len, checkpointing=True, element=2)
    assert checkpointed < activation_bytes(cfg, batch, seq_len, checkpointing=False, element=2) or cfg.n_layer == 1


def test_a_model_too_big_for_the_machine_is_refused_in_one_line_naming_its_needs():
    model = ModelConfig(preset="tiny", n_layer=100_000)
    need = estimate(
        model,
        TrainConfig(micro_batch_size=2),
        DataConfig(),
        ZERO2,
        stage=2,
        world_size=1,
        seq_len=64,
        validation_batches=0,
    )
    line = memory_problem(need, local_ranks=1, device_free=None)
    assert line.startswith("the run needs at least ") and "of host memory per rank" in line and "\n" not in line
    assert f"{model.num_params():,} parameters" in line and "a smaller model (model.*)" in line
    assert need.states.weights == 2 * model.num_params()
    tiny = estimate(
        ModelConfig(preset="tiny"),
        TrainConfig(micro_batch_size=2),
        DataConfig(),
        ZERO2,
        stage=2,
        world_size=1,
        seq_len=64,
        validation_batches=0,
    )
    assert memory_problem(tiny, local_ranks=1, device_free=None) == ""
    assert sum(tiny.host(cpu_run=True).values()) < 100 * 2**20 < available_host_memory()


def test_each_part_names_its_own_setting():
    tiny = ModelConfig(preset="tiny")
    for train, data, advice in [
        (TrainConfig(micro_batch_size=10**7), DataConfig(num_workers=0), "a smaller train.micro_batch_size"),
        (TrainConfig(micro_batch_size=2), DataConfig(num_workers=10**7), "data.num_workers x data.prefetch_factor"),
    ]:
        need = estimate(tiny, train, data, ZERO2, stage=2, world_size=1, seq_len=64, validation_batches=0)
        assert advice in memory_problem(need, local_ranks=1, device_free=None)


def test_frozen_models_count_their_weights_only():
    """train.freeze, freeze_blocks and LoRA freeze parameters by name: the estimate counts none of
    them as trainable, a lower bound, so that a fine-tune that fits is never refused."""
    model = ModelConfig(preset="tiny")
    for train in (TrainConfig(freeze=["wte.*"]), TrainConfig(freeze_blocks=1), TrainConfig(lora=LoraConfig(rank=4))):
        need = estimate(model, train, DataConfig(), ZERO2, stage=2, world_size=1, seq_len=64, validation_batches=0)
        assert (need.trainable, need.states.gradients, need.states.optimizer) == (0, 0, 0)


def test_offloaded_states_are_counted_on_the_host_of_a_gpu_run():
    model = ModelConfig(preset="code-33m")
    offload = {**ZERO2, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    plain, moved = (
        estimate(model, TrainConfig(), DataConfig(), ds, stage=2, world_size=1, seq_len=256, validation_batches=0)
        for ds in (ZERO2, offload)
    )
    assert plain.device()["model states"] - moved.device()["model states"] == moved.states.optimizer
    assert (
        moved.host(cpu_run=False)["model states"] - plain.host(cpu_run=False)["model states"] == moved.states.optimizer
    )
    assert sum(plain.host(cpu_run=True).values()) == sum(moved.host(cpu_run=True).values())
