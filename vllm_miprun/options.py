"""Every user option of the plugin: one table, checked before any model is loaded.

``OPTIONS`` below is the only place an option is declared: its name (the
``--model-loader-extra-config`` key), its parser, default, help text, and the
``vllm-miprun`` commands that take it. Generated from it:

* the ``MiprunOptions`` and ``CalibrationSettings`` dataclasses (fields and checks);
* the ``--miprun-*`` flags of ``vllm serve`` and the CLI flags (:mod:`vllm_miprun.option_flags`);
* the README's option table (``scripts/options_table.py``; a test keeps the two in step).

Each parser takes what any source gives (CLI text, JSON values, Python values), returns
the checked value and raises ``OptionError``; parsing an already parsed value gives it back.
Any value of any JSON type (NaN, 1e400, 10**400, nested objects, lists where a scalar is
expected, empty or oversized text) is either accepted or refused in one line that shows
at most ``SHOWN_CHARS`` of it; numbers and texts are bounded, so no value makes the
checks themselves slow.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from vllm_miprun.core.selection.result import METHODS
from vllm_miprun.errors import OptionError  # noqa: F401 - re-exported
from vllm_miprun.option_values import (  # noqa: F401 - re-exported: the option table's parsers
    MAX_BLOCK_INDEX, MAX_BYTES, MAX_TEXT_CHARS, SHOWN_CHARS, check_drop, parse_drop, parse_keep,
    parse_latency_budget, parse_quality_budget, shown,
)

ESTIMATORS = ("gaussian", "renyi")
DATASETS = ("wiki", "c4")
DEVICES = ("auto", "cpu", "cuda")
# Exactly one of these says how many (or which) blocks go; the one pair allowed together is
# a latency budget with a quality budget (the plan reports which of the two bound).
TARGETS = ("keep", "latency_budget", "drop", "quality_budget")
QUALITY_TARGET = "quality_budget"
COMBINABLE_TARGETS = frozenset({"latency_budget", QUALITY_TARGET})
HEAL_MODES = ("none", "linear", "distill")


# Which dataclass a row is a field of.
PLAN, CALIBRATION, BOTH = "plan", "calibration", "both"
# vllm-miprun commands that take the calibration settings (each gives its own cache entry).
CALIBRATION_COMMANDS = ("calibrate", "scores", "plan", "stability", "export")


@dataclass(frozen=True)
class Option:
    """One row of the table."""

    name: str
    annotation: str                    # the dataclass field's type, for readers
    parse: Callable[[Any], Any]        # raw value -> checked value; raises OptionError
    default: Any
    help: str                          # markdown; shared by flags, dataclass metadata and README
    commands: tuple[str, ...] = ()     # vllm-miprun commands with a --NAME flag
    owner: str = PLAN                  # PLAN: MiprunOptions; CALIBRATION: CalibrationSettings; BOTH
    choices: tuple[str, ...] | None = None
    switch: bool = False               # a flag without a value (true when given)
    metavar: str | None = None
    shown_default: str | None = None   # how help and README show the default, when not the value

    @property
    def serve_flag(self) -> str:
        return "--miprun-" + self.name.replace("_", "-")

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return "—" if self.default is None else str(self.default)


# --------------------------------------------------------------------------- value parsers


def parse_device(value: Any) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``auto`` is resolved where the work runs."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text in DEVICES or (isinstance(text, str) and re.fullmatch(r"cuda:\d+", text)):
        return text
    raise OptionError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {shown(value)}")


def resolve_device(device: str) -> str:
    """The device ``auto`` stands for here: cuda when torch sees a GPU, else cpu. Called
    where calibration runs, never when options are parsed (so parsing leaves CUDA alone)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
               "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(value: Any) -> int:
    """``8GiB``, ``500MB``, ``1.5g`` or a byte count -> bytes (``ValueError`` otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_BYTES:
        return value
    if not isinstance(value, (str, float)) or len(str(value)) > SHOWN_CHARS:
        raise ValueError(f"expected a size such as 8GiB, 500MB or a byte count up to 2**63-1, got {shown(value)}")
    raw = str(value).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if (isinstance(value, bool) or unit not in _BYTE_UNITS or not math.isfinite(amount) or amount < 0
            or amount * _BYTE_UNITS[unit] > MAX_BYTES):
        raise ValueError(f"expected a size such as 8GiB, 500MB or a byte count up to 2**63-1, got {shown(value)}")
    return int(amount * _BYTE_UNITS[unit])


def parse_max_memory(value: Any) -> int:
    try:
        return parse_bytes(value)
    except ValueError as err:
        raise OptionError(f"max_memory: {err}") from None


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise OptionError(f"{name} must be one of {', '.join(choices)}, got {shown(value)}")
        return value
    return parse


def _integer(name: str, minimum: int, maximum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,19}\s*", value):
            number = int(value)
        if number is None or not minimum <= number <= maximum:
            raise OptionError(f"{name} must be an integer >= {minimum} (at most {maximum}), got {shown(value)}")
        return number
    return parse


def _text(name: str, what: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if (not isinstance(value, str) or not value.strip() or "\0" in value
                or len(value) > MAX_TEXT_CHARS):
            raise OptionError(f"{name} must be {what}, got {shown(value)}")
        return value
    return parse


def _is_block_index(item: Any) -> bool:
    """An int that may become text: ``str()`` refuses integers of over 4300 digits."""
    return isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= MAX_BLOCK_INDEX


def parse_protect(value: Any) -> str:
    """Text such as ``first,last`` or ``0,29``; a list is joined. Read against the model's
    block count when planning (``core.selection.parse_protect``)."""
    what = "'first', 'last' or block indices such as 0,29"
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) or _is_block_index(item) for item in value):
        value = ",".join(str(item) for item in value[:MAX_BLOCK_INDEX + 2])
    elif _is_block_index(value):
        value = str(value)
    text = _text("protect", what)(value)
    for item in text.split(","):
        word = item.strip().lower()
        if word not in ("first", "last") and not (word.isdigit() and len(word) <= 5):
            raise OptionError(f"protect must be {what}, got {shown(text)}")
    return text


def parse_bool(name: str) -> Callable[[Any], bool]:
    def parse(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = value.strip().lower() if isinstance(value, str) else str(value) if value in (0, 1) else ""
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{name} must be true or false, got {shown(value)}")
    return parse


# --------------------------------------------------------------------------- the table

_PLAN_COMMANDS = ("plan", "export", "eval")

OPTIONS: tuple[Option, ...] = (
    Option("keep", "float | None", parse_keep, None,
           "keep ratio in (0, 1]; K = max(1, round-half-up(keep × L))",
           ("plan", "stability", "export", "eval"), metavar="R"),
    Option("latency_budget", "str | None", parse_latency_budget, None,
           "`0.8` = fraction of the full model's per-token latency; `12ms` or `12ms@bs8` = "
           "ms per output token at a batch size", _PLAN_COMMANDS, metavar="B"),
    Option("drop", "tuple[int, ...] | None", parse_drop, None,
           "prune exactly these blocks, e.g. `12-18,25`; no selection, no scores needed",
           _PLAN_COMMANDS, metavar="BLOCKS"),
    Option("quality_budget", "float | None", parse_quality_budget, None,
           "prune the most blocks whose perplexity on held-out calibration text stays ≤ this × the dense "
           "model's, e.g. `1.3`; may join `latency_budget`", _PLAN_COMMANDS, metavar="R"),
    Option("method", "str", _choice("method", METHODS), "mi-prun",
           "selection method: " + ", ".join(f"`{m}`" for m in METHODS), _PLAN_COMMANDS, choices=METHODS),
    Option("scores", "str | None", _text("scores", "a score cache file"), None,
           "explicit score cache file (still checked against the weights)", _PLAN_COMMANDS,
           metavar="FILE", shown_default="derived"),
    Option("protect", "str | None", parse_protect, None,
           "blocks never dropped: `first`, `last`, indices `0,29`", _PLAN_COMMANDS,
           metavar="BLOCKS", shown_default="none"),
    Option("heal", "str", _choice("heal", HEAL_MODES), "none",
           "`none`; `linear`: fold one linear map per pruned run, fitted by least squares, into the "
           "block before it; `distill`: the same maps trained on the full model's next-token "
           "distribution, a better and slower fit (see [Healing](#healing))", ("export", "eval"), choices=HEAL_MODES),
    Option("require_cache", "bool", parse_bool("require_cache"), False,
           "refuse to calibrate at load time", ("export", "eval"), switch=True),
    Option("device", "str", parse_device, "auto",
           "device for calibration and forward searches: `auto` (cuda if available, else cpu), "
           "`cpu`, `cuda`, `cuda:N`", CALIBRATION_COMMANDS),
    Option("max_memory", "int | None", parse_max_memory, None,
           "memory forward searches (MI-PRUN's bound, SLEB) may keep blocks resident in: `8GiB`, "
           "`500MB` or bytes; the rest are streamed", ("plan",), metavar="BYTES",
           shown_default="free accelerator memory − margin; 0 on CPU"),
    Option("cache_dir", "str | None", _text("cache_dir", "a folder"), None,
           "score cache folder", CALIBRATION_COMMANDS, metavar="DIR", shown_default="`$MIPRUN_CACHE_DIR`"),
    Option("dataset", "str", _text("dataset", "wiki, c4 or a local path"), "wiki",
           "calibration set: `wiki`, `c4`, a text file, or a `datasets.save_to_disk` folder",
           CALIBRATION_COMMANDS, owner=CALIBRATION),
    Option("samples", "int", _integer("samples", 1, 1_000_000), 32, "calibration sequences",
           CALIBRATION_COMMANDS, owner=CALIBRATION),
    Option("seq_len", "int", _integer("seq_len", 2, 1_048_576), 256, "tokens per calibration sequence",
           CALIBRATION_COMMANDS, owner=CALIBRATION),
    Option("seed", "int", _integer("seed", 0, 2**32 - 1), 0,
           "calibration sampling seed, and the seed of `random`", CALIBRATION_COMMANDS, owner=BOTH),
    Option("estimator", "str", _choice("estimator", ESTIMATORS), "gaussian",
           "MI estimator: " + " or ".join(f"`{e}`" for e in ESTIMATORS),
           CALIBRATION_COMMANDS, owner=CALIBRATION, choices=ESTIMATORS),
)
BY_NAME: dict[str, Option] = {row.name: row for row in OPTIONS}
# Keys the front process adds to ``model_loader_extra_config`` for vLLM's other processes
# (``vllm/worker_paths.py``); not user options, so no flag, no field and no table row.
RUN_DIR_KEY = "run_dir"
CARRIED_KEYS = (RUN_DIR_KEY,)


def option(name: str) -> Option:
    return BY_NAME[name]


def command_options(command: str) -> tuple[Option, ...]:
    """The rows ``vllm-miprun COMMAND`` takes as flags, in table order."""
    return tuple(row for row in OPTIONS if command in row.commands)


# --------------------------------------------------------------------------- generated dataclasses


def _parse_fields(self, rows: tuple[Option, ...]) -> None:
    """Run each field through its row's parser (``None`` stays for optional fields)."""
    for row in rows:
        value = getattr(self, row.name)
        if value is not None or row.default is not None:
            object.__setattr__(self, row.name, row.parse(value))


