"""The builder: paper facts at the defaults, every paper11 variant builds, trains and counts."""
from __future__ import annotations

import pytest
import torch

from chae_ablate.config import ConvConfig, ConvStage, ModelConfig, TransformerConfig
from chae_ablate.model import build_model, count_parameters, forward_flops
from chae_ablate.study import load_study

from conftest import STUDIES

PAPER11 = load_study(STUDIES / "paper11.yaml")


def test_baseline_matches_the_paper():
    config = ModelConfig()
    model = build_model(config, 11)
    assert count_parameters(model) == 402_417
    assert config.tokens == 257 and config.grid == 16
    parts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in model.named_children()}
    bn = sum(p.numel() for m in model.trunk if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert parts["trunk"] - bn == 102_496 and bn == 262
    assert model.cls.numel() + model.pos.numel() == 33_024
    assert parts["encoder"] == 264_960
    assert parts["norm"] + parts["head"] == 1_675


@pytest.mark.parametrize("variant", PAPER11.variants, ids=lambda v: v.name)
def test_every_paper_variant_runs_forward_and_backward(variant):
    m = variant.config.model
    model = build_model(m, 11)
    x = torch.rand(2, 3, m.resolution, m.resolution)
    logits = model(x)
    assert logits.shape == (2, 11)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.pos.shape == (1, m.tokens, m.transformer.dim)


def test_variants_change_what_they_say():
    by_name = {v.name: v.config.model for v in PAPER11.variants}
    assert by_name["kernel5"].conv.stages[0].kernel == 5
    assert by_name["fewer_stages_avgpool"].grid == 16  # the average pool keeps 16x16 tokens
    assert by_name["res384"].tokens == 24 * 24 + 1
    assert count_parameters(build_model(by_name["heads4"], 11)) == 402_417  # heads don't add params
    assert count_parameters(build_model(by_name["depth1"], 11)) == 402_417 - 132_480


def test_projection_when_dim_differs_from_conv_width():
    config = ModelConfig(transformer=TransformerConfig(dim=64, heads=4, mlp_hidden=(128,)))
    model = build_model(config, 10)
    assert isinstance(model.project, torch.nn.Linear) and model.project.in_features == 128


def test_no_pool_stage_and_tiny_resolution():
    stages = (ConvStage(8), ConvStage(8, pool="none"), ConvStage(16, kernel=5, layers=2))
    config = ModelConfig(resolution=16, conv=ConvConfig(stages=stages),
                         transformer=TransformerConfig(dim=16, heads=2, mlp_hidden=(32,)))
    assert config.conv.stride == 4 and config.tokens == 17
    assert build_model(config, 3)(torch.rand(1, 3, 16, 16)).shape == (1, 3)


def test_flops_grow_with_resolution_and_match_a_hand_count():
    small = ModelConfig(resolution=32)
    flops = forward_flops(small, 11)
    # first conv alone: 2 * (3*9) * 32 * 32 * 32 multiply-adds
    assert flops > 2 * 27 * 32 * 32 * 32
    assert forward_flops(ModelConfig(resolution=64), 11) > 3 * flops
