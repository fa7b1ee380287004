"""Run a causal LM one decoder block at a time, reading each block's weights only when it runs.

The model skeleton is built on the ``meta`` device (no memory). The embeddings, final
norm and LM head are read once; each block is materialised from the safetensors files
just before it runs and dropped right after. Peak memory is therefore the embeddings,
one block and the activations, so a model larger than RAM can still be calibrated.

Per-token attention is causal SDPA over each calibration sequence; sliding windows are
not applied (calibration sequences are shorter than any supported window).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vllm_miprun.model import stream
from vllm_miprun.model.checkpoint import ModelFolderError, safetensors_files

logger = logging.getLogger(__name__)

LAYER_PREFIX = "model.layers."
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class TensorIndex:
    """Where each tensor lives, from the safetensors headers only."""

    def __init__(self, model_dir: str | Path):
        self.location: dict[str, Path] = {}
        self.size: dict[str, int] = {}
        self.numel: dict[str, int] = {}
        self.stored_dtype: dict[str, str] = {}
        for file in safetensors_files(model_dir):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    self.location[name] = file
                    sliced = handle.get_slice(name)
                    self.numel[name] = _numel(sliced.get_shape())
                    self.stored_dtype[name] = sliced.get_dtype()
                    self.size[name] = self.numel[name] * _DTYPE_BYTES.get(sliced.get_dtype(), 4)

    def read(self, names: list[str], device: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name).to(device=device, dtype=dtype)
        return tensors

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.location if n.startswith(prefix))

    def bytes_with_prefix(self, prefix: str) -> int:
        """On-disk size of the tensors under ``prefix``, from the headers alone."""
        return sum(self.size[n] for n in self.names_with_prefix(prefix))


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
        self.config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=False)
        self.config._attn_implementation = "sdpa"
        self.index = TensorIndex(self.model_dir)
        self.device = device
        self.dtype = stream.compute_dtype(device, stream.checkpoint_dtype(self.index.stored_dtype.values()), dtype)
        self.reader = stream.PrefetchingReader(lambda names: self.index.read(names, "cpu", None), device, self.dtype)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, trust_remote_code=False)
        self.num_blocks = len(self.skeleton.model.layers)
        self.embed = self._materialise(self.skeleton.model.embed_tokens, "model.embed_tokens.")
        self.norm = self._materialise(self.skeleton.model.norm, "model.norm.")
        self.lm_head_weight = self._lm_head_weight()
        self.rotary = type(self.skeleton.model.rotary_emb)(config=self.config).to(device)
        # Forward searches re-run blocks many times: keep some loaded, within a budget.
        self.resident_blocks = resident_blocks
        self.budget = stream.ResidentBudget(
            (stream.default_max_memory(device) if max_memory is None else max_memory) if resident_blocks else 0)
        self._resident: dict[int, nn.Module] = {}
        self.blocks_loaded = 0

    def _materialise(self, module: nn.Module, prefix: str) -> nn.Module:
        names = self.index.names_with_prefix(prefix)
        tensors = self.index.read(names, self.device, self.dtype)
        state = {name[len(prefix):]: t for name, t in tensors.items()}
        module.load_state_dict(state, strict=True, assign=True)
        return module.requires_grad_(False)

    def _lm_head_weight(self) -> torch.Tensor:
        if "lm_head.weight" in self.index.location:
            return self.index.read(["lm_head.weight"], self.device, self.dtype)["lm_head.weight"]
        return self.embed.weight  # tied embeddings

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with its weights read from disk, dropped again on exit."""
        if index in self._resident:
            yield self._resident[index]
            return
        layer = self.skeleton.model.layers[index]
        prefix = f"{LAYER_PREFIX}{index}."
        names = self.index.names_with_prefix(prefix)
        if not names:
            raise ModelFolderError(f"{self.model_dir} has no tensors for block {index} ({prefix}*)")
        tensors = self.reader.get(index, names)
        layer.load_state_dict({n[len(prefix):]: t for n, t in tensors.items()}, strict=True, assign=True)
        layer.requires_grad_(False)
        self.blocks_loaded += 1
        self._prefetch(index + 1)
        try:
            yield layer
        finally:
            self._release(index, layer, sum(t.numel() * t.element_size() for t in tensors.values()))

    def _prefetch(self, index: int) -> None:
        """Read block ``index`` in the background while the current block runs."""
        if index < self.num_blocks and index not in self._resident:
            self.reader.hint(index, self.index.names_with_prefix(f"{LAYER_PREFIX}{index}."))

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

    @torch.inference_mode()
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids.to(self.device))

    def position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(hidden.shape[1], device=self.device).unsqueeze(0)
        return self.rotary(hidden, positions)

    @torch.inference_mode()
    def run_block(self, layer: nn.Module, hidden: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Apply one loaded block to ``hidden`` [sequences, tokens, dim] in micro-batches."""
        rope = self.position_embeddings(hidden[:1])
        outputs = []
        for start in range(0, hidden.shape[0], batch_size):
            chunk = hidden[start:start + batch_size]
            out = layer(chunk, attention_mask=None, position_embeddings=rope)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outputs)

    def _next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 next-token logits at every position but the last: [sequences, tokens - 1, vocab]."""
        return (self.norm(hidden[:, :-1]) @ self.lm_head_weight.T).float()

    @torch.inference_mode()
    def token_nll(self, hidden: torch.Tensor, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Mean next-token negative log-likelihood (nats) from the last boundary state."""
        total, count = 0.0, 0
        targets = input_ids.to(self.device)
        for start in range(0, hidden.shape[0], batch_size):
            logits = self._next_token_logits(hidden[start:start + batch_size])
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
        return torch.cat([torch.log_softmax(self._next_token_logits(hidden[start:start + batch_size]), dim=-1)
                          for start in range(0, hidden.shape[0], batch_size)])

    @torch.inference_mode()
    def token_kl(self, teacher_logprobs: torch.Tensor, hidden: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Mean per-token ``KL(teacher || model)`` (nats); ``teacher_logprobs`` from :meth:`token_logprobs`."""
        total, count = 0.0, 0
        for start in range(0, hidden.shape[0], batch_size):
            student = torch.log_softmax(self._next_token_logits(hidden[start:start + batch_size]), dim=-1)
            teacher = teacher_logprobs[start:start + batch_size]
            total += float((teacher.exp() * (teacher - student)).sum())
            count += teacher.shape[0] * teacher.shape[1]
        return torch.tensor(total / count)

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
