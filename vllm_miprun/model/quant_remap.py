"""Renumber the layer-indexed entries of a ``quantization_config`` for a model that keeps some blocks.

Pure functions, no vLLM import. Entries such as compressed-tensors' ``ignore``, fp8's
``ignored_layers``, GPTQ's ``dynamic`` and AWQ's ``modules_to_not_convert`` name modules
by their full path, so after block ``kept[i]`` becomes block ``i`` they must be rewritten.

Every entry is read the way vLLM matches it (exact name, substring, ``re:`` regex,
GPTQ's ``re.match`` rules) and evaluated against the checkpoint's concrete module names
(from its tensor names, plus vLLM's fused ``qkv_proj`` / ``gate_up_proj``):

- an entry that selects the same modules in every block (``lm_head``, ``re:.*lm_head``,
  ``self_attn.q_proj``, ``re:.*down_proj``) is left alone;
- otherwise the pruned model must select exactly the kept blocks' share, renumbered.
  The entry is renumbered in place when that is exact (``model.layers.3.mlp`` ->
  ``model.layers.2.mlp``), else expanded against the kept blocks (a list entry becomes
  the module names, a regex becomes an alternation of the new block numbers), and
  dropped when it selected only pruned blocks. Each rewrite is checked by evaluating it
  again; an entry that cannot be rewritten exactly is refused with its name.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

from vllm_miprun.errors import OptionError
from vllm_miprun.model.architectures import for_config
from vllm_miprun.model.checkpoint import tensor_names as checkpoint_tensor_names
from vllm_miprun.model.quantization import quantization_config

LAYER_PREFIX = "model.layers."
# vLLM builds these fused linears from checkpoint modules; entries may name either.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# (field, how vLLM matches its entries) per quant_method; "ct" = exact unless "re:".
FIELDS = {
    "compressed-tensors": (("ignore", "ct"), ("config_groups.*.targets", "ct")),
    "fp8": (("ignored_layers", "exact"), ("modules_to_not_convert", "exact")),
    "gptq": (("dynamic", "gptq"), ("modules_in_block_to_quantize", "substring")),
    "awq": (("modules_to_not_convert", "substring"),),
}
_NUMBER = re.compile(r"(?:(?<=layers\.)|(?<=layers\\\.))(\d+)(?=\\?\.|$)")
# Text that picks some blocks and not others: ``layers.`` (or regex ``layers\.``) followed by
# a number, a character class, a group or an escape such as ``\d`` (``layers\..*`` picks every
# block alike, so it survives renumbering).
_LAYER_TEXT = re.compile(r"layers\\?\.[\d\[(\\]")
_EXPERT = re.compile(r"^(.+\.experts)\.\d+\.")


class Universe:
    """The module names entries are evaluated on: ``(block, suffix)`` pairs and other names."""

    def __init__(self, tensor_names: Iterable[str], layer_prefix: str = LAYER_PREFIX):
        self.prefix = layer_prefix
        layer_name = re.compile(rf"^{re.escape(layer_prefix)}(\d+)\.(.+)$")
        modules = {name.rpartition(".")[0] for name in tensor_names}
        modules |= _fused_names(modules)
        self.blocks: set[int] = set()
        self.suffixes: set[str] = set()
        self.others: set[str] = set()
        for module in modules:
            match = layer_name.match(module)
            if match:
                self.blocks.add(int(match.group(1)))
                self.suffixes.add(match.group(2))
            elif module:
                self.others.add(module)

    def name(self, block: int, suffix: str) -> str:
        return f"{self.prefix}{block}.{suffix}"

    def selection(self, matches, blocks: Iterable[int]) -> tuple[dict[int, frozenset], frozenset]:
        """({block: suffixes selected}, other names selected) under predicate ``matches``."""
        per_block = {b: frozenset(s for s in self.suffixes if matches(self.name(b, s))) for b in blocks}
        return per_block, frozenset(n for n in self.others if matches(n))


def _fused_names(modules: set[str]) -> set[str]:
    """vLLM's fused linears (``qkv_proj``, ``gate_up_proj``) and FusedMoE layers: one module
    ``...mlp.experts`` for the checkpoint's ``...mlp.experts.<id>.*`` (its quantization
    prefix, which an exact-match entry may name)."""
    fused = {match.group(1) for match in map(_EXPERT.match, modules) if match}
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        for name, shards in FUSED.items():
            if leaf == shards[0] and all(f"{parent}.{s}" in modules for s in shards):
                fused.add(f"{parent}.{name}")
    return fused


def _matcher(entry: str, mode: str):
    """vLLM's test for ``entry`` against a module name, as a predicate."""
    if mode == "gptq" or (mode == "ct" and entry.startswith("re:")):
        pattern = re.compile(entry[3:] if mode == "ct" else re.sub(r"^[+-]:", "", entry))
        return lambda name: pattern.match(name) is not None
    if mode == "substring":
        return lambda name: entry in name
    return lambda name: name == entry


