"""LeNet-5 in its classic form (LeCun et al., 1998), with ReLU and max-pool."""
from torch import nn


class LeNet5(nn.Sequential):
    """conv(1->6, 5x5, pad 2) - pool - conv(6->16, 5x5) - pool - fc 400-120-84-classes.

    Input [B, in_channels, 28, 28]. Five parametrised layers: conv1, conv2, fc1, fc2, fc3.
    ReLUs are in place: in the forward-only ZO part that halves the peak activation memory.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, 6, 5, padding=2),  # [B, 6, 28, 28]
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # [B, 6, 14, 14]
            nn.Conv2d(6, 16, 5),  # [B, 16, 10, 10]
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # [B, 16, 5, 5]
            nn.Flatten(),  # [B, 400]
            nn.Linear(400, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),  # [B, num_classes]
        )
