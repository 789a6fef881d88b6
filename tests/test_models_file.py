"""Declaring many models: repeated --model, --models-file, aliases; each mistake is named at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.__main__ import build_parser, parse_serve
from server.config import (
    DEFAULT_EMBEDDING_MODEL_NAME,
    DEFAULT_MODEL_NAME,
    Alias,
    ModelSpec,
    Settings,
    SettingsError,
)

EMBED = (DEFAULT_EMBEDDING_MODEL_NAME, None)  # served beside the chat model(s) unless --embedding-model none


def _settings(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    parser, serve = build_parser()
    args, _ = parse_serve(parser, serve, ["serve", *argv], environ or {})
    return Settings.from_mapping(vars(args))


def test_one_plain_model_keeps_its_meaning() -> None:
    s = _settings(["--model", "/models/foo/", "--served-model-name", "foo"])
    assert s.models == () and s.model == "/models/foo/"
    assert [(m.name, m.source) for m in s.served_models] == [("foo", "/models/foo/"), EMBED]
    assert [(m.name, m.kind) for m in _settings([]).served_models] == [(DEFAULT_MODEL_NAME, "generate"),
                                                                       (DEFAULT_EMBEDDING_MODEL_NAME, "embed")]


def test_the_embedding_model_is_served_beside_unless_turned_off() -> None:
    assert [m.name for m in _settings(["--embedding-model", "none"]).served_models] == [DEFAULT_MODEL_NAME]
    assert [(m.name, m.source, m.kind) for m in _settings(["--embedding-model", "/m/e5"]).served_models][1] == (
        DEFAULT_EMBEDDING_MODEL_NAME, "/m/e5", "embed")
    assert _settings([], {"LLM_SERVICE_EMBEDDING_MODEL": "none"}).embedding_model is None
    # a declared model of that name takes its place
    s = _settings(["--model", f"{DEFAULT_EMBEDDING_MODEL_NAME}=/m/other"])
    assert [(m.name, m.kind) for m in s.served_models] == [(DEFAULT_EMBEDDING_MODEL_NAME, "generate")]


def test_a_models_file_declares_kinds(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text("models:\n  - {name: chat}\n  - {name: e5, source: /m/e5, kind: embed}\n"
                 "aliases:\n  vectors: e5\n")
    s = _settings(["--models-file", str(f), "--embedding-model", "none"])
    assert [(m.name, m.kind) for m in s.served_models] == [("chat", "generate"), ("e5", "embed")]
    f.write_text("models:\n  - {name: e5, kind: vectors}\n")
    with pytest.raises(SettingsError, match="'kind' must be one of generate, embed"):
        _settings(["--models-file", str(f)])
    f.write_text("models:\n  - {name: chat}\n  - {name: e5, kind: embed}\naliases:\n  both: {chat: 1, e5: 1}\n")
    with pytest.raises(SettingsError, match="mixes generating and embedding models"):
        _settings(["--models-file", str(f)])


def test_repeated_model_flags_name_each_model() -> None:
    s = _settings(["--model", "small=default", "--model", "big=/models/big", "--model", "org/some-model"])
    assert [(m.name, m.source) for m in s.served_models] == [
        ("small", None), ("big", "/models/big"), ("org/some-model", "org/some-model"), EMBED]
    # the environment variable takes a comma-separated list, like every repeatable flag
    s = _settings([], {"LLM_SERVICE_MODEL": "a=default,b=/m/b"})
    assert [m.name for m in s.served_models] == ["a", "b", DEFAULT_EMBEDDING_MODEL_NAME]


def test_several_models_cannot_share_served_model_name() -> None:
    with pytest.raises(SettingsError, match="--served-model-name"):
        _settings(["--model", "a=default", "--model", "b=/m", "--served-model-name", "x"])
    with pytest.raises(SettingsError, match="declared twice: a"):
        _settings(["--model", "a=default", "--model", "a=/m"])


def test_models_file(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("""
models:
  - name: chat-small
    engine: transformers
    settings: {max_model_len: 2048, kv_cache_space: 0.5}
  - name: tiny
    source: /models/tiny
    preload: false
