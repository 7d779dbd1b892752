#!/usr/bin/env python
"""The official code's entry point: `python train.py --model resnet18 --dataset CIFAR10_cutout ...`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from ssam.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
