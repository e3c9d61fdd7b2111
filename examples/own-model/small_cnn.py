"""A user's own model for chae-ablate: a plain function that returns an nn.Module.

chae-ablate calls it as build(num_classes=..., resolution=..., **model.kwargs); every keyword
argument below is a knob a variant can set as model.kwargs.NAME (see study.yaml beside it).
"""
from torch import nn


def build(num_classes: int, resolution: int, width: int = 16, depth: int = 2, dropout: float = 0.0) -> nn.Module:
    """`depth` conv blocks of `width` channels (each halving the image), global pooling, a linear head."""
    layers, channels = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(channels, num_classes))
