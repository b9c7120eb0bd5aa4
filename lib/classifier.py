"""A small MNIST classifier whose penultimate features score generated digits (lib/evaluation.py).

Trained by `python tools/train_classifier.py` and shipped as `weights/mnist_classifier.pt`, checked by
SHA-256 before use like the data, so every user scores samples with the same network. The
features are those of the last hidden layer, as the Fréchet Inception Distance uses Inception's
pool layer (Heusel et al. 2017), here with a network trained on the digits themselves.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lib.checks import UserError, first_line, read_archive

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights",
                               "mnist_classifier.pt")
# SHA-256 of the shipped weights file; tools/train_classifier.py prints the value for a new file.
WEIGHTS_SHA256 = "2d5dc18886f00329842316b0d8899fef76a37bdf8ee3c081404c100752dea703"


@dataclass
class ClassifierConfig:
    image_channels: int = 1
    image_size: int = 28  # two 2x2 poolings: a multiple of 4
    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 128  # the penultimate layer: the features the Fréchet distance compares
    num_classes: int = 10

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)


class DigitClassifier(nn.Module):
    """conv3x3-ReLU-pool twice (28 -> 14 -> 7), a ReLU feature layer, a linear head."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = c = config or ClassifierConfig()
        c1, c2 = c.channels
        s = c.image_size // 4
        self.body = nn.Sequential(
            nn.Conv2d(c.image_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * s * s, c.feature_dim), nn.ReLU(),
        )  # [B, C, H, W] in [0, 1] -> [B, feature_dim]
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [0, 1] -> penultimate features [B, feature_dim]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x -> class logits [B, num_classes]."""
        return self.head(self.body(x))

    def to_saved(self) -> dict:
        return {"config": {**asdict(self.config), "channels": list(self.config.channels)},
                "model": self.state_dict()}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_classifier(path: str = DEFAULT_WEIGHTS, device="cpu", check_sha256: bool = True) -> DigitClassifier:
    """The shipped classifier in eval mode. The file must match WEIGHTS_SHA256 (unless
    check_sha256 is False, for a classifier trained anew); errors are one line naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no classifier weights; run `python tools/train_classifier.py` "
                              "(the project ships them in weights/)")
    if check_sha256:
        digest = sha256_of(path)
        if digest != WEIGHTS_SHA256:
            raise UserError(f"{path}: SHA-256 {digest[:12]}... is not the shipped classifier's "
                                  f"({WEIGHTS_SHA256[:12]}...); restore it with git, or retrain it")
    saved = read_archive(path, map_location=device, what="classifier")
    try:
        model = DigitClassifier(ClassifierConfig(**saved["config"]))
        model.load_state_dict(saved["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: not a classifier saved by train_classifier.py ({first_line(e)})") from None
    return model.to(device).eval()
