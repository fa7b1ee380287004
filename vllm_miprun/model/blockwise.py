"""Run a causal LM one decoder block at a time, reading each block's weights only when it runs.

The real transformers model is built on the ``meta`` device (no memory). Everything
outside the decoder blocks (embeddings, final norm, LM head, rotary tables) is read
once; each block is materialised from the safetensors files just before it runs and
dropped right after. Peak memory is therefore the non-block weights, one block and the
activations, so a model larger than RAM can still be calibrated. While one block runs the
next is read in a thread (:mod:`vllm_miprun.model.stream`); forward searches may keep
blocks resident between passes within a byte budget (``max_memory``).

Architecture-agnostic by construction: the embedding (with any scaling), the per-block
inputs (attention masks per layer type, sliding windows, rotary tables per layer type)
and the head (final norm, soft-capping, logit scaling) all come from transformers' own
forward, run with light stand-ins in place of the blocks. The stand-ins record what
transformers hands each block, and the real block is then called with exactly that.
Where the blocks live is the family's business (:mod:`vllm_miprun.model.architectures`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vllm_miprun.errors import check_interrupted
from vllm_miprun.model import stream
from vllm_miprun.model.architectures import for_config
from vllm_miprun.model.architectures.hf_model import layers_owner
from vllm_miprun.model.checkpoint import ModelFolderError, read_config, read_header, safetensors_files
from vllm_miprun.model.quantization import check_checkpoint_quantization, dequantize, quantization_config
from vllm_miprun.model.remap import layer_index

logger = logging.getLogger(__name__)

class TensorIndex:
    """Where each tensor lives, from the safetensors headers only."""

    def __init__(self, model_dir: str | Path):
        self.location: dict[str, Path] = {}
        self.size: dict[str, int] = {}
        self.stored_dtype: dict[str, str] = {}
        for file in safetensors_files(model_dir):
            for name, info in read_header(file).items():
                start, end = info["data_offsets"]
                self.location[name] = file
                self.size[name] = end - start
                self.stored_dtype[name] = info["dtype"]

    def read(self, names: list[str], device: str, dtype: torch.dtype | None,
             quantization: dict | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, quantized linears dequantized (``quantization``), cast to ``dtype``
        (None: as stored, or as dequantized)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
        tensors = dequantize(tensors, quantization)  # before the cast: packed ints are not numbers
        if dtype is None:
            return {name: t.to(device=device) for name, t in tensors.items()}
        return {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.location if n.startswith(prefix))

    def bytes_with_prefix(self, prefix: str) -> int:
        """On-disk size of the tensors under ``prefix``, from the headers alone."""
        return sum(self.size[n] for n in self.names_with_prefix(prefix))


@contextmanager
def _sequential_transformers_load() -> Iterator[None]:
    """transformers' loader starts a pool of (non-daemon) threads per call unless
    ``HF_DEACTIVATE_ASYNC_LOAD`` is set. For one block already in memory they buy nothing,
    and a Ctrl-C landing while the pool starts a thread left a thread nobody wakes: the
    interpreter then waited for it forever at exit (an interrupted ``vllm serve``)."""
    before = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = before


def _loaded_as_stored(layer: nn.Module, relative: dict[str, torch.Tensor]) -> bool:
    """Whether ``layer``'s parameters are exactly the given tensors under the same names (so
    the loader renamed, converted and copied nothing) and it has no other parameter."""
    params = dict(layer.named_parameters())
    return params.keys() == relative.keys() and all(
        type(params[n]) is nn.Parameter and params[n].data_ptr() == t.data_ptr()
        and params[n].shape == t.shape and params[n].dtype == t.dtype and params[n].stride() == t.stride()
        for n, t in relative.items())


class _StandIn(nn.Module):
    """Takes a decoder block's place in transformers' forward and hands its call to ``on_call``."""

    def __init__(self, index: int, on_call: Callable):
        super().__init__()
        self.index, self.on_call = index, on_call

    def forward(self, hidden_states, *args, **kwargs):
        return self.on_call(self.index, hidden_states, args, kwargs)


class _Stop(Exception):
    """Ends a forward pass early, carrying the hidden state it was stopped at."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class BlockwiseModel:
    """Embeddings, blocks and head of a causal LM, with blocks loaded on demand."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                 resident_blocks: bool = False, max_memory: int | None = None):
        """``dtype`` None: the checkpoint's dtype on an accelerator, float32 on the CPU
        (:func:`~vllm_miprun.model.stream.compute_dtype`). ``resident_blocks`` keeps
        blocks loaded between passes within ``max_memory`` bytes (default:
        :func:`~vllm_miprun.model.stream.default_max_memory`)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.device = device
        self.family = for_config(read_config(self.model_dir))  # unsupported: refused before any work
        check_checkpoint_quantization(self.model_dir)  # refuse an unreadable format before any work
        self.quantization = quantization_config(read_config(self.model_dir))
        self.config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=False)
        self.config._attn_implementation = self.family.attn_implementation
        self.index = TensorIndex(self.model_dir)
        self.dtype = stream.compute_dtype(device, stream.checkpoint_dtype(self.index.stored_dtype.values()), dtype)
        # Blocks are read (and dequantized) on the host in a thread, then cast and placed on the device.
        self.reader = stream.PrefetchingReader(
            lambda names: self.index.read(names, "cpu", None, self.quantization), device, self.dtype)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, trust_remote_code=False, dtype=self.dtype)
        self.skeleton.eval()
        self._owner, self._attr = layers_owner(self.skeleton, self.family)
        self.layers: nn.ModuleList = getattr(self._owner, self._attr)
        self.num_blocks = len(self.layers)
        self._position = {id(layer): i for i, layer in enumerate(self.layers)}
        self._weight_mapping = None
        self._loads_as_stored: dict[tuple, bool] = {}  # block layout -> transformers' loader only assigns
        self._load_outside_blocks()
        self.norm = getattr(self._owner, "norm", None)  # the final norm, where the family has one
        self.lm_head_weight = self.skeleton.get_output_embeddings().weight
        # Forward searches re-run blocks many times: keep some loaded, within a budget.
        self.resident_blocks = resident_blocks
        self.budget = stream.ResidentBudget(
            (stream.default_max_memory(device) if max_memory is None else max_memory) if resident_blocks else 0)
        self._resident: dict[int, nn.Module] = {}
        self._block_inputs: dict[int, list] = {}  # seq_len -> per-block (args, kwargs)
        self.blocks_loaded = 0
        self.blocks_assigned = 0  # of those, loaded by direct assignment (:meth:`_load_block`)

    # -- weights -------------------------------------------------------------------------

    def block_tensor_names(self, index: int) -> list[str]:
        """The checkpoint names of block ``index``'s tensors."""
        return self.index.names_with_prefix(f"{self.family.layers_prefix}{index}.")

    def read_block(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors under their checkpoint names, dequantized, cast and on the
        device: prefetched if :meth:`block` hinted this block, else read from disk now."""
        names = self.block_tensor_names(index)
        if not names:
            raise ModelFolderError(f"{self.model_dir} has no tensors for block {index} "
                                   f"({self.family.layers_prefix}{index}.*)")
        return self.reader.get(index, names)

    def _materialise(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Fill ``module``'s buffers the way transformers initialises them, then load ``state``
        (checkpoint names) through transformers' own loader, which also converts legacy
        layouts (e.g. Mixtral's per-expert tensors into fused expert weights)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        self._init_meta_buffers(module)
        if self._weight_mapping is None:
            self._weight_mapping = get_model_conversion_mapping(self.skeleton)
        load_config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype,
                                          weight_mapping=self._weight_mapping)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one bar per block would drown calibration's own
        try:
            with _sequential_transformers_load():
                convert_and_load_state_dict_in_model(self.skeleton, state, load_config)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        module.requires_grad_(False)

    def _load_block(self, layer: nn.Module, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Load one block's ``tensors`` (checkpoint names). Forward searches re-load blocks
        hundreds of times, and transformers' loader walks the whole model's state dict on every
        call, so a block whose layout the loader was once seen to take as stored (same block
        class, tensor names, shapes and dtypes; no conversion, no copy) is assigned directly
        from then on."""
        prefix = f"{self.family.layers_prefix}{index}."
        relative = {name.removeprefix(prefix): t for name, t in tensors.items()}
        layout = (type(layer), *sorted((name, tuple(t.shape), t.dtype) for name, t in relative.items()))
        if self._loads_as_stored.get(layout):
            self._init_meta_buffers(layer)
            for name, tensor in relative.items():
                owner_name, _, attr = name.rpartition(".")
                weight = nn.Parameter(tensor, requires_grad=False)
                weight._is_hf_initialized = True  # as transformers marks what it loaded
                setattr(layer.get_submodule(owner_name), attr, weight)
            self.blocks_assigned += 1
            return
        self._materialise(layer, tensors)
        if layout not in self._loads_as_stored:
            self._loads_as_stored[layout] = _loaded_as_stored(layer, relative)

    def _init_meta_buffers(self, module: nn.Module) -> None:
        """Non-persistent buffers (rotary tables, embedding scales) are not in the checkpoint:
        allocate them and let the model's own ``_init_weights`` compute them."""
        owners = {}
        for name, buffer in module.named_buffers():
            if buffer is not None and buffer.is_meta:
                owner_name, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                owner._buffers[attr] = torch.empty_like(buffer, device=self.device)
                owners[id(owner)] = owner
        for owner in owners.values():
            self.skeleton._init_weights(owner)  # params are still meta here: only buffers change

    def _load_outside_blocks(self) -> None:
        names = [n for n in self.index.location if layer_index(n) is None]
        state = self.index.read(names, self.device, self.dtype, self.quantization)
        setattr(self._owner, self._attr, nn.ModuleList())  # the blocks stay on meta
        try:
            self._materialise(self.skeleton, state)
            # Tie as from_pretrained does: only what the checkpoint leaves out (tied embeddings).
            self.skeleton.tie_weights(missing_keys={n for n, p in self.skeleton.named_parameters() if p.is_meta})
        finally:
            setattr(self._owner, self._attr, self.layers)
        self._require_loaded(self.skeleton, skip=self.family.layers_path + ".")

    def _require_loaded(self, module: nn.Module, skip: str | None = None) -> None:
        missing = [n for n, p in module.named_parameters() if p.is_meta and not (skip and n.startswith(skip))]
        if missing:
            raise ModelFolderError(f"{self.model_dir} lacks the tensors {missing[:5]}; "
                                   "is it a complete checkpoint of this architecture?")

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with its weights read from disk, dropped again on exit."""
        check_interrupted()  # between blocks: a Ctrl-C that C code swallowed still stops the pass
        if index in self._resident:
            yield self._resident[index]
            return
        layer = self.layers[index]
        tensors = self.read_block(index)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self._load_block(layer, index, tensors)
        del tensors  # the layer holds the weights now
        self._require_loaded(layer)
        self.blocks_loaded += 1
        self._prefetch(index + 1)
        try:
            yield layer
        finally:
            self._release(index, layer, size)

    def _prefetch(self, index: int) -> None:
        """Read block ``index`` in the background while the current block runs."""
        if index < self.num_blocks and index not in self._resident:
            self.reader.hint(index, self.block_tensor_names(index))

    def _release(self, index: int, layer: nn.Module, size: int) -> None:
        keep, evicted = self.budget.admit(index, size)
        for other in evicted:
            self._resident.pop(other).to("meta")
        if keep:
            self._resident[index] = layer
        else:
            layer.to("meta")  # frees the block's weights
            if torch.device(self.device).type == "cpu":
                stream.return_freed_host_memory()

    # -- transformers' own forward, with stand-ins for the blocks -----------------------

    @contextmanager
    def _stand_ins(self, on_call: Callable) -> Iterator[None]:
        setattr(self._owner, self._attr, nn.ModuleList(_StandIn(i, on_call) for i in range(self.num_blocks)))
        try:
            yield
        finally:
            setattr(self._owner, self._attr, self.layers)

    def _block_kwargs(self, seq_len: int) -> list:
        """What transformers passes each block for one sequence of ``seq_len`` tokens
        (masks and position tables broadcast over the batch)."""
        if seq_len not in self._block_inputs:
            calls: list = [None] * self.num_blocks

            def record(index, hidden, args, kwargs):
                calls[index] = (args, kwargs)
                return hidden

            ids = torch.zeros(1, seq_len, dtype=torch.long, device=self.device)
            with self._stand_ins(record):
                self._owner(input_ids=ids, use_cache=False)
            self._block_inputs = {seq_len: calls}  # one length at a time: calibration uses one
        return self._block_inputs[seq_len]

    @torch.inference_mode()
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input of block 0: transformers' embedding, with the family's scaling."""
        def stop(index, hidden, args, kwargs):
            raise _Stop(hidden)

        with self._stand_ins(stop):
            try:
                self._owner(input_ids=input_ids.to(self.device), use_cache=False)
            except _Stop as stopped:
                return stopped.hidden
        raise ModelFolderError("the model's forward never reached its first decoder block")

    @torch.inference_mode()
    def run_block(self, layer: nn.Module, hidden: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Apply one loaded block to ``hidden`` [sequences, tokens, dim] in micro-batches."""
        return self.block_forward(layer, hidden, batch_size)

    def block_forward(self, layer: nn.Module, hidden: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """:meth:`run_block` in the caller's grad mode: a fit that trains maps through the
        blocks needs the graph, and tensors made under ``inference_mode`` cannot join one."""
        args, kwargs = self._block_kwargs(hidden.shape[1])[self._position[id(layer)]]
        outputs = []
        for start in range(0, hidden.shape[0], batch_size):
            out = layer(hidden[start:start + batch_size], *args, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outputs)

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 next-token logits at every position but the last: [sequences, tokens - 1, vocab],
        from transformers' own head (final norm, LM head, soft-capping, logit scaling)."""
        last = self.num_blocks - 1
        states = hidden[:, :-1]

        def inject(index, passed, args, kwargs):
            return states if index == last else passed

        ids = torch.zeros(states.shape[:2], dtype=torch.long, device=self.device)
        with self._stand_ins(inject):
            return self.skeleton(input_ids=ids, use_cache=False).logits.float()

    @torch.inference_mode()
    def token_nll(self, hidden: torch.Tensor, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Mean next-token negative log-likelihood (nats) from the last boundary state."""
        total, count = 0.0, 0
        targets = input_ids.to(self.device)
        for start in range(0, hidden.shape[0], batch_size):
            logits = self.next_token_logits(hidden[start:start + batch_size])
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets[start:start + batch_size, 1:].reshape(-1),
                reduction="sum",
            )
            total += float(nll)
            count += logits.shape[0] * logits.shape[1]
        return torch.tensor(total / count)

    @torch.inference_mode()
    def token_logprobs(self, hidden: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Next-token log-probabilities [sequences, tokens - 1, vocab] from the last boundary state."""
        return torch.cat([torch.log_softmax(self.next_token_logits(hidden[start:start + batch_size]), dim=-1)
                          for start in range(0, hidden.shape[0], batch_size)])

    @torch.inference_mode()
    def token_kl(self, teacher_logprobs: torch.Tensor, hidden: torch.Tensor, batch_size: int = 8,
                 teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Mean per-token ``KL(teacher || model)`` (nats); ``teacher_logprobs`` from :meth:`token_logprobs`.

        A search measures many models against one teacher: ``teacher_probs`` (from
        :meth:`teacher_probs`) spares it the exponential each time, with the same figure to
        the last bit, and the product is formed in place, one vocabulary-sized temporary
        fewer (together about 0.06 s of 0.13 s per call on SmolLM2's 2 x 256 tokens)."""
        total, count = 0.0, 0
        for start in range(0, hidden.shape[0], batch_size):
            student = torch.log_softmax(self.next_token_logits(hidden[start:start + batch_size]), dim=-1)
            teacher = teacher_logprobs[start:start + batch_size]
            probs = teacher.exp() if teacher_probs is None else teacher_probs[start:start + batch_size]
            total += float((teacher - student).mul_(probs).sum())
            count += teacher.shape[0] * teacher.shape[1]
        return torch.tensor(total / count)

    @staticmethod
    def teacher_probs(teacher_logprobs: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """``exp`` of ``teacher_logprobs``, by the batches :meth:`token_kl` reads: each element
        rounded exactly as ``token_kl``'s own ``exp`` of that batch would (an exponential over a
        longer span may put an element in a vector loop's scalar tail instead)."""
        return torch.cat([chunk.exp() for chunk in teacher_logprobs.split(batch_size)])

    @torch.inference_mode()
    def forward_from(self, hidden: torch.Tensor, start_block: int, pruned: frozenset[int] = frozenset(),
                     batch_size: int = 8) -> torch.Tensor:
        """The last boundary state, running blocks ``start_block..L-1`` except ``pruned``."""
        for index in range(start_block, self.num_blocks):
            if index in pruned:
                continue
            with self.block(index) as layer:
                hidden = self.run_block(layer, hidden, batch_size)
        return hidden
