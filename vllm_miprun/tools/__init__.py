"""Commands people run: the ``vllm-miprun`` CLI, export, eval, profile, assets, and the
harness that tests and benchmarks share."""