def _is_regex(entry: str, mode: str) -> bool:
    return mode == "gptq" or (mode == "ct" and entry.startswith("re:"))


def remap_entry(entry: str, mode: str, kept: list[int], universe: Universe) -> list[str]:
    """The entries that select, in the pruned model, what ``entry`` selected in the kept blocks."""
    try:
        matches = _matcher(entry, mode)
    except re.error as exc:
        raise OptionError(f"quantization_config entry {entry!r} is not a valid regex ({exc}); "
                          "fix it before pruning") from exc
    old, others = universe.selection(matches, sorted(universe.blocks | set(kept)))
    if len(set(old.values())) <= 1:
        return [entry]  # same modules in every block: no block number in play
    wanted = ({new: old[orig] for new, orig in enumerate(kept)}, others)
    if not any(wanted[0].values()) and not others:
        return []  # it selected pruned blocks only
    for candidate in (_renumbered(entry, kept), _expanded(entry, mode, wanted, universe)):
        if candidate is not None and _selects(candidate, mode, universe, len(kept)) == wanted:
            return candidate
    raise OptionError(
        f"quantization_config entry {entry!r} selects modules by block number in a way miprun "
        "cannot renumber exactly; list the modules by name, or prune an unquantized copy"
    )


def _selects(entries: list[str], mode: str, universe: Universe, num_blocks: int):
    predicates = [_matcher(e, mode) for e in entries]
    return universe.selection(lambda name: any(p(name) for p in predicates), range(num_blocks))


def _renumbered(entry: str, kept: list[int]) -> list[str] | None:
    """The entry with its one literal block number renumbered, or None."""
    numbers = _NUMBER.findall(entry)
    if len(numbers) != 1 or int(numbers[0]) not in kept:
        return None
    return [_NUMBER.sub(str(kept.index(int(numbers[0]))), entry)]


def _expanded(entry: str, mode: str, wanted, universe: Universe) -> list[str]:
    per_block, others = wanted
    if not _is_regex(entry, mode):
        names = []
        for block, suffixes in per_block.items():
            if mode == "substring" and suffixes == frozenset(universe.suffixes):
                names.append(universe.name(block, ""))  # "model.layers.3." selects the whole block
            else:
                names += [universe.name(block, s) for s in sorted(suffixes)]
        return names + sorted(others)
    by_suffixes: dict[frozenset, list[int]] = {}
    for block, suffixes in per_block.items():
        if suffixes:
            by_suffixes.setdefault(suffixes, []).append(block)
    prefix = re.escape(universe.prefix)
    alternatives = []
    for suffixes, blocks in by_suffixes.items():
        numbers = "|".join(str(b) for b in blocks)
        if suffixes == frozenset(universe.suffixes):  # whole blocks, fused names included
            alternatives.append(rf"{prefix}(?:{numbers})\.")
        else:
            names = "|".join(re.escape(s) for s in sorted(suffixes))
            alternatives.append(rf"{prefix}(?:{numbers})\.(?:{names})$")
    alternatives += [rf"{re.escape(n)}$" for n in sorted(others)]
    head = "re:" if mode == "ct" else (entry[:2] if entry[:2] in ("+:", "-:") else "")
    return [f"{head}(?:{'|'.join(alternatives)})"]


def _remap_list(values: list, mode: str, kept: list[int], universe: Universe) -> list:
    out: list = []
    for value in values:
        if isinstance(value, list):  # GPTQ's modules_in_block_to_quantize: list of lists
            out.append(_remap_list(value, mode, kept, universe))
        else:
            out.extend(remap_entry(value, mode, kept, universe))
    return out


def _remap_dynamic(rules: dict[str, Any], kept: list[int], universe: Universe) -> dict[str, Any]:
    """GPTQ's ``dynamic``: each key rewritten in place, so first-match order is kept."""
    out: dict[str, Any] = {}
    for key, rule in rules.items():
        for new_key in remap_entry(key, "gptq", kept, universe):
            out[new_key] = rule
    return out


