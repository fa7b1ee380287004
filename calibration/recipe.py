"""A calibration recipe: one model, its calibration settings, and the targets to plan ahead.

JSON (``.json``) or TOML (``.toml``) with these keys::

    model         the model as ``vllm serve`` is given it: a local folder or a hub id
    revision      hub revision (optional)
    download_dir  vLLM's --download-dir (optional)
    options       miprun options shared by every target: method, dataset, samples,
                  seq_len, seed, estimator, protect, device, max_memory (optional)
    targets       list of {"keep": R} or {"latency_budget": B}: the plans to make now
    heal          fit and store every target's heal maps: "linear" or "distill" (true means
                  "linear"; false or "none", the default, fits none)

Everything is checked when the file is read, before any model is touched.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_miprun import strict_json
from vllm_miprun.option_flags import entry_wording
from vllm_miprun.option_values import MAX_TEXT_CHARS, shown
from vllm_miprun.options import BY_NAME, HEAL_MODES, MiprunOptions, OptionError

MAX_RECIPE_BYTES = 1 << 20
KEYS = ("model", "revision", "download_dir", "options", "targets", "heal")
TARGET_KEYS = ("keep", "latency_budget")
# Set per target or by the runner, not in ``options``.
NOT_SHARED = ("keep", "latency_budget", "drop", "heal", "scores", "require_cache", "cache_dir")


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    revision: str | None = None
    download_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    targets: tuple[dict[str, Any], ...] = ()
    heal: str = "none"

    def options_for(self, target: dict[str, Any], cache_dir: str | None) -> MiprunOptions:
        """The miprun options of one target: what ``vllm serve`` must be given to reuse the cache."""
        extra = {"heal": self.heal} if self.heal != "none" else {}
        return MiprunOptions.from_dict({**self.options, **target, **extra, "cache_dir": cache_dir})


def read_recipe(path: str | Path) -> Recipe:
    """Read and check one recipe file; raise ``OptionError`` naming the file and the key."""
    path = Path(path)
    try:
        what = strict_json.unreadable_reason(path.stat(), MAX_RECIPE_BYTES)
        if what:
            raise OSError(f"it is {what}, not a recipe file of at most {MAX_RECIPE_BYTES >> 20} MiB")
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nested too deeply
        raise OptionError(f"recipe {path} must be a readable JSON or TOML file: {err}") from None
    if not isinstance(data, dict):
        raise OptionError(f"recipe {path} must hold a table of {', '.join(KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown or not _is_text(data.get("model")):
        raise OptionError(f"recipe {path} takes the keys {', '.join(KEYS)} with a model name or folder; "
                          f"got unknown keys {shown(unknown)} and model={shown(data.get('model'))}")
    _check_types(path, data)
    options = dict(data.get("options") or {})
    bad = sorted(k for k in options if k not in BY_NAME or k in NOT_SHARED)
    if bad:
        raise OptionError(f"recipe {path}: options may not hold {shown(bad)}; targets go in `targets`, heal in "
                          "`heal`, and the cache folder is the runner's --cache-dir")
    targets = tuple(_target(path, t) for t in data.get("targets") or ())
    if not targets:
        raise OptionError(f'recipe {path} needs at least one target, e.g. "targets": [{{"keep": 0.75}}]')
    seen: set[str] = set()
    for target in targets:
        key = json.dumps(target, sort_keys=True)
        if key in seen:
            raise OptionError(f"recipe {path} gives the target {shown(target)} more than once; list each target once")
        seen.add(key)
    recipe = Recipe(name=path.stem, model=data["model"], revision=data.get("revision"),
                    download_dir=data.get("download_dir"), options=options, targets=targets,
                    heal=_heal(path, data.get("heal", False)))
    for target in targets:
        try:
            recipe.options_for(target, None)
        except OptionError as err:
            raise OptionError(f"recipe {path}, target {shown(target)}: "
                              f"{entry_wording(str(err), container='')}") from None
    return recipe


def _is_text(value: Any) -> bool:
    """A name, folder or revision: non-empty text without NUL, at most MAX_TEXT_CHARS long."""
    return isinstance(value, str) and bool(value.strip()) and "\0" not in value and len(value) <= MAX_TEXT_CHARS


def _check_types(path: Path, data: dict[str, Any]) -> None:
    """The containers and texts besides ``model``: what iterating or handing them on assumes."""
    for key in ("revision", "download_dir"):
        if data.get(key) is not None and not _is_text(data[key]):
            raise OptionError(f"recipe {path}: {key} must be a non-empty text (or left out), got {shown(data[key])}")
    for key, kind, example in (("options", dict, '{"samples": 128}'), ("targets", list, '[{"keep": 0.75}]')):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise OptionError(f"recipe {path}: {key} must be a {'table' if kind is dict else 'list'} such as "
                              f"{example}, got {shown(data[key])}")


def _target(path: Path, target: Any) -> dict[str, Any]:
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in TARGET_KEYS:
        raise OptionError(f'recipe {path}: each target is {{"keep": R}} or {{"latency_budget": B}}, '
                          f"got {shown(target)}")
    return dict(target)


def _heal(path: Path, value: Any) -> str:
    if isinstance(value, bool):
        return "linear" if value else "none"
    if value not in HEAL_MODES:
        raise OptionError(f"recipe {path}: heal must be true, false or one of {', '.join(HEAL_MODES)}; "
                          f"got {shown(value)}")
    return value
