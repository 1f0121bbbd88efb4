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
