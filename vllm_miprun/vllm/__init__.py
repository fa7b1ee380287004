"""The only package that imports vLLM: flags and front-process plan, the ``miprun`` load
format, metrics, the ``vllm`` launcher, hub downloads, LoRA and drafts."""
