"""Generated assets (the tiny model, the arithmetic task) go only to bigscale's own folder and
never over a file; a user's data or model path is read, never written or replaced by a guess."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bigscale.config.compose import compose_config
from bigscale.config.validate import Hardware, validate
from bigscale.errors import ConfigError, ModelError
from bigscale.home import bigscale_home
from bigscale.train.assets import prepare_assets

SMALL_MODEL = [
    "experiment=arithmetic",
    "model.create_if_missing.hidden_size=16",
    "model.create_if_missing.num_layers=1",
    "model.create_if_missing.num_heads=2",
    "model.create_if_missing.intermediate_size=32",
]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BIGSCALE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_home_is_one_definition_used_by_the_presets(home: Path, monkeypatch) -> None:
    cfg = compose_config(["experiment=arithmetic"])
    assert Path(cfg.model.name_or_path) == home / "models" / "tiny-llama"
    assert Path(cfg.data.path) == home / "data" / "arithmetic" / "train.jsonl"
    monkeypatch.delenv("BIGSCALE_HOME")
    assert bigscale_home() == Path.cwd() / ".cache" / "bigscale"
    assert Path(compose_config([]).data.test_path).parent == bigscale_home() / "data" / "dates"


def test_default_presets_create_their_assets_once(home: Path) -> None:
    cfg = compose_config(SMALL_MODEL)
    validate(cfg, 2, Hardware())
    prepare_assets(cfg)
    model = home / "models" / "tiny-llama"
    files = [home / "data" / "arithmetic" / n for n in ("train", "validation", "test")]
    files = [f.with_suffix(".jsonl") for f in files]
    assert (model / "config.json").is_file() and all(f.is_file() for f in files)
    before = {p: digest(p) for p in [model / "config.json", *files]}
    prepare_assets(cfg)
    assert {p: digest(p) for p in before} == before


def test_demo_preset_never_writes_a_user_data_file(home: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "MY_CORPUS.jsonl"
    corpus.write_text('{"body": "my own text"}\n')
    before = digest(corpus)
    cfg = compose_config(["experiment=arithmetic", f"data.path={corpus}", "data.text_field=body"])
    for check in (lambda: validate(cfg, 2, Hardware()), lambda: prepare_assets(cfg)):
        with pytest.raises(ConfigError) as err:
            check()
        msg = str(err.value)
        assert f"data.path={corpus}" in msg and "data=arithmetic" in msg
        assert "data=text_files" in msg and "data=sft_files" in msg
    assert digest(corpus) == before
    assert not (home / "data").exists()


def test_demo_preset_refuses_a_user_validation_path(home: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        ["experiment=arithmetic", f"data.validation_path={tmp_path / 'val.jsonl'}"]
    )
    with pytest.raises(ConfigError, match="data.validation_path="):
        validate(cfg, 2, Hardware())
    assert not (tmp_path / "val.jsonl").exists()


def test_mistyped_model_path_under_the_tiny_preset_is_an_error(home: Path, tmp_path: Path) -> None:
    typo = tmp_path / "path" / "to" / "typo"
    cfg = compose_config(["experiment=arithmetic", f"model.name_or_path={typo}"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 2, Hardware())
    assert f"model.name_or_path={typo} does not exist" in str(err.value)
    assert str(home / "models") in str(err.value)
    with pytest.raises(ConfigError):
        prepare_assets(cfg)
    assert not typo.exists() and not typo.parent.exists()


def test_directory_without_config_json_is_not_a_model(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mymodel"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    cfg = compose_config(["experiment=arithmetic", f"model.name_or_path={folder}"])
    with pytest.raises(ConfigError, match="is a directory without config.json"):
        validate(cfg, 2, Hardware())
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_occupied_tiny_model_folder_is_refused_not_replaced(home: Path) -> None:
    folder = home / "models" / "tiny-llama"
    folder.mkdir(parents=True)
    (folder / "partial.bin").write_text("x")
    cfg = compose_config(SMALL_MODEL)
    with pytest.raises(ConfigError, match="holds no config.json"):
        validate(cfg, 2, Hardware())
    from bigscale.model.tiny import create_tiny_model

    assert cfg.model.create_if_missing is not None
    with pytest.raises(ModelError, match="something else is there"):
        create_tiny_model(folder, cfg.model.create_if_missing)
    assert sorted(p.name for p in folder.iterdir()) == ["partial.bin"]


def test_existing_model_at_a_user_path_is_loaded_not_recreated(home: Path, tmp_path: Path) -> None:
    from bigscale.model.tiny import create_tiny_model

    mine = tmp_path / "mine"
    cfg = compose_config(["experiment=arithmetic", f"model.name_or_path={mine}", *SMALL_MODEL])
    assert cfg.model.create_if_missing is not None
    create_tiny_model(mine, cfg.model.create_if_missing)  # stands in for the user's own model
    before = digest(mine / "config.json")
    validate(cfg, 2, Hardware())
    prepare_assets(cfg)
    assert digest(mine / "config.json") == before
    assert not (home / "models").exists()
