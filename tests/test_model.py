"""The builder: paper facts at the defaults, every paper11 variant builds, trains and counts."""
from __future__ import annotations

import pytest
import torch

from chae_ablate.config import ConvConfig, ConvStage, ModelConfig, TransformerConfig
from chae_ablate.builders import count_parameters, forward_flops
from chae_ablate.model import build_model
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


# Hand counts of forward FLOPs for one image, from the architecture in DESIGN.md "The model", in
# the units of torch's FlopCounterMode: a multiply-add is 2 FLOPs; it counts convolutions
# (2 * Cin * k*k * Cout * H_out * W_out, bias not counted), matmuls and Linear layers (2 * rows *
# in * out, bias not counted) and attention (Q K^T and A V: 2 * T*T * D each over all heads);
# BatchNorm, LayerNorm, activations, pooling, softmax, residual adds, dropout count 0.


def attention_matmuls(tokens: int, dim: int) -> int:
    """Q K^T is (T, d) x (d, T) and A V is (T, T) x (T, d) in each of h heads; h * d = dim."""
    return 2 * tokens * tokens * dim + 2 * tokens * tokens * dim


def test_baseline_flops_match_a_hand_count():
    convs = (2 * 3 * 9 * 32 * 256 * 256  # stage 1: 3 -> 32, 3x3, at 256x256, then pool
             + 2 * 32 * 9 * 32 * 128 * 128  # stage 2: 32 -> 32 at 128x128
             + 2 * 32 * 9 * 64 * 64 * 64  # stage 3: 32 -> 64 at 64x64
             + 2 * 64 * 9 * 128 * 32 * 32)  # stage 4: 64 -> 128 at 32x32, pooled to 16x16x128
    T, D = 16 * 16 + 1, 128  # 256 tokens + CLS; no projection (dim == last conv width)
    layer = (2 * T * D * 3 * D  # qkv Linear(128, 384)
             + attention_matmuls(T, D)  # 8 heads of 16
             + 2 * T * D * D  # output Linear(128, 128)
             + 2 * T * D * 256 + 2 * T * 256 * D)  # MLP 128 -> 256 -> 128
    head = 2 * D * 11  # Linear(128, 11) on the CLS token
    assert convs == 717_225_984 and layer == 101_188_096
    hand = convs + 2 * layer + head
    assert hand == 919_604_992  # 919.6 MFLOPs/img (852.0 before attention was counted)
    assert forward_flops(ModelConfig(), 11) == hand


def test_baseline_flops_at_32px_match_a_hand_count():
    convs = (2 * 3 * 9 * 32 * 32 * 32 + 2 * 32 * 9 * 32 * 16 * 16  # stages at 32, 16,
             + 2 * 32 * 9 * 64 * 8 * 8 + 2 * 64 * 9 * 128 * 4 * 4)  # 8 and 4 px; 2x2 tokens out
    T, D = 2 * 2 + 1, 128
    layer = 2 * T * D * 3 * D + attention_matmuls(T, D) + 2 * T * D * D + 2 * T * D * 256 * 2
    hand = convs + 2 * layer + 2 * D * 11
    assert hand == 13_856_512
    assert forward_flops(ModelConfig(resolution=32), 11) == hand


def test_tiny_config_flops_match_a_hand_count():
    """Every FLOP-bearing knob off its default: a 5x5 kernel, a two-layer stage without pooling,
    average and extra max pooling, a token projection, a two-hidden-layer MLP, one layer."""
    stages = (ConvStage(8, kernel=5), ConvStage(16, layers=2, pool="none"), ConvStage(16, pool="avg"))
    config = ModelConfig(resolution=32, conv=ConvConfig(stages=stages, extra_pool="max"),
                         transformer=TransformerConfig(depth=1, heads=2, dim=24, mlp_hidden=(32, 16)))
    convs = (2 * 3 * 25 * 8 * 32 * 32  # 3 -> 8, 5x5, at 32x32, max pool to 16x16
             + 2 * 8 * 9 * 16 * 16 * 16 + 2 * 16 * 9 * 16 * 16 * 16  # two layers at 16x16, no pool
             + 2 * 16 * 9 * 16 * 16 * 16)  # 16 -> 16 at 16x16, avg pool 8x8, extra max pool 4x4
    grid_tokens, T, D = 4 * 4, 4 * 4 + 1, 24
    project = 2 * grid_tokens * 16 * D  # Linear(16, 24) on the 16 grid tokens, before CLS
    layer = (2 * T * D * 3 * D + attention_matmuls(T, D) + 2 * T * D * D
             + 2 * T * (D * 32 + 32 * 16 + 16 * D))  # MLP 24 -> 32 -> 16 -> 24
    hand = convs + project + layer + 2 * D * 3
    assert config.conv.stride == 8 and config.tokens == T
    assert hand == 4_353_008
    assert forward_flops(config, 3) == hand