def _make(name: str, owners: tuple[str, ...], doc: str, namespace: dict, extra_fields=()) -> type:
    rows = tuple(row for row in OPTIONS if row.owner in owners)
    specs = [(row.name, row.annotation,
              dataclasses.field(default=row.default, metadata={"help": row.help, "option": row}))
             for row in rows]
    return dataclasses.make_dataclass(
        name, specs + list(extra_fields), frozen=True,
        namespace={"__module__": __name__, "__qualname__": name, "__doc__": doc, "ROWS": rows, **namespace},
    )


def _calibration_post_init(self) -> None:
    _parse_fields(self, type(self).ROWS)


CalibrationSettings = _make(
    "CalibrationSettings", (CALIBRATION, BOTH),
    "What defines a score cache entry: change any of these and it is another entry.",
    {"__post_init__": _calibration_post_init, "to_json": lambda self: dataclasses.asdict(self)},
)


def calibration_settings(raw: Mapping[str, Any]) -> "CalibrationSettings":
    """The calibration keys of ``raw`` as settings; other keys are ignored."""
    names = {row.name for row in CalibrationSettings.ROWS}
    return CalibrationSettings(**{k: v for k, v in raw.items() if k in names and v is not None})


def _options_post_init(self) -> None:
    _parse_fields(self, type(self).ROWS)
    _check_target(self)
    if self.drop is not None and self.method != BY_NAME["method"].default:
        raise OptionError(f"drop names the blocks itself, so method {self.method!r} would not be used; "
                          "give drop or method, not both")


