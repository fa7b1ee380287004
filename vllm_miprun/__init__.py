"""vllm-miprun: a vLLM model-loader plugin that prunes whole decoder blocks at load time."""

__version__ = "0.1.0"


def register() -> None:
    """``vllm.general_plugins`` entry point; vLLM calls it in every process, maybe twice.

    Importing ``loader`` registers the ``miprun`` load format; ``install`` adds the
    ``--miprun-*`` flags and the front-process planning hook, once.
    """
    from vllm_miprun import engine_args, loader  # noqa: F401 - import registers the loader

    engine_args.install()
