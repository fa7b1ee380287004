"""The default calibration sets ship inside the package: same bytes as exllamav2's, clear
refusals when missing, and a built wheel calibrates on its own."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from cross_cpu import assert_stats_close

from vllm_miprun.pipeline import bundled, corpora

REPO = Path(__file__).resolve().parents[1]
EXLLAMA_NAMES = {"wiki": "wiki.utf8", "c4": "c4.utf8"}


def _exllamav2_corpus(filename: str) -> Path | None:
    if importlib.util.find_spec("exllamav2") is None:
        return None
    return bundled.corpus_dir() / filename


@pytest.mark.parametrize("name", ["wiki", "c4"])
def test_packaged_corpus_is_exllamav2_copy_byte_for_byte(name):
    """Same bytes, so the same documents in the same order: calibration tokens, score caches
    and plans made before the move stay valid."""
    filename = EXLLAMA_NAMES[name]
    source = _exllamav2_corpus(filename)
    if source is None:
        pytest.skip("exllamav2 is not installed; the SHA-256 test below still checks the bytes")
    assert bundled.packaged_corpus(filename) == source.read_bytes()


@pytest.mark.parametrize("name, documents", [("wiki", 2349), ("c4", 118)])
def test_packaged_corpus_matches_recorded_hash_and_size(name, documents):
    import hashlib

    filename = EXLLAMA_NAMES[name]
    raw = bundled.packaged_corpus(filename)
    assert hashlib.sha256(raw).hexdigest() == bundled.PACKAGED_CORPORA[filename]
    assert len(corpora.load_documents(name)) == documents


def test_missing_packaged_corpus_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(bundled, "DATA_DIR", tmp_path)
    with pytest.raises(corpora.CorpusError, match=r"pip install --force-reinstall vllm-miprun") as info:
        corpora.load_documents("wiki")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("tampered, message", [("other text", "SHA-256 differs"), ("not xz", "is corrupt")])
def test_tampered_packaged_corpus_is_refused(monkeypatch, tmp_path, tampered, message):
    import lzma

    raw = lzma.compress(b"one document\nanother document\n") if tampered == "other text" else b"not xz at all"
    (tmp_path / "c4.utf8.xz").write_bytes(raw)
    monkeypatch.setattr(bundled, "DATA_DIR", tmp_path)
    with pytest.raises(corpora.CorpusError, match=message) as info:
        corpora.load_documents("c4")
    assert "\n" not in str(info.value)


def test_cli_reports_missing_corpus_in_one_line(monkeypatch, tmp_path, tiny_llama_dir, capsys):
    from vllm_miprun.tools import cli

    monkeypatch.setattr(bundled, "DATA_DIR", tmp_path)
    code = cli.main(["calibrate", str(tiny_llama_dir), "--samples", "2", "--seq-len", "16",
                     "--cache-dir", str(tmp_path / "scores")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "pip install --force-reinstall vllm-miprun" in err


# --- the built wheel, installed alone -------------------------------------------------

HIDDEN = ("vllm_miprun", "__editable__", "exllamav2")


def _filtered_site_packages(view: Path) -> Path:
    """Symlinks to every entry of this interpreter's site-packages but vllm_miprun, its
    editable-install hooks, exllamav2 and ``.pth`` files."""
    import torch

    shared = Path(torch.__file__).resolve().parents[1]
    view.mkdir(parents=True)
    for entry in shared.iterdir():
        if entry.name.startswith(HIDDEN) or entry.suffix == ".pth":
            continue
        (view / entry.name).symlink_to(entry)
    return view


def _build_wheel(out: Path) -> Path:
    source = out / "src"
    shutil.copytree(REPO / "vllm_miprun", source / "vllm_miprun",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out / "dist"), str(source)], check=True)
    (wheel,) = (out / "dist").glob("vllm_miprun-*.whl")
    return wheel


@pytest.mark.slow
def test_built_wheel_calibrates_without_exllamav2(tmp_path, tiny_llama_dir):
    """Build the wheel, install it alone into a fresh virtual environment, and calibrate.

    The new venv reaches the heavy dependencies (torch, transformers, datasets) through one
    ``.pth`` line that points at a symlinked copy of this interpreter's site-packages with
    ``vllm_miprun``, its editable hooks and ``exllamav2`` left out. That keeps the test
    offline and fast (no multi-GB install), while proving what matters: the code and the
    ``wiki`` corpus come from the wheel, and exllamav2 is not needed. ``--system-site-packages``
    would not do: this interpreter is itself a venv, so that flag exposes the base Python's
    packages, not these. The scores must equal those of the source tree: the same text gives
the same fingerprint exactly and the same scores to float32's cross-CPU tolerance (this
process and the child run with different thread counts, so BLAS sums in another order).
    """
    wheel = _build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # dill (inside datasets) pickles modules by reference only when their path holds "site-packages"
    view = _filtered_site_packages(tmp_path / "shared" / "site-packages")
    (Path(purelib) / "shared_deps.pth").write_text(f"{view}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MIPRUN_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util, json, vllm_miprun; print(json.dumps("
         "[vllm_miprun.__file__, importlib.util.find_spec('exllamav2') is None]))"],
        check=True, capture_output=True, text=True, env=env, cwd=tmp_path)
    where, no_exllama = json.loads(probe.stdout)
    assert where.startswith(purelib) and no_exllama

    cache_dir = tmp_path / "wheel-scores"
    run = subprocess.run([str(env_dir / "bin" / "vllm-miprun"), "calibrate", str(tiny_llama_dir),
                          "--samples", "4", "--seq-len", "32", "--cache-dir", str(cache_dir)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "wrote score cache" in run.stdout

    from vllm_miprun.options import CalibrationSettings
    from vllm_miprun.pipeline.calibrate import calibrate

    ours = calibrate(tiny_llama_dir, CalibrationSettings(samples=4, seq_len=32),
                     cache_dir=tmp_path / "source-scores", progress=False).cache
    (written,) = cache_dir.glob("*.json")
    theirs = json.loads(written.read_text())
    assert theirs["fingerprint"] == ours.fingerprint
    assert_stats_close(theirs["block_scores"], ours.block_scores, "block_scores")
    assert_stats_close(theirs["span_scores"], ours.span_scores, "span_scores")
