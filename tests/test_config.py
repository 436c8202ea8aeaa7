"""Config resolution: presets are data, overrides are typed and checked."""

import pytest
import yaml

from pipeline.config import Config, apply, load_yaml, parse_overrides, save_yaml
from pipeline.errors import UserError
from pipeline.train.presets import PRESETS


def test_presets_apply_and_imagenet_is_the_paper_recipe():
    imagenet = Config.from_dict(PRESETS["imagenet"])
    assert (imagenet.model.arch, imagenet.model.projector, imagenet.optim.batch_size) == ("resnet50", "8192-8192-8192", 2048)
    assert (imagenet.optim.lr_weights, imagenet.optim.lr_biases, imagenet.model.lambd) == (0.2, 0.0048, 0.0051)
    assert imagenet.train.epochs == 1000 and imagenet.views.blur_p == (1.0, 0.1) and imagenet.views.solarize_p == (0.0, 0.2)
    fmnist = Config.from_dict(PRESETS["fmnist"])
    assert fmnist.model.small_stem and fmnist.views.image_size == 32 and fmnist.views.blur_p == (0.0, 0.0)


def test_overrides_are_typed():
    config = Config()
    apply(config, parse_overrides(["optim.batch_size=512", "views.crop_scale=[0.2, 1]", "train.compile=true",
                                   "optim.warmup_epochs=2", "data.urls=a/{0..3}.tar"]))
    assert config.optim.batch_size == 512 and config.views.crop_scale == (0.2, 1.0)
    assert config.train.compile is True and config.optim.warmup_epochs == 2.0 and config.data.urls == "a/{0..3}.tar"


@pytest.mark.parametrize("item, message", [
    ("nope.x=1", "unknown config key"), ("optim.nope=1", "unknown config key"), ("optim=1", "unknown config key"),
    ("optim.batch_size=1.5", "must be an integer"), ("train.compile=maybe", "true or false"),
    ("views.crop_scale=[1]", "list of 2 numbers"), ("noequals", "expected key=value"),
])
def test_bad_overrides_are_one_sentence(item, message):
    with pytest.raises(UserError, match=message):
        apply(Config(), parse_overrides([item]))


def test_yaml_round_trip(tmp_path):
    config = Config.from_dict(PRESETS["tiny"])
    save_yaml(config, tmp_path / "config.yaml")
    assert Config.from_dict(load_yaml(tmp_path / "config.yaml")) == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["views"]["crop_scale"] == [0.3, 1.0]
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_yaml(tmp_path / "bad.yaml")
