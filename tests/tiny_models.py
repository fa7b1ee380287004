"""Tiny seeded random Hugging Face models that vLLM CPU and transformers both load.

Each model is a real architecture (Llama, Qwen2, Qwen3, Mistral) with random weights,
saved with safetensors next to a small byte-level BPE tokenizer trained on the bundled
Wikipedia corpus. Nothing is downloaded. Head size 128 / 4 = 32 is one the CPU
attention backend accepts, and 4 query / 2 KV heads split over tensor parallel size 2.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
VOCAB_SIZE = 512
CORPUS_BYTES = 200_000

_tokenizer_dir: Path | None = None  # trained once per process, then copied


def _corpus_text() -> str:
    from vllm_miprun.tools import assets

    raw = (assets.corpus_dir() / "wiki.utf8").read_bytes()[:CORPUS_BYTES]
    return raw.decode("utf-8", errors="ignore")


def _train_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = _corpus_text()
    lines = [text[i : i + 1000] for i in range(0, len(text), 1000)]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out_dir)


def tokenizer_dir() -> Path:
    """A trained tokenizer folder, built once per process."""
    global _tokenizer_dir
    if _tokenizer_dir is None or not (_tokenizer_dir / "tokenizer.json").is_file():
        folder = Path(tempfile.mkdtemp(prefix="miprun-tok-"))
        _train_tokenizer(folder)
        _tokenizer_dir = folder
    return _tokenizer_dir


def _config(arch: str, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int):
    import transformers

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        dtype="float32",
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if arch == "qwen3":
        return transformers.Qwen3Config(
            **common, head_dim=hidden_size // num_heads, use_sliding_window=False
        )
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")


def make_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    num_layers: int = 8,
    seed: int = 0,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> Path:
    """Write a seeded random ``arch`` model with ``num_layers`` blocks to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    config = _config(arch, num_layers, hidden_size, num_heads, num_kv_heads)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than default init so blocks matter for the output
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    for item in tokenizer_dir().iterdir():
        shutil.copy2(item, out_dir / item.name)
    return out_dir
