"""A fake model hub for offline tests: the network calls are the only thing replaced.

``FakeHub`` holds one repository (a sharded tiny checkpoint) and answers the three hub
calls vLLM's download path makes: ``HfApi.snapshot_download``, ``HfApi.hf_hub_download``
and ``HfFileSystem.ls``. Downloads are written in the real Hugging Face cache layout
(``models--org--name/refs/<rev>``, ``snapshots/<commit>/``), so offline lookups
(``local_files_only=True``) go to the real ``huggingface_hub`` code and so can a vLLM
engine started with ``HF_HUB_OFFLINE=1``. Every call is recorded for assertions.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

REPO_ID = "org/tiny"
BLOCKS_PER_SHARD = 2


def write_sharded_repo(tiny_model_dir: Path, repo: Path, blocks_per_shard: int = BLOCKS_PER_SHARD) -> dict[str, str]:
    """Copy a tiny model into ``repo`` with its tensors split by block into shards:
    the first shard also holds the embeddings, the last only the final norm and lm_head.
    Returns the weight map."""
    from safetensors.torch import load_file, save_file

    from vllm_miprun.model.remap import layer_index

    repo.mkdir(parents=True)
    for item in tiny_model_dir.iterdir():
        if item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            shutil.copy2(item, repo / item.name)
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    num_blocks = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    num_shards = -(-num_blocks // blocks_per_shard) + 1
    name = "model-{:05d}-of-{:05d}.safetensors".format
    groups: dict[str, dict] = {}
    for key, tensor in tensors.items():
        index = layer_index(key)
        if index is not None:
            shard = index // blocks_per_shard + 1
        else:
            shard = 1 if "embed_tokens" in key else num_shards
        groups.setdefault(name(shard, num_shards), {})[key] = tensor
    weight_map = {}
    for shard, group in groups.items():
        save_file(group, str(repo / shard), metadata={"format": "pt"})
        weight_map.update({key: shard for key in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (repo / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return weight_map


def expected_shards(weight_map: dict[str, str], kept) -> list[str]:
    """The shards holding non-block tensors or tensors of the kept blocks (test's own count)."""
    import re

    keep = set(kept)
    out = set()
    for key, shard in weight_map.items():
        match = re.match(r"model\.layers\.(\d+)\.", key)
        if match is None or int(match.group(1)) in keep:
            out.add(shard)
    return sorted(out)


class FakeHub:
    def __init__(self, repo: Path, default_cache: Path, repo_id: str = REPO_ID):
        self.repo, self.repo_id, self.default_cache = repo, repo_id, default_cache
        self.calls: list[dict] = []

    def commit(self, revision: str | None) -> str:
        return hashlib.sha1(f"{self.repo_id}@{revision or 'main'}".encode()).hexdigest()

    def snapshot_folder(self, cache_dir, revision) -> Path:
        root = Path(cache_dir or self.default_cache) / ("models--" + self.repo_id.replace("/", "--"))
        return root / "snapshots" / self.commit(revision)

    def _store(self, names, cache_dir, revision) -> Path:
        folder = self.snapshot_folder(cache_dir, revision)
        refs = folder.parent.parent / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / (revision or "main")).write_text(self.commit(revision))
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(self.repo / name, folder / name)
        return folder

    def files(self) -> list[str]:
        return sorted(p.name for p in self.repo.iterdir())

    # --- the hub calls (bound in ``install``) -------------------------------------
    def snapshot_download(self, original, api, repo_id, **kwargs):
        self.calls.append({"call": "snapshot_download", "repo_id": repo_id, **kwargs})
        assert repo_id == self.repo_id, f"unexpected repo {repo_id}"
        if kwargs.get("local_files_only"):  # the real offline lookup in the real layout
            return original(api, repo_id, **kwargs)
        from huggingface_hub.utils import filter_repo_objects

        names = list(filter_repo_objects(self.files(), allow_patterns=kwargs.get("allow_patterns"),
                                         ignore_patterns=kwargs.get("ignore_patterns")))
        return str(self._store(names, kwargs.get("cache_dir"), kwargs.get("revision")))

    def hf_hub_download(self, original, api, repo_id, filename, **kwargs):
        self.calls.append({"call": "hf_hub_download", "repo_id": repo_id, "filename": filename, **kwargs})
        if kwargs.get("local_files_only"):
            return original(api, repo_id, filename, **kwargs)
        folder = self._store([filename], kwargs.get("cache_dir"), kwargs.get("revision"))
        return str(folder / filename)

    def ls(self, fs, path, detail=False, revision=None, **kwargs):
        self.calls.append({"call": "ls", "path": path, "revision": revision})
        return [f"{self.repo_id}/{name}" for name in self.files()]

    def install(self, monkeypatch) -> "FakeHub":
        import huggingface_hub

        snapshot, download = huggingface_hub.HfApi.snapshot_download, huggingface_hub.HfApi.hf_hub_download
        monkeypatch.setattr(huggingface_hub.HfApi, "snapshot_download",
                            lambda api, repo_id, **kw: self.snapshot_download(snapshot, api, repo_id, **kw))
        monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download",
                            lambda api, repo_id, filename, **kw: self.hf_hub_download(download, api, repo_id,
                                                                                      filename, **kw))
        monkeypatch.setattr(huggingface_hub.HfFileSystem, "ls",
                            lambda fs, path, detail=False, revision=None, **kw: self.ls(fs, path, detail,
                                                                                        revision, **kw))
        return self

    def downloads(self) -> list[list[str]]:
        """The allow_patterns of each network snapshot_download, in order."""
        return [c["allow_patterns"] for c in self.calls
                if c["call"] == "snapshot_download" and not c.get("local_files_only")]
