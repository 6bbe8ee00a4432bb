import pytest
import yaml

from mlabel.config import ConfigError, list_recipes, load_config


def test_defaults_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 5\n  lr: 0.01\nmodel:\n  backbone: test_vit\n")
    cfg = load_config(recipe, ["train.epochs=3", "data.root=/x", "loss.pos_weight=[1, 2.5]",
                               "model.pretrained=false", "data.val=null"])
    assert cfg.train.epochs == 3                 # override beats recipe
    assert cfg.train.lr == 0.01                  # recipe beats default
    assert cfg.train.weight_decay == 0.05        # default kept
    assert cfg.model.backbone == "test_vit"
    assert cfg.data.root == "/x"
    assert cfg.loss.pos_weight == [1.0, 2.5]
    assert cfg.model.pretrained is False and cfg.data.val is None


def test_int_is_accepted_where_float_declared():
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override,fragment", [
    ("train.epoch=3", "unknown key 'train.epoch' \\(did you mean 'train.epochs'\\?\\); valid keys here: .*epochs"),
    ("trian.epochs=3", "unknown key 'trian' \\(did you mean 'train.epochs'\\?\\); valid keys here: .*train"),
    ("train.epochs=three", "'train.epochs' must be int, got 'three'"),
    ("train.epochs=2.5", "'train.epochs' must be int"),
    ("data.format=parquet", r"'data.format' must be 'csv' \| 'folder'"),
    ("loss.pos_weight=sometimes", r"'auto' \| 'sqrt' \| 'none' \| list of float"),
    ("task=regression", r"'auto' \| 'multilabel' \| 'binary'"),
    ("train=3", "'train' is a section"),
    ("seed.x=1", "'seed' is a value, not a section"),
    ("epochs", "not of the form key=value"),
    ("train.epochs=0", r"train.epochs must lie in \[1, 100000\], got 0"),
    # every count a run allocates by has a ceiling a real run can afford (a 1e8-resample bootstrap
    # grew to 19.5 GB before this)
    ("thresholds.bootstrap=100000000", r"thresholds.bootstrap must lie in \[0, 10000\]"),
    ("thresholds.bins=1000000000", r"thresholds.bins must lie in \[2, 65536\]"),
    ("data.batch_size=10000000", r"data.batch_size must lie in \[1, 65536\]"),
    ("data.shuffle_buffer=1000000000", r"data.shuffle_buffer must lie in \[1, 1000000\]"),
    ("thresholds.cross_fit=100000", r"thresholds.cross_fit must lie in \[0, 100\]"),
    ("data.val_fraction=1.5", r"must lie in \[0, 1\)"),
])
def test_bad_overrides_fail_with_valid_choices(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_unknown_key_in_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  backbone: x\n  pretrain: true\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.pretrain'.*pretrained"):
        load_config(recipe)


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("no_such_recipe")


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_loads(name):
    cfg = load_config(name)
    assert cfg.out_dir.startswith("runs/")


def test_shipped_recipes_exist():
    assert {"quickstart", "dogcat", "miml_scene"} <= set(list_recipes())


def test_saved_config_round_trips(tmp_path):
    from mlabel.config import config_from_dict, config_to_dict
    cfg = load_config("quickstart", ["train.epochs=2"])
    text = yaml.safe_dump(config_to_dict(cfg))
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_a_folder_named_like_a_shipped_recipe_does_not_hide_it(tmp_path, monkeypatch):
    """``mlabel train quickstart`` where ``./quickstart/`` is a run directory still means the recipe."""
    (tmp_path / "quickstart").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("quickstart", []).data.generate == "scenes"


@pytest.mark.parametrize("text", ["", "\n\n", "# data:\n#   root: photos\n"])
def test_an_empty_recipe_is_refused_not_read_as_the_defaults(tmp_path, text):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=f"recipe {recipe} is empty"):
        load_config(str(recipe))


def test_a_recipe_that_is_not_yaml_is_one_line_naming_file_and_line(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("task: multilabel\ndata:\n  root: photos\n train: [a.csv\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(recipe))
    message = str(caught.value)
    assert message.startswith(f"recipe {recipe}:4 is not valid YAML (") and "\n" not in message, message