def _check_target(self) -> None:
    given = [name for name in TARGETS if getattr(self, name) is not None]
    if not given:
        raise OptionError(
            "miprun needs a target: set keep (e.g. --miprun-keep 0.75), latency_budget "
            "(e.g. --miprun-latency-budget 0.8), quality_budget (e.g. --miprun-quality-budget 1.3) "
            "or drop (e.g. --miprun-drop 12-18)"
        )
    if len(given) > 1 and set(given) != COMBINABLE_TARGETS:
        listed = ", ".join(f"{name}={_shown(getattr(self, name))}" for name in given)
        which = f"either {given[0]} or {given[1]}, not both" if len(given) == 2 else \
            f"only one of {', '.join(given)}"
        raise OptionError(f"give {which} (got {listed}); remove all but one of them")


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def _options_from_dict(cls, raw: Mapping[str, Any] | None) -> "MiprunOptions":
    """Build from ``model_loader_extra_config`` (or CLI values); unknown keys are an error."""
    if raw is not None and not isinstance(raw, Mapping):
        raise OptionError(f"the miprun options (--model-loader-extra-config) must be a JSON object such as "
                          f'{{"keep": 0.75}}, got {shown(raw)}')
    raw = dict(raw or {})
    unknown = sorted(map(str, set(raw) - set(BY_NAME) - set(CARRIED_KEYS)))
    if unknown:
        raise OptionError(f"unknown miprun option(s) {shown(unknown)}; valid options are {sorted(BY_NAME)}")
    calibration = calibration_settings(raw)
    own = {row.name: raw[row.name] for row in cls.ROWS if raw.get(row.name) is not None}
    return cls(calibration=calibration, **own)


def _options_to_json(self) -> dict[str, Any]:
    data = dataclasses.asdict(self)
    if data["drop"] is not None:
        data["drop"] = list(data["drop"])
    return data


MiprunOptions = _make(
    "MiprunOptions", (PLAN, BOTH),
    "Loader options (``model_loader_extra_config`` keys); ``calibration`` holds the rest.",
    {"__post_init__": _options_post_init, "from_dict": classmethod(_options_from_dict),
     "to_json": _options_to_json},
    extra_fields=[("calibration", "CalibrationSettings",
                   dataclasses.field(default_factory=CalibrationSettings))],
)
