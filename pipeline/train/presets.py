"""Training recipes as data: each preset is a dict of overrides on the defaults in `config.py`.

The defaults are the paper's ImageNet recipe, so `imagenet` is empty; the others say only what
they change and why.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Zbontar et al. 2021: ResNet-50, projector 8192-8192-8192, batch 2048, 1000 epochs, LARS 0.2/0.0048.
    "imagenet": {},
    # Fashion-MNIST at 32 px: ResNet-18 with the small stem. Like solo-learn and lightly on CIFAR, no blur at
    # 32 px (a sigma range meant for 224 px smears a 28-px garment); solarize kept for view 2. Crop scale
    # 0.08-1 and the 2048-2048-2048 projector were chosen by kNN on a CPU screen (bench/quality.py).
    "fmnist": {
        "views": {"image_size": 32, "crop_scale": [0.08, 1.0], "blur_p": [0.0, 0.0],
                  "mean": [0.286, 0.286, 0.286], "std": [0.353, 0.353, 0.353]},
        "model": {"arch": "resnet18", "small_stem": True, "projector": "2048-2048-2048"},
        "optim": {"batch_size": 256, "warmup_epochs": 2},
        "data": {"workers": 2},
        "train": {"epochs": 30, "log_every": 10, "diag_every": 50, "checkpoint_every": 200},
    },
    # Fashion-MNIST on a 2-core CPU: ResNet-10 (one block per stage) whose small stem has stride 2, at the
    # native 28 px: about 1/16 of the `fmnist` backbone's cost, so an hour is ~12 epochs, not one. Views are
    # made in batches on the training device (data_path gpu, here the CPU): cheaper on 2 cores than
    # per-image PIL in worker processes, which compete with the model for them.
    "small": {
        "views": {"image_size": 28, "crop_scale": [0.2, 1.0], "blur_p": [0.0, 0.0],
                  "mean": [0.286, 0.286, 0.286], "std": [0.353, 0.353, 0.353]},
        "model": {"arch": "resnet10", "small_stem": True, "stem_stride": 2, "projector": "2048-2048-2048"},
        "optim": {"batch_size": 256, "warmup_epochs": 1},
        "data": {"workers": 1},
        "train": {"epochs": 12, "data_path": "gpu", "log_every": 10, "diag_every": 100, "checkpoint_every": 500},
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
