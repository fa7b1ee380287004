"""Checkpoints: the one reader of files, config and headers; architecture adapters;
quantized formats; renumbering; the block-by-block runner. No vLLM here."""
