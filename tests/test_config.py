from pathlib import Path

import pytest

from engine.config.run_config import load_config, parse_override
from engine.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_defaults_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, 'prompts = ["faq"]\n[input]\npaths = ["data/*.jsonl"]\n[output]\ndir = "out"\n'))
    assert cfg.input.paths == [str(tmp_path / "data/*.jsonl")]
    assert cfg.output.dir == str(tmp_path / "out")
    assert cfg.backend == "torch" and cfg.input.text_column == "text" and cfg.input.id_column == "id"


def test_overrides_are_typed_and_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, '[input]\npaths = ["a.jsonl"]\n'),
                      ["sampling.max_new_tokens=64", "sampling.temperature=0", "output.dir=o2",
                       'prompts=["faq","math"]', "backend=instant"])
    assert cfg.sampling.max_new_tokens == 64
    assert cfg.sampling.temperature == 0.0 and isinstance(cfg.sampling.temperature, float)
    assert cfg.output.dir == str(tmp_path / "o2")
    assert cfg.prompts == ["faq", "math"] and cfg.backend == "instant"


@pytest.mark.parametrize("text,override,needle", [
    ('[input]\npaths=["a"]\nbogus = 1\n', [], "unknown config key 'input.bogus'"),
    ('[input]\npaths=["a"]\n', ["sampling.max_new_token=3"], "unknown config key 'sampling.max_new_token'"),
    ('[input]\npaths=["a"]\n', ["sampling.max_new_tokens=abc"], "sampling.max_new_tokens"),
    ('[input]\npaths=["a"]\n', ["sampling.top_p=1.5"], "sampling.top_p"),
    ('[input]\npaths=["a"]\n', ["backend=tensorrt"], "unknown backend 'tensorrt'"),
    ('[input]\npaths=["a"]\n[sampling]\ntemperature = "hot"\n', [], "sampling.temperature"),
    ('input = 3\n', [], "config key 'input' is a section"),
    ('prompts = []\n[input]\npaths=["a"]\n', [], "prompts"),
])
def test_bad_keys_and_values_are_named(tmp_path, text, override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_config(write(tmp_path, text), override)


def test_parse_override_falls_back_to_string():
    assert parse_override("model.name=/some/path") == (["model", "name"], "/some/path")
    assert parse_override("torch.prefix_cache=false") == (["torch", "prefix_cache"], False)
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "this is = = not toml"))


def test_shipped_run_configs_load():
    repo = Path(__file__).resolve().parent.parent
    for path in sorted((repo / "runs").glob("*.toml")):
        load_config(path)
