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
    (["model.depth=3"], r"unknown config key 'model.depth'. \(`autocdsr train --help`"),
    (["model.archh=bert4rec"], "unknown config key 'model.archh'. Did you mean model.arch\\?"),
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


def test_a_wrong_type_is_one_clear_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epochs=ten"])
    assert str(err.value).count("\n") == 0 and "train.epochs" in str(err.value)


def test_train_help_lists_every_key_with_its_default_and_meaning():
    from autocdsr.config import key_help, keys_text, valid_keys
    rows = key_help()
    assert [key for key, _, _ in rows] == valid_keys()
    assert all(meaning for _, _, meaning in rows)  # every key says what it is
    text = keys_text()
    assert "train.epochs=10" in text and "weighting.gate=false" in text
    assert "eval.ks=[5,10,20]" in text


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 4\n")
    with pytest.raises(ConfigError, match="c.yaml: unknown config key 'train.epoch'"):
        load_config(str(path))


def test_autocdsr_plus_defaults_to_four_tokens():
    from autocdsr.build import build_model, load_data
    from autocdsr.config import bottleneck_tokens
    cfg = load_config(None, ["objective=autocdsr_plus", "model.arch=bert4rec",
                             "data.synthetic_users=40"])
    assert bottleneck_tokens(cfg) == 4 and cfg.model.bottleneck_tokens == 0  # not written back
    assert build_model(cfg, load_data(cfg)[0]).encoder.num_bottleneck == 4
    three = load_config(None, ["objective=autocdsr_plus", "model.arch=bert4rec",
                               "model.bottleneck_tokens=3"])
    assert bottleneck_tokens(three) == 3
    other = load_config(None, ["objective=autocdsr", "model.arch=bert4rec",
                               "model.bottleneck_tokens=3"])
    assert bottleneck_tokens(other) == 0


def test_every_shipped_recipe_loads_and_passes_the_checks():
    """configs/DATASET/BACKBONE[_VARIANT].yaml: each recipe is a valid config whose backbone is
    the one its file name starts with, and every objective can be set on top of it."""
    import glob
    import os
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    recipes = sorted(glob.glob(os.path.join(root, "*", "*.yaml")))
    assert len(recipes) >= 3
    for path in recipes:
        cfg = load_config(path, ["data.path=somewhere"])
        assert cfg.model.arch == os.path.basename(path).removesuffix(".yaml").split("_")[0]
        objectives = ["autocdsr"] + (["autocdsr_plus"] if cfg.model.arch == "bert4rec" else [])
        for objective in objectives:
            load_config(path, [f"objective={objective}"])


def test_lists_restated_outside_the_torch_free_config_agree_with_their_owners():
    from autocdsr.config import CHOICES
    from autocdsr.evaluate import PROTOCOL_TEXT
    from kernels.attention import BACKENDS
    assert set(CHOICES["attention.backend"]) == {"auto", *BACKENDS}
    assert set(CHOICES["eval.protocol"]) == set(PROTOCOL_TEXT)
