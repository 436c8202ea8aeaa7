"""Training recipes as data: each preset is a dict of overrides on the defaults in `config.py`.

The defaults are the paper's ImageNet recipe, so `imagenet` is empty; the others say only what
they change and why.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Zbontar et al. 2021: ResNet-50, projector 8192-8192-8192, batch 2048, 1000 epochs, LARS 0.2/0.0048.
    "imagenet": {},
    # Fashion-MNIST at 32 px: ResNet-18 with the small stem. Like solo-learn/lightly on CIFAR, no blur at
    # 32 px (a 23-px kernel on a 32-px image erases the object); solarize kept for view 2.
    # Targets (issue 6, bench/quality.py): kNN >= 0.905, linear >= 0.920 after < 15 min on one GPU.
    # Tuning notes. CPU screen on 2 cores (the targets need a GPU run): 60 steps of batch 32 on 1000 training
    # images, ResNet-18 at 32 px with the standard stem (cheaper on a CPU), kNN top-1 on 500 test images;
    # seed-to-seed spread ~0.02.
    #   projector   64-64 0.654 | 2048-2048 0.676 / 0.700 (seeds 0 / 1)          (crop 0.2-1)
    #   crop scale  0.2-1 0.676 / 0.700 | 0.08-1 0.710 / 0.720 (seeds 0 / 1)      (projector 2048-2048)
    #   then, at crop 0.08-1: projector 2048-2048-2048 0.712; lambda 0.0025 0.718 (vs 0.710); solo-learn's
    #   CIFAR LARS (eta 0.02, lr 0.3, wd 1e-4) 0.706 vs the paper's (eta 0.001, lr 0.2, wd 1.5e-6) 0.710.
    #   Changed: crop 0.2-1 -> 0.08-1. Kept (no clear difference): 3-layer 2048 projector, lambda, LARS.
    # GPU: not measured yet; run `bench/quality.py --minutes 14` and record its figures here.
    "fmnist": {
        "views": {"image_size": 32, "crop_scale": [0.08, 1.0], "blur_p": [0.0, 0.0],
                  "mean": [0.286, 0.286, 0.286], "std": [0.353, 0.353, 0.353]},
        "model": {"arch": "resnet18", "small_stem": True, "projector": "2048-2048-2048"},
        "optim": {"batch_size": 256, "warmup_epochs": 2},
        "data": {"workers": 2},
        "train": {"epochs": 30, "log_every": 10, "diag_every": 50, "checkpoint_every": 200},
    },
    # Seconds on a CPU: for tests and smoke runs. Same code path, tiny sizes.
    "tiny": {
        "views": {"image_size": 16, "crop_scale": [0.3, 1.0], "blur_p": [0.0, 0.0],
                  "mean": [0.286, 0.286, 0.286], "std": [0.353, 0.353, 0.353]},
        "model": {"arch": "resnet18", "small_stem": True, "projector": "64-64"},
        "optim": {"batch_size": 16, "warmup_epochs": 1},
        "data": {"workers": 1, "shuffle_buffer": 64},
        "train": {"epochs": 2, "log_every": 1, "diag_every": 4, "checkpoint_every": 4},
    },
}
