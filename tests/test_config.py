import re
from pathlib import Path

import pytest

from engine.config.backends import BACKENDS, canonical, traits
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
    ('[input]\npaths=["a"]\n', ["backend=tensorrt"], "unknown backend 'tensorrt' (one of torch, instant, vllm, sglang, "
                                                    "http, sglang-http (= http))"),
    ('[input]\npaths=["a"]\n', ["backend=http"], "'http.urls': backend 'http' needs one or more server URLs"),
    ('[input]\npaths=["a"]\n[sampling]\ntemperature = "hot"\n', [], "sampling.temperature"),
    ('input = 3\n', [], "config key 'input' is a section"),
    ('prompts = []\n[input]\npaths=["a"]\n', [], "prompts"),
    ('[input]\npaths=["a"]\n', ["render.layout=doc_first"],
     "config key 'render.layout': 'doc_first' is not a layout; use \"document_last\" or \"document_first\""),
])
def test_bad_keys_and_values_are_named(tmp_path, text, override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
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


def test_sglang_http_is_an_alias_of_http_resolved_when_the_config_loads(tmp_path, caplog):
    text = '[input]\npaths = ["a"]\n[http]\nurls = ["http://h1:30000"]\n'
    with caplog.at_level("INFO"):
        cfg = load_config(write(tmp_path, 'backend = "sglang-http"\n' + text))
    assert cfg.backend == "http" and "alias" in caplog.text
    assert load_config(write(tmp_path, text), ["backend=sglang-http"]).backend == "http"
    assert traits("sglang-http") is traits("http") and canonical("sglang-http") == "http"
    with pytest.raises(ConfigError, match="'http.urls': backend 'http'"):
        load_config(write(tmp_path, '[input]\npaths = ["a"]\n'), ["backend=sglang-http"])


def test_every_registered_backend_names_a_module_with_its_class():
    """The registry names each backend's module (imported lazily by make_backend); the module's BACKEND
    class builds it from the config. Checked on the source: vllm and sglang need large installs."""
    import ast
    import importlib.util

    for name, t in BACKENDS.items():
        assert t.name == name and traits(name) is t
        spec = importlib.util.find_spec(t.module)
        assert spec is not None, t.module
        tree = ast.parse(Path(spec.origin).read_text())
        (alias,) = [n for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "BACKEND"]
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == ast.unparse(alias.value))
        assert any(isinstance(f, ast.FunctionDef) and f.name == "from_config" for f in cls.body), name
        assert any(isinstance(f, ast.Assign) and ast.unparse(f.targets[0]) == "name" and f.value.value == name
                   for f in cls.body) or name == "torch", name
    assert [n for n, t in BACKENDS.items() if t.model_free] == ["instant"]
    assert [n for n, t in BACKENDS.items() if not t.in_process] == ["http"]
    assert {n: t.context_reserve for n, t in BACKENDS.items() if t.context_reserve} == {"sglang": 2, "http": 2}