aliases:
  chat: chat-small
  trial: {chat-small: 9, tiny: 1}
""")
    s = _settings(["--models-file", str(path), "--engine", "vllm"])
    small, tiny, _ = s.served_models
    assert (small.source, small.engine, small.preload) == (None, "transformers", True)
    assert (tiny.source, tiny.engine, tiny.preload) == ("/models/tiny", None, False)
    engine_settings = small.engine_settings(s)
    assert (engine_settings.model_name, engine_settings.engine, engine_settings.max_model_len) == ("chat-small", "transformers", 2048)
    assert tiny.engine_settings(s).engine == "vllm"  # the server's --engine
    assert s.aliases == (Alias("chat", (("chat-small", 1.0),)), Alias("trial", (("chat-small", 9.0), ("tiny", 1.0))))
    assert s.aliases[1].describe() == {"chat-small": 0.9, "tiny": 0.1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: {a: 1}", "must be a mapping with a 'models:' list"),
        ("models: [{source: /m}]", "'name' must be a non-empty string"),
        ("models: [{name: a, sorce: /m}]", "unknown field(s) sorce"),
        ("models: [{name: a, engine: tgi}]", "'engine' must be one of"),
        ("models: [{name: a, preload: maybe}]", "'preload' must be true or false"),
        ("models: [{name: a, settings: {port: 1}}]", "'settings' cannot set port"),
        ("models: [{name: a, settings: {max_model_len: 0}}]", "model 'a': --max-model-len: must be at least 1"),
        ("models: [{name: a}, {name: a}]", "declared twice: a"),
        ("models: [{name: a}]\naliases: {b: c}", "alias 'b' points at undeclared model(s) c"),
        ("models: [{name: a}]\naliases: {a: a}", "alias 'a' has the name of a model"),
        ("models: [{name: a}]\naliases: {b: {a: -1}}", "the weight of 'a' must be a positive number"),
        ("models: [{name: a}]\nextra: 1", "unknown section(s) extra"),
        ("models: [", "is not valid YAML"),
    ],
)
def test_models_file_mistakes_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError, match="--models-file") as e:
        _settings(["--models-file", str(path)])
    assert message in str(e.value)


def test_missing_models_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"--models-file: cannot read .*nope.yaml"):
        _settings(["--models-file", str(tmp_path / "nope.yaml")])


def test_model_spec_from_an_admin_body() -> None:
    spec = ModelSpec.from_dict({"name": "x", "source": "/m", "settings": {"dtype": "float32"}})
    assert spec == ModelSpec("x", "/m", None, True, (("dtype", "float32"),))
    assert spec.describe() == {"name": "x", "kind": "generate", "source": "/m", "engine": None, "preload": True, "settings": {"dtype": "float32"}}


def test_many_model_settings_are_checked() -> None:
    for kwargs, flag in (({"memory_budget": 0}, "--memory-budget"), ({"idle_unload": -1}, "--idle-unload"),
                         ({"load_wait": -1}, "--load-wait")):
        with pytest.raises(SettingsError, match=flag):
            Settings(**kwargs)  # type: ignore[arg-type]


def test_the_embedding_model_keeps_its_own_sizing() -> None:
    """The server's sizing flags are the chat model's: an encoder of 256 tokens does not take them."""
    s = _settings(["--max-model-len", "4096", "--kv-cache-space", "2", "--max-num-seqs", "8"])
    chat, embed = s.served_models
    assert (chat.engine_settings(s).max_model_len, chat.engine_settings(s).max_num_seqs) == (4096, 8)
    own = embed.engine_settings(s)
    assert (own.max_model_len, own.kv_cache_space, own.max_num_seqs, own.model_kind) == (None, None, None, "embed")
    # only the default one may fail without ending the start; one asked for by name is required
    assert not embed.required and _settings(["--embedding-model", "/m/e5"]).served_models[1].required
