"""Hub snapshot aliases: which weights a hub commit holds, known without its shards.

The score cache is keyed by the weights' fingerprint (``model/fingerprint.py``), which
samples every tensor, so computing it needs every shard on disk. A hub snapshot has a
second content identity that needs no weights: its commit. huggingface_hub's cache (and
so vLLM's) puts a snapshot at ``.../models--org--name/snapshots/<40-hex commit>/``, and a
git commit covers every file's content (the LFS pointer files carry each shard's sha256).
So once a complete snapshot has been fingerprinted, an alias (repo id, commit) ->
fingerprint lets a snapshot of the same commit that holds only ``config.json`` and the
index (a restart, or a replica with its own download folder sharing the cache folder)
find its score cache, and then fetch only the kept blocks' shards.

An alias is a small JSON file beside the score caches (``hub-<repo>-<commit>.alias.json``
in the cache folder the options resolve to), written atomically, never pickled. It
records the repo id, the commit, the fingerprint, and the sha256 of ``config.json`` and
the safetensors index. On read every field is checked against the folder at hand. A file
that is unreadable, corrupt, of a newer format, or made for another repo, commit or
metadata is **ignored with a warning**, not refused: the alias is only a shortcut, and
without it the caller downloads every shard and fingerprints them, which is always right
(and rewrites the alias), so a bad alias costs one full download, never a wrong plan or a
failed serve. The score cache an alias leads to is still checked as always (fingerprint,
calibration settings, block count).

Trust: like vLLM and huggingface_hub when they serve from that cache, an alias trusts that
a folder in the hub cache layout holds what the hub served for its commit; a snapshot whose
weights were edited in place would record the edited weights' fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from vllm_miprun.errors import ModelFolderError
from vllm_miprun.model.checkpoint import CONFIG_NAME, INDEX_NAME, missing_shards
from vllm_miprun.model.fingerprint import model_fingerprint
from vllm_miprun.pipeline import store

logger = logging.getLogger(__name__)

ALIAS_FORMAT = "vllm-miprun-hub-alias"
ALIAS_FORMAT_VERSION = 1
# The files an alias pins: a snapshot whose config or index differ is not the one scored.
PINNED_FILES = (CONFIG_NAME, INDEX_NAME)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


class MissingWeightsError(ModelFolderError):
    """The folder lacks shards that this step reads (a hub snapshot fetched in part).

    A hub id's planning catches it and downloads every shard (``vllm/model_files.py``);
    for a local folder it is the one-line error the user sees."""


@dataclass(frozen=True)
class SnapshotId:
    repo_id: str
    commit: str


def snapshot_id(model_dir: str | Path) -> SnapshotId | None:
    """(repo id, commit) of a folder in the hub cache layout, else None (any other folder)."""
    folder = Path(model_dir).expanduser().resolve()
    repo, snapshots = folder.parent.parent.name, folder.parent.name
    if not _COMMIT.fullmatch(folder.name) or snapshots != "snapshots" or not repo.startswith("models--"):
        return None
    parts = repo[len("models--"):].split("--")  # the hub forbids "--" inside a name
    if not all(parts) or len(parts) > 2:
        return None
    return SnapshotId("/".join(parts), folder.name)


def has_every_shard(model_dir: str | Path) -> bool:
    """Whether every shard is on disk: the index's, or (no index) at least one file."""
    if (Path(model_dir) / INDEX_NAME).is_file():
        return not missing_shards(model_dir)
    return any(Path(model_dir).glob("*.safetensors"))


def alias_path(snapshot: SnapshotId, cache_dir: str | Path | None = None) -> Path:
    """The alias file; its name never starts with a commit, so score-cache globs skip it."""
    return store.cache_folder(cache_dir) / f"hub-{store.safe_name(snapshot.repo_id)}-{snapshot.commit}.alias.json"


def pinned_digests(model_dir: str | Path) -> dict[str, str | None]:
    """sha256 of each pinned file (None when absent)."""
    out: dict[str, str | None] = {}
    for name in PINNED_FILES:
        path = Path(model_dir) / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return out


