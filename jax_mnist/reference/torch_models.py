"""The eight original PyTorch models, written as in the S7 notebooks (needs torch: tests, benchmarks).

Key layout matches ``shared/spec/s7_study.md``: model 1 has ``conv1`` ... ``conv7``;
models 2-8 have ``convblockN`` nn.Sequentials (conv first), pools ``pool1``/``pool2``,
``gap`` and an unused-by-parameters ``dropout``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Model1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv4 = nn.Conv2d(128, 256, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.conv5 = nn.Conv2d(256, 512, 3)
        self.conv6 = nn.Conv2d(512, 1024, 3)
        self.conv7 = nn.Conv2d(1024, 10, 3)

    def forward(self, x):
        x = self.pool1(F.relu(self.conv2(F.relu(self.conv1(x)))))
        x = self.pool2(F.relu(self.conv4(F.relu(self.conv3(x)))))
        x = F.relu(self.conv6(F.relu(self.conv5(x))))
        x = self.conv7(x)
        return F.log_softmax(x.view(-1, 10), dim=-1)


def block(cin, cout, k, *, bn=False, relu=True, order="bn_relu", dropout=0.0):
    layers = [nn.Conv2d(cin, cout, k, bias=False)]
    if order == "bn_relu":
        layers += ([nn.BatchNorm2d(cout)] if bn else []) + ([nn.ReLU()] if relu else [])
    else:
        layers += ([nn.ReLU()] if relu else []) + ([nn.BatchNorm2d(cout)] if bn else [])
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class SequentialNet(nn.Module):
    """Models 2-8: convblock1, 2, pool1, convblock4, 5, pool2, convblock7, [gap], [convblock8]."""

    def __init__(
        self, widths, *, last_kernel=3, bn=False, order="bn_relu", block_dropout=0.0, dropout=0.0, head="2x2"
    ):
        super().__init__()
        w1, w2, w4, w5, w7 = widths
        kw = dict(bn=bn, order=order, dropout=block_dropout)
        self.convblock1 = block(1, w1, 3, **kw)
        self.convblock2 = block(w1, w2, 3, **kw)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.pool1 = nn.MaxPool2d(2, 2)
        self.convblock4 = block(w2, w4, 3, **kw)
        self.convblock5 = block(w4, w5, 3, **kw)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.convblock7 = block(w5, w7, last_kernel, **kw)
        self.head = head
        if head == "4x4":
            self.convblock8 = block(w7, 10, 4, relu=False)
        elif head == "2x2":
            self.convblock8 = block(w7, 10, 2, relu=False)
        elif head in ("gap", "gap1x1"):
            self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1))
            if head == "gap1x1":
                self.convblock8 = block(w7, 10, 1, relu=False)

    def forward(self, x):
        x = self.convblock2(self.convblock1(x))
        if self.dropout is not None:
            x = self.dropout(x)
        x = self.pool1(x)
        x = self.pool2(self.convblock5(self.convblock4(x)))
        x = self.convblock7(x)
        if self.head in ("gap", "gap1x1"):
            x = self.gap(x)
        if hasattr(self, "convblock8"):
            x = self.convblock8(x)
        return F.log_softmax(x.view(-1, 10), dim=-1)


def torch_model(name: str) -> nn.Module:
    w, w12 = (10, 20, 10, 20, 10), (10, 20, 10, 20, 12)
    return {
        "model_1_setup": lambda: Model1(),
        "model_2_skeleton": lambda: SequentialNet((32, 64, 32, 64, 10), last_kernel=1, head="4x4"),
        "model_3_lighter_model": lambda: SequentialNet(w),
        "model_4_batchnorm": lambda: SequentialNet(w, bn=True),
        "model_5_regularization": lambda: SequentialNet(w, bn=True, dropout=0.25),
        "model_6_gap": lambda: SequentialNet(w, bn=True, dropout=0.25, head="gap"),
        "model_7_max_capacity": lambda: SequentialNet(w12, bn=True, dropout=0.25, head="gap1x1"),
        "model_8_dropout_maxpool": lambda: SequentialNet(
            w12, bn=True, order="relu_bn", block_dropout=0.01, head="gap1x1"
        ),
    }[name]()


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and random BatchNorm running statistics (so eval mode is really tested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model
