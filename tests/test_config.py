"""Config: defaults, YAML, overrides, and errors that say what is wrong."""
import pytest

from autocdsr.config import ConfigError, load_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: bert4rec\n  layers: 3\ntrain:\n  epochs: 4\n")
    cfg = load_config(str(path), ["train.epochs=7", "eval.ks=[1,5]"])
    assert cfg.model.arch == "bert4rec" and cfg.model.layers == 3
    assert cfg.train.epochs == 7 and list(cfg.eval.ks) == [1, 5]


@pytest.mark.parametrize("overrides,message", [
    (["model.depth=3"], "unknown config key 'model.depth'. Valid keys: data.path"),
    (["train.epochs=many"], "train.epochs"),
    (["model.arch=gru"], "model.arch must be one of sasrec, bert4rec"),
    (["train.batch_size=0"], "train.batch_size must be >= 1"),
    (["data.max_len=1"], "data.max_len must be >= 2"),
    (["model.hidden=64", "model.heads=8"], "must be in 16..128"),
    (["model.hidden=64", "model.heads=3"], "divisible"),
    (["objective=autocdsr_plus"], "future leakage"),
    (["model.bottleneck_tokens=4"], "future"),
    (["epochs"], "key=value"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 4\n")
    with pytest.raises(ConfigError, match="c.yaml: unknown config key 'train.epoch'"):
        load_config(str(path))


def test_autocdsr_plus_defaults_to_four_tokens():
    cfg = load_config(None, ["objective=autocdsr_plus", "model.arch=bert4rec"])
    assert cfg.model.bottleneck_tokens == 4
