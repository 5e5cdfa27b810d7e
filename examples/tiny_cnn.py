"""A five-layer CNN for 32x32 images: four 3x3 convolutions and a linear head.

The smallest thing sweep can tune as "your own network": a factory that takes its size as
keyword arguments (``train.model_args``) plus ``num_classes`` (from ``data.dataset``) and
returns an ``nn.Module`` mapping ``B x 3 x 32 x 32`` images to ``B x num_classes`` logits.
"""

from __future__ import annotations

from torch import nn


def _conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


def build_net(num_classes: int, channels: int = 32, dropout: float = 0.0) -> nn.Module:
    """``channels`` in the first convolution, doubled after each of the first two poolings
    (32 -> 16 -> 8 -> 4 pixels); global average pooling, then ``dropout`` and the head."""
    c = channels
    return nn.Sequential(
        _conv(3, c), _conv(c, 2 * c), nn.MaxPool2d(2),
        _conv(2 * c, 4 * c), nn.MaxPool2d(2),
        _conv(4 * c, 4 * c), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(4 * c, num_classes),
    )
