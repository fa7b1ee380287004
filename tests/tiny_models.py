"""Tiny seeded random Hugging Face models that vLLM CPU and transformers both load.

Each model is a real architecture (Llama, Qwen2, Qwen3, Mistral, and every family in
``FAMILY_ARCHS``) with random weights, saved with safetensors next to a small byte-level
BPE tokenizer trained on the bundled Wikipedia corpus. Nothing is downloaded. Head size
32 is one the CPU attention backend accepts, and 4 query / 2 KV heads split over tensor
parallel size 2.

The family configs are small but not plain: short sliding windows (8 tokens) so windows
bite on test sequences, soft-capping, embedding and logit multipliers, and MoE blocks
mixed with dense ones. Where transformers derives a per-layer field (Gemma's
``layer_types``, Llama 4's ``no_rope_layers``), ``config.json`` is written without it,
as real checkpoints ship, so the pruner must derive it too.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
# Every family the architecture tests cover: {arch key: per-layer fields to drop from config.json}.
FAMILY_ARCHS = {
    "llama": (), "mistral": (), "qwen2": (), "qwen3": (),
    "gemma2": ("layer_types",), "gemma3": ("layer_types",), "cohere2": ("layer_types",),
    "phi3": (), "olmo2": (), "granite": (), "mixtral": (), "qwen3_moe": (),
    "deepseek_v2": (), "deepseek_v3": (), "llama4": ("no_rope_layers", "layer_types"),
}
WINDOW = 8  # sliding window of the windowed families, shorter than the test sequences
WINDOW_PATTERN = 2  # Gemma 3 and Cohere2: every 2nd block attends globally
VOCAB_SIZE = 512
CORPUS_BYTES = 200_000

_tokenizer_dir: Path | None = None  # trained once per process, then copied


def _corpus_text() -> str:
    """The shipped wiki text (exllamav2's bytes), so the tests' tokenizer needs no data package."""
    from vllm_miprun.pipeline import bundled

    raw = bundled.packaged_corpus("wiki.utf8")[:CORPUS_BYTES]
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
        atexit.register(_remove_if_mine, folder, os.getpid())  # runs left 780 of these in /tmp
        _train_tokenizer(folder)
        _tokenizer_dir = folder
    return _tokenizer_dir


def _remove_if_mine(folder: Path, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the handler
        shutil.rmtree(folder, ignore_errors=True)


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
    return _family_config(arch, common, hidden_size // num_heads)


def _family_config(arch: str, common: dict, head_dim: int):
    """The newer families: each with the quirk the block runner and the remap must honour."""
    import transformers

    moe = dict(num_experts_per_tok=2)
    if arch == "gemma2":  # alternating windows, both soft-caps, tied embeddings
        return transformers.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=head_dim,
                                         query_pre_attn_scalar=head_dim, sliding_window=WINDOW,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    if arch == "gemma3":  # pattern 2: sliding, full, sliding, full; rope per layer type
        return transformers.Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=head_dim,
                                             query_pre_attn_scalar=head_dim, sliding_window=WINDOW,
                                             sliding_window_pattern=WINDOW_PATTERN, final_logit_softcapping=3.0)
    if arch == "cohere2":
        return transformers.Cohere2Config(**{**common, "tie_word_embeddings": True}, sliding_window=WINDOW,
                                          sliding_window_pattern=WINDOW_PATTERN, logit_scale=0.5)
    if arch == "phi3":
        return transformers.Phi3Config(**common, pad_token_id=None)
    if arch == "olmo2":
        return transformers.Olmo2Config(**common, pad_token_id=None)
    if arch == "granite":
        return transformers.GraniteConfig(**common, embedding_multiplier=4.0, logits_scaling=2.0,
                                          residual_multiplier=0.5, attention_multiplier=head_dim ** -0.5)
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=4, sliding_window=None, **moe)
    if arch == "qwen3_moe":  # step 2 and block 0 dense: dense, sparse, dense, sparse
        return transformers.Qwen3MoeConfig(**common, head_dim=head_dim, num_experts=4, moe_intermediate_size=64,
                                           decoder_sparse_step=2, mlp_only_layers=[0], use_sliding_window=False,
                                           **moe)
    if arch in ("deepseek_v2", "deepseek_v3"):  # MLA attention; first block dense, the rest MoE
        config_class = transformers.DeepseekV2Config if arch == "deepseek_v2" else transformers.DeepseekV3Config
        # V3's router has a score-correction bias; vLLM builds it only for topk_method "noaux_tc"
        extra = {"num_nextn_predict_layers": 0, "topk_method": "noaux_tc"} if arch == "deepseek_v3" else {}
        mla = {**common, "num_key_value_heads": common["num_attention_heads"]}  # MLA has no GQA
        # latent 512 + rope 64 = 576: the only MLA head size vLLM's CPU kernel compiles
        return config_class(**mla, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                            qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=4, n_shared_experts=1,
                            moe_intermediate_size=64, first_k_dense_replace=1, n_group=1, topk_group=1,
                            **moe, **extra)
    if arch == "llama4":  # NoPE every 2nd block, chunked attention elsewhere, MoE every 2nd block
        return transformers.Llama4TextConfig(**common, head_dim=head_dim, num_local_experts=2,
                                             intermediate_size_mlp=2 * common["hidden_size"],
                                             interleave_moe_layer_step=2, no_rope_layer_interval=2,
                                             attention_chunk_size=WINDOW, num_experts_per_tok=1)
    raise ValueError(f"arch must be one of {', '.join(FAMILY_ARCHS)}, got {arch!r}")


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
    _drop_derived_fields(out_dir / "config.json", arch)
    for item in tokenizer_dir().iterdir():
        shutil.copy2(item, out_dir / item.name)
    return out_dir


def _drop_derived_fields(path: Path, arch: str) -> None:
    """Write config.json as real checkpoints ship it: without the per-layer lists transformers
    derives, but with the pattern they are derived from."""
    import json

    fields = FAMILY_ARCHS.get(arch, ())
    if not fields:
        return
    data = json.loads(path.read_text())
    for name in fields:
        data.pop(name, None)
    if arch in ("gemma3", "cohere2"):
        data["sliding_window_pattern"] = WINDOW_PATTERN
    path.write_text(json.dumps(data, indent=2) + "\n")


def add_mtp_layer(model_dir: Path, seed: int = 1) -> int:
    """Make a tiny DeepSeek-V3's last block its multi-token-prediction layer, as DeepSeek-V3
    ships one: index ``num_hidden_layers``, with the MTP projections and head beside the
    block. Returns the MTP layer's index (the depth of the stack)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text())
    depth = config["num_hidden_layers"] - 1
    config.update(num_hidden_layers=depth, num_nextn_predict_layers=1)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    weights_path = Path(model_dir) / "model.safetensors"
    tensors = load_file(str(weights_path))
    hidden = config["hidden_size"]
    generator = torch.Generator().manual_seed(seed)
    prefix = f"model.layers.{depth}."
    tensors.update({
        prefix + "enorm.weight": torch.ones(hidden), prefix + "hnorm.weight": torch.ones(hidden),
        prefix + "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=generator) * 0.08,
        prefix + "shared_head.norm.weight": torch.ones(hidden),
        prefix + "shared_head.head.weight": tensors["lm_head.weight"].clone(),
    })
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    return depth
