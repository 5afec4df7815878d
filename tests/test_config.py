from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from nicd.config import DEFAULT_INCLUDE, find_config_file, load_config, parse_config
from nicd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path):
    """An environment with private XDG folders, so the real user's files never leak in."""
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
            "XDG_DATA_HOME": str(tmp_path / "xdg-data")}


def test_embedded_defaults(env, tmp_path):
    cfg = load_config(None, env)
    assert cfg.source is None
    assert cfg.storage.database == f"sqlite:///{tmp_path}/xdg-data/nicd/nicd.db"
    assert cfg.watch.roots == ()
    assert cfg.watch.include == DEFAULT_INCLUDE
    assert (cfg.watch.settle_seconds, cfg.watch.rescan_minutes) == (5.0, 30.0)
    assert (cfg.codec.model, cfg.codec.quality, cfg.codec.device, cfg.codec.batch_megapixels) == ("default", 6, "auto", 32.0)
    assert cfg.codec.encode_kwargs() == {"quality": 6, "refine_steps": 0}
    assert cfg.originals.policy == "keep"


def test_search_order(env, tmp_path):
    user = Path(env["XDG_CONFIG_HOME"]) / "nicd" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('[codec]\nquality = 3\n')
    assert load_config(None, env).codec.quality == 3
    assert find_config_file(None, env) == user

    via_env = tmp_path / "env.toml"
    via_env.write_text('[codec]\nquality = 4\n')
    assert load_config(None, {**env, "NICD_CONFIG": str(via_env)}).codec.quality == 4

    explicit = tmp_path / "explicit.toml"
    explicit.write_text('[codec]\nquality = 5\n')
    cfg = load_config(explicit, {**env, "NICD_CONFIG": str(via_env)})
    assert cfg.codec.quality == 5 and cfg.source == str(explicit)


@pytest.mark.parametrize("which", ["explicit", "env"])
def test_named_file_must_exist(env, tmp_path, which):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        if which == "explicit":
            load_config(missing, env)
        else:
            load_config(None, {**env, "NICD_CONFIG": str(missing)})
    assert str(missing) in str(ei.value)


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[watch]\nbogus = 1\n", "watch.bogus"),
        ("[codecs]\nquality = 1\n", "codecs"),
        ("[codec]\nquality = 0\n", "codec.quality"),
        ("[codec]\nquality = 9\n", "codec.quality"),
        ('[codec]\nquality = "6"\n', "codec.quality"),
        ("[codec]\nquality = 6.5\n", "codec.quality"),
        ("[codec]\nquality = true\n", "codec.quality"),
        ("[codec]\ntarget_ssim = 1.5\n", "codec.target_ssim"),
        ("[codec]\ntarget_psnr = -3\n", "codec.target_psnr"),
        ('[codec]\ndevice = "tpu"\n', "codec.device"),
        ("[codec]\nbatch_megapixels = 0\n", "codec.batch_megapixels"),
        ("[codec]\nrefine_steps = -1\n", "codec.refine_steps"),
        ("[codec]\nrefine_steps = 1001\n", "codec.refine_steps"),
        ("[codec]\nrefine_steps = 2.5\n", "codec.refine_steps"),
        ('[codec]\nmodel = ""\n', "codec.model"),
        ("[codec]\nquality = 5\ntarget_ssim = 0.9\n", "codec.target_ssim"),
        ('[originals]\npolicy = "move"\n', "originals.policy"),
        ('[watch]\nroots = "/srv/photos"\n', "watch.roots"),
        ("[watch]\nsettle_seconds = -1\n", "watch.settle_seconds"),
        ("[watch]\nrescan_minutes = 0\n", "watch.rescan_minutes"),
        ("[watch]\ninclude = [1, 2]\n", "watch.include"),
        ("[storage]\ndatabase = 3\n", "storage.database"),
        ("watch = 3\n", "watch"),
    ],
)
def test_bad_key_or_value_is_refused_naming_the_key(env, tmp_path, toml, key):
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as ei:
        load_config(p, env)
    assert str(ei.value).startswith(key + ":"), str(ei.value)


def test_not_toml(env, tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[watch\nroots = ")
    with pytest.raises(ConfigError) as ei:
        load_config(p, env)
    assert ei.value.code == "E_CONFIG_SYNTAX" and str(p) in str(ei.value)


def test_paths_resolve_against_the_config_folder(env, tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    p = d / "c.toml"
    p.write_text('[storage]\ndatabase = "state/n.db"\n[watch]\nroots = ["photos", "photos/", "/abs/x"]\n')
    cfg = load_config(p, env)
    assert cfg.storage.database == f"sqlite:///{d}/state/n.db"
    assert cfg.sqlite_path == f"{d}/state/n.db"
    assert cfg.watch.roots == (f"{d}/photos", "/abs/x")


def test_urls_pass_through(env, tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[storage]\ndatabase = "postgresql+psycopg://nicd:secret@db/nicd"\n')
    cfg = load_config(p, env)
    assert cfg.storage.database == "postgresql+psycopg://nicd:secret@db/nicd"
    assert cfg.sqlite_path is None


def test_target_replaces_quality(env):
    cfg = parse_config({"codec": {"target_ssim": 0.97}}, env=env)
    assert cfg.codec.quality is None
    assert cfg.codec.encode_kwargs() == {"target_ssim": 0.97, "refine_steps": 0}
    cfg = parse_config({"codec": {"target_psnr": 38, "refine_steps": 30}}, env=env)
    assert cfg.codec.encode_kwargs() == {"target_psnr": 38.0, "refine_steps": 30}


def test_database_inside_a_root_is_refused(env, tmp_path):
    with pytest.raises(ConfigError) as ei:
        parse_config({"storage": {"database": str(tmp_path / "photos" / "nicd.db")},
                      "watch": {"roots": [str(tmp_path / "photos")]}}, env=env)
    assert str(ei.value).startswith("storage.database:")
    # a sibling whose name merely starts the same is fine
    parse_config({"storage": {"database": str(tmp_path / "photos2" / "nicd.db")},
                  "watch": {"roots": [str(tmp_path / "photos")]}}, env=env)


def test_example_documents_every_key_with_its_default(env):
    """config.example.toml parses, holds every key of the schema, and its values are the defaults."""
    from nicd.config import SCHEMA

    example = REPO / "config.example.toml"
    data = tomllib.loads(example.read_text())
    assert {s: set(v) for s, v in data.items()} == {s: set(v) for s, v in SCHEMA.items()} | {
        "codec": set(SCHEMA["codec"]) - {"target_ssim", "target_psnr"}}
    text = example.read_text()
    assert "target_ssim" in text and "target_psnr" in text  # documented as the alternatives to quality
    cfg = load_config(example, env)
    defaults = load_config(None, env)
    assert cfg.watch == defaults.watch and cfg.codec == defaults.codec and cfg.originals == defaults.originals
    assert cfg.storage.database.endswith("/.local/share/nicd/nicd.db")
