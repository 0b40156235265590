"""What both peer scripts share: their arguments and fedrac's CNN (importable from any
interpreter with torch: the scripts' folder is first on their ``sys.path``)."""

import argparse

import torch
from torch import nn


def arguments() -> argparse.Namespace:
    """The protocol's settings, as ``bench/peers.py`` passes them."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="the torch.save file bench/peers.py dumped")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cohort", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--summary", default=None, help="write the final evaluation here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


class CNN(nn.Module):
    """fedrac's ``cnn`` (fedrac/models/builtin.py), verbatim: conv3x3(32) + ReLU + pool,
    conv3x3(64) + ReLU + pool, dense 128 + ReLU, head."""

    def __init__(self, c=3, h=32, w=32, num_classes=10, c1=32, c2=64, hidden=128):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c2 * (h // 4) * (w // 4), hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(torch.relu(self.fc(x.flatten(1))))
