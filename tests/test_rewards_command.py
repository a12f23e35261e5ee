"""``dblend rewards``: every registered reward listed with what the reward object itself says.

Independent truth: the rewards built from the registry (those that load no weights) report ``differentiable`` and
``needs_prompts`` themselves, and gradients flow (or not) from their values to the images.
"""

from __future__ import annotations

import json

import torch

from diffusion_blend.cli import main
from diffusion_blend.rewards import available_rewards, get_reward


def test_the_listing_names_every_registered_reward(capsys):
    assert main(["rewards"]) == 0
    text = capsys.readouterr().out
    for name in available_rewards():
        assert f"\n{name}\n" in f"\n{text}"
    assert main(["rewards", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [info["name"] for info in infos] == sorted(available_rewards())
    assert all(isinstance(info["differentiable"], bool) for info in infos)  # every registration names its class


def test_what_it_says_is_what_the_weight_free_rewards_do(capsys):
    main(["rewards", "--json"])
    infos = json.loads(capsys.readouterr().out)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    checked = 0
    for info in infos:
        if info["weights"] is not None or "required" in info["options"].values():
            continue
        reward = get_reward(info["name"])
        assert reward.differentiable == info["differentiable"] and reward.needs_prompts == info["needs_prompts"]
        x = images.clone().requires_grad_(True)
        values = reward(x, ["a"] * 2 if reward.needs_prompts else None)
        assert values.requires_grad == info["differentiable"], info["name"]
        checked += 1
    assert checked >= 5  # brightness, saturation, both JPEG sizes, the digits' ink/symmetry/compressibility
