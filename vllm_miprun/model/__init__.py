"""Checkpoints: the one reader of files, config and headers; architecture adapters;
quantized formats; renumbering; the block-by-block runner and its streamed, prefetched
reads. No vLLM here."""
