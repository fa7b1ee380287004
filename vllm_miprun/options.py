"""Every user option of the plugin, validated before any model is loaded.

The same names arrive from three places and are checked here once:
``--model-loader-extra-config`` (JSON or dotted keys), the ``--miprun-*`` flags that
``register()`` adds to vLLM's parser, and the CLI. The README's option table lists the
fields of ``MiprunOptions`` below; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any
from vllm_miprun.errors import OptionError  # noqa: F401 - re-exported

METHODS = ("mi-prun", "shortgpt", "angular", "sleb", "last", "random")
ESTIMATORS = ("gaussian", "renyi")
DATASETS = ("wiki", "c4")




@dataclass(frozen=True)
class CalibrationSettings:
    """What defines a score cache entry: change any of these and it is another entry."""

    dataset: str = field(default="wiki", metadata={"help": "wiki, c4, a text file, or a datasets.save_to_disk folder"})
    samples: int = field(default=32, metadata={"help": "calibration sequences"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    seed: int = field(default=0, metadata={"help": "seed for drawing the calibration sequences"})
    estimator: str = field(default="gaussian", metadata={"help": "MI estimator: gaussian or renyi"})

    def __post_init__(self) -> None:
        _require_int("samples", self.samples, minimum=1)
        _require_int("seq_len", self.seq_len, minimum=2)
        _require_int("seed", self.seed, minimum=0)
        if self.estimator not in ESTIMATORS:
            raise OptionError(
                f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}"
            )
        if not isinstance(self.dataset, str) or not self.dataset:
            raise OptionError(f"dataset must be wiki, c4 or a local path, got {self.dataset!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MiprunOptions:
    """Loader options (``model_loader_extra_config`` keys)."""

    keep: float | None = field(default=None, metadata={"help": "keep ratio in (0, 1]"})
    latency_budget: str | None = field(
        default=None,
        metadata={"help": "fraction of full per-token latency (0.8) or ms per token (12ms, 12ms@bs8)"},
    )
    method: str = field(default="mi-prun", metadata={"help": "selection method: " + ", ".join(METHODS)})
    scores: str | None = field(default=None, metadata={"help": "explicit score cache file"})
    protect: str | None = field(default=None, metadata={"help": "blocks never dropped: first, last, or indices like 0,29"})
    require_cache: bool = field(default=False, metadata={"help": "refuse to calibrate at load time"})
    seed: int = field(default=0, metadata={"help": "seed of the random selector"})
    device: str = field(default="cpu", metadata={"help": "device for load-time calibration: cpu or cuda"})
    cache_dir: str | None = field(default=None, metadata={"help": "score cache folder (default $MIPRUN_CACHE_DIR)"})
    max_memory: int | str | None = field(
        default=None,
        metadata={"help": "bytes forward searches may keep blocks resident in (8GiB, 500MB); "
                          "default: the accelerator's free memory minus a margin, 0 on the CPU"},
    )
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    def __post_init__(self) -> None:
        if self.keep is not None and self.latency_budget is not None:
            raise OptionError(
                f"give either keep or latency_budget, not both (got keep={self.keep}, "
                f"latency_budget={self.latency_budget!r}); drop one of them"
            )
        if self.keep is None and self.latency_budget is None:
            raise OptionError(
                "miprun needs a target: set keep (e.g. --miprun-keep 0.75) or "
                "latency_budget (e.g. --miprun-latency-budget 0.8)"
            )
        if self.keep is not None:
            object.__setattr__(self, "keep", parse_keep(self.keep))
        if self.method not in METHODS:
            raise OptionError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.device not in ("cpu", "cuda"):
            raise OptionError(f"device must be cpu or cuda, got {self.device!r}")
        _require_int("seed", self.seed, minimum=0)
        if self.max_memory is not None:
            try:
                object.__setattr__(self, "max_memory", parse_bytes(self.max_memory))
            except ValueError as err:
                raise OptionError(f"max_memory: {err}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "MiprunOptions":
        """Build from ``model_loader_extra_config``; unknown keys are an error."""
        raw = dict(raw or {})
        calib_names = {f.name for f in fields(CalibrationSettings)}
        own_names = {f.name for f in fields(cls)} - {"calibration"}
        unknown = sorted(set(raw) - calib_names - own_names)
        if unknown:
            raise OptionError(
                f"unknown miprun option(s) {unknown}; valid options are "
                f"{sorted(own_names | calib_names)}"
            )
        calib = {k: _coerce_int(k, raw.pop(k)) if k != "dataset" and k != "estimator" else raw.pop(k)
                 for k in list(raw) if k in calib_names}
        if "seed" in calib:  # one seed drives both calibration sampling and random selection
            raw["seed"] = calib["seed"]
        if "require_cache" in raw:
            raw["require_cache"] = _coerce_bool("require_cache", raw["require_cache"])
        if "latency_budget" in raw and raw["latency_budget"] is not None:
            raw["latency_budget"] = str(raw["latency_budget"])
        if "protect" in raw and isinstance(raw["protect"], (list, tuple)):
            raw["protect"] = ",".join(str(p) for p in raw["protect"])
        return cls(calibration=CalibrationSettings(**calib), **raw)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_keep(value: Any) -> float:
    """A keep ratio in (0, 1]; strings such as "0.75" are accepted."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"keep must be a number in (0, 1], got {value!r}; e.g. --miprun-keep 0.75") from None
    if isinstance(value, bool) or not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise OptionError(f"keep must be a number in (0, 1], got {value!r}; e.g. --miprun-keep 0.75")
    return ratio


_BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
               "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(value: Any) -> int:
    """``8GiB``, ``500MB``, ``1.5g`` or a byte count -> bytes (``ValueError`` otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raw = str(value).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if isinstance(value, bool) or unit not in _BYTE_UNITS or not math.isfinite(amount) or amount < 0:
        raise ValueError(f"expected a size such as 8GiB, 500MB or a byte count, got {value!r}")
    return int(amount * _BYTE_UNITS[unit])


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _coerce_int(name: str, value: Any) -> int:
    try:
        return int(str(value), 10)
    except ValueError:
        raise OptionError(f"{name} must be an integer, got {value!r}") from None


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise OptionError(f"{name} must be true or false, got {value!r}")