def remap_quantization_config(qcfg: dict[str, Any], kept: list[int] | tuple[int, ...],
                              tensor_names: Iterable[str],
                              layer_prefix: str = LAYER_PREFIX) -> dict[str, Any]:
    """A copy of ``qcfg`` for the model that keeps blocks ``kept`` (full-model indices).

    ``tensor_names`` are all the checkpoint's tensor names (pruned blocks included), read
    from the safetensors headers.
    """
    tensor_names = list(tensor_names)
    kept = list(kept)
    universe = Universe(tensor_names, layer_prefix)
    method = str(qcfg.get("quant_method", "")).lower()
    new = copy.deepcopy(qcfg)
    fields = FIELDS.get(method, ())
    for field, mode in fields:
        if field == "config_groups.*.targets":
            for group in (new.get("config_groups") or {}).values():
                if group.get("targets"):
                    group["targets"] = _remap_list(group["targets"], mode, kept, universe)
        elif new.get(field):
            if mode == "gptq":
                new[field] = _remap_dynamic(new[field], kept, universe)
            else:
                new[field] = _remap_list(new[field], mode, kept, universe)
    _pin_derived_lists(method, new, kept, tensor_names, layer_prefix)
    _refuse_unknown_layer_fields(new, {f.split(".")[0] for f, _ in fields})
    return new


def _pin_derived_lists(method: str, new: dict[str, Any], kept: list[int],
                       tensor_names: list[str], layer_prefix: str) -> None:
    """Where GPTQ/AWQ configs omit their module list, vLLM derives it from the checkpoint's
    headers, with the full model's block numbers. Write the pruned model's list instead."""
    field = {"gptq": "modules_in_block_to_quantize", "awq": "modules_to_not_convert"}.get(method)
    if field is None or new.get(field):
        return
    mapping = {orig: i for i, orig in enumerate(kept)}
    layer_name = re.compile(rf"^{re.escape(layer_prefix)}(\d+)(\..+)$")
    quantized, plain = set(), set()
    for name in tensor_names:
        module, _, leaf = name.rpartition(".")
        match = layer_name.match(module)
        if match:
            if int(match.group(1)) not in mapping:
                continue
            module = f"{layer_prefix}{mapping[int(match.group(1))]}{match.group(2)}"
        (quantized if leaf in ("qweight", "qzeros", "g_idx") else plain).add(module)
    new[field] = sorted(quantized) if method == "gptq" else sorted(plain - quantized)


def _refuse_unknown_layer_fields(new: dict[str, Any], handled: set[str]) -> None:
    """A field miprun does not know that names blocks cannot be left stale: refuse it."""
    for key, value in new.items():
        if key not in handled and any(_LAYER_TEXT.search(text) for text in _texts(value)):
            raise OptionError(
                f"quantization_config field {key} names decoder blocks ({value!r:.80}) and miprun "
                "does not know how to renumber it; prune an unquantized copy"
            )


def _texts(value: Any) -> Iterable[str]:
    """Every string in a JSON value, keys included, as written (not ``repr``'s escaped form)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _texts(key)
            yield from _texts(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _texts(item)


def remap_model_quantization(hf_config: dict[str, Any], kept: list[int] | tuple[int, ...],
                             tensor_names: Iterable[str],
                             layer_prefix: str = LAYER_PREFIX) -> dict[str, Any]:
    """{config key: remapped quantization config} to merge into the pruned config
    (``hf_overrides`` and export); empty for an unquantized model."""
    qcfg = quantization_config(hf_config)
    if qcfg is None:
        return {}
    key = next((k for k in ("quantization_config", "compression_config") if hf_config.get(k)), None)
    if key is None:  # held in text_config (some multimodal configs)
        text = dict(hf_config["text_config"])
        text["quantization_config"] = remap_quantization_config(qcfg, kept, tensor_names, layer_prefix)
        return {"text_config": text}
    return {key: remap_quantization_config(qcfg, kept, tensor_names, layer_prefix)}


def quantization_overrides(model_dir, hf_config: dict[str, Any], kept: list[int] | tuple[int, ...],
                           layer_prefix: str | None = None) -> dict[str, Any]:
    """:func:`remap_model_quantization` with the tensor names read from ``model_dir``'s headers;
    the blocks' name prefix is the architecture family's unless given."""
    if quantization_config(hf_config) is None:
        return {}
    prefix = layer_prefix or for_config(hf_config).layers_prefix
    return remap_model_quantization(hf_config, kept, checkpoint_tensor_names(model_dir), prefix)
