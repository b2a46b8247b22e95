"""Networks wrapped to show another network a different face.

``PredictionChannels``: a network with learned variances (2C output channels: the prediction,
then the variance interpolation) seen as one that outputs its prediction alone (C channels), so
that it can be sampled or bounded with a fixed or analytic variance.
"""

from __future__ import annotations

import torch


class PredictionChannels(torch.nn.Module):
    """The prediction (the first C of 2C output channels) of a network with learned variances: its
    mean alone, to sample or bound with a fixed or analytic variance."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = getattr(net, "num_classes", None)  # conditional networks stay conditional

    def forward(self, x: torch.Tensor, t: torch.Tensor, *labels) -> torch.Tensor:
        return self.net(x, t, *labels)[:, : x.shape[1]]
