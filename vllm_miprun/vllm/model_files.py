"""Where a served model's files are: a local folder, or a hub snapshot already on disk."""

from __future__ import annotations

from pathlib import Path

from vllm_miprun.errors import OptionError


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local folder for ``model``: the path itself, or an already cached hub snapshot."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        raise OptionError(
            f"miprun needs a local model folder or a cached hub snapshot, got {model!r}; "
            "download the model first (e.g. `huggingface-cli download`)"
        ) from None