def weights_fingerprint(model_dir: str | Path, cache_dir: str | Path | None = None,
                        record: bool = True) -> str:
    """The weights' fingerprint: computed when every shard is there (and, with ``record``,
    written as the hub alias of a snapshot), else read from the hub alias.

    Raises ``MissingWeightsError`` for a folder that lacks shards and has no valid alias."""
    missing = missing_shards(model_dir)
    if not missing and (snapshot_id(model_dir) is None or has_every_shard(model_dir)):
        fingerprint = model_fingerprint(model_dir)  # a folder with no weights at all: its own error
        if record:
            record_alias(model_dir, fingerprint, cache_dir)
        return fingerprint
    fingerprint = read_alias(model_dir, cache_dir)
    if fingerprint is None:
        raise MissingWeightsError(
            f"{model_dir} lacks the shards {missing or ['*.safetensors']}, and the score cache is keyed by a "
            "fingerprint that samples every shard (a hub snapshot is known by its commit only after a "
            "complete copy of it was scored with this cache folder); fetch them, or plan with a drop "
            "list or method last/random"
        )
    return fingerprint


def known_fingerprint(model_dir: str | Path, cache_dir: str | Path | None = None) -> str | None:
    """:func:`weights_fingerprint` without recording, or None where it cannot be known."""
    try:
        return weights_fingerprint(model_dir, cache_dir, record=False)
    except MissingWeightsError:
        return None


def record_alias(model_dir: str | Path, fingerprint: str, cache_dir: str | Path | None = None) -> Path | None:
    """Write the alias of a complete hub snapshot (nothing for other folders, or when it is
    already there). A cache folder that cannot take it costs a warning, not the plan."""
    snapshot = snapshot_id(model_dir)
    if snapshot is None or not has_every_shard(model_dir):
        return None
    record = {"format": ALIAS_FORMAT, "format_version": ALIAS_FORMAT_VERSION, "repo_id": snapshot.repo_id,
              "commit": snapshot.commit, "fingerprint": fingerprint, "pinned_sha256": pinned_digests(model_dir)}
    path = alias_path(snapshot, cache_dir)
    try:
        if json.loads(path.read_text(encoding="utf-8")) == record:
            return path
    except (OSError, ValueError, RecursionError):
        pass
    try:
        store.ensure_writable(path.parent)
        store.atomic_write_text(path, json.dumps(record, indent=1))
    except store.CacheError as err:
        logger.warning("could not record the hub alias of %s@%s (%s); a snapshot of it without every shard "
                       "will download them all to find its scores", snapshot.repo_id, snapshot.commit, err)
        return None
    logger.info("recorded hub alias %s: %s@%s has weights %s", path, snapshot.repo_id, snapshot.commit,
                fingerprint[:19])
    return path


def read_alias(model_dir: str | Path, cache_dir: str | Path | None = None) -> str | None:
    """The fingerprint recorded for this hub snapshot's commit; None when there is no valid
    alias (a rejected one is named in a warning, see the module doc)."""
    snapshot = snapshot_id(model_dir)
    if snapshot is None:
        return None
    path = alias_path(snapshot, cache_dir)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
        problem = alias_problem(record, snapshot, pinned_digests(model_dir))
    except (OSError, ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        problem = f"it cannot be read ({type(err).__name__}: {err})"
    if problem:
        logger.warning("ignoring hub alias %s: %s; %s@%s needs every shard to find its scores",
                       path, problem, snapshot.repo_id, snapshot.commit)
        return None
    return record["fingerprint"]


def alias_problem(record, snapshot: SnapshotId, digests: dict[str, str | None]) -> str | None:
    """Why ``record`` is not a valid alias of ``snapshot`` with these pinned files, or None."""
    if not isinstance(record, dict) or record.get("format") != ALIAS_FORMAT:
        return f"not a JSON object with format={ALIAS_FORMAT!r}"
    version = record.get("format_version")
    if type(version) is not int or not 1 <= version <= ALIAS_FORMAT_VERSION:  # True is an int too
        return f"format_version {version!r} is not one this vllm-miprun reads ({ALIAS_FORMAT_VERSION})"
    made_for = (record.get("repo_id"), record.get("commit"))
    if made_for != (snapshot.repo_id, snapshot.commit):
        return f"it was made for {made_for[0]}@{made_for[1]}, not {snapshot.repo_id}@{snapshot.commit}"
    if not isinstance(record.get("fingerprint"), str) or not _FINGERPRINT.fullmatch(record["fingerprint"]):
        return "its fingerprint is not sha256:<64 hex>"
    if digests.get(CONFIG_NAME) is None or record.get("pinned_sha256") != digests:
        return f"its {' and '.join(PINNED_FILES)} digests differ from this snapshot's"
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a hub alias")
