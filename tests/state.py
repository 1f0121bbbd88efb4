"""Snapshots of a module's state, to check that a call left it exactly as it was."""

import torch


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_state_equal(before: dict, module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == before[key].dtype, key
        assert torch.equal(before[key], after[key]), f"{key} changed: {before[key]} -> {after[key]}"


def assert_unbuilt(layer) -> None:
    """The layer holds only uninitialized weights, as a torch lazy module before its first call."""
    assert not layer.built
    weights = dict(layer.named_parameters()) | dict(layer.named_buffers())
    assert set(weights) == set(layer.state_dict())
    assert weights and all(torch.nn.parameter.is_lazy(w) for w in weights.values()), weights
