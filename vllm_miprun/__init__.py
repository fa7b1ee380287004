"""vllm-miprun: a vLLM model-loader plugin that prunes whole decoder blocks at load time."""

__version__ = "0.1.0"


def register() -> None:
    """``vllm.general_plugins`` entry point; vLLM calls it in every process, maybe twice.

    Importing ``loader`` registers the ``miprun`` load format; ``install`` adds the
    ``--miprun-*`` flags and the front-process planning hook, once.
    """
    from vllm_miprun.vllm import engine_args, loader  # noqa: F401 - import registers the loader

    engine_args.install()
    _route_library_logs_to_vllm()


def _route_library_logs_to_vllm() -> None:
    """Inside vLLM, the library's standard loggers (planning, calibration) print through
    vLLM's handler and format; outside vLLM they stay plain ``logging`` loggers."""
    import logging

    library, vllm_logger = logging.getLogger("vllm_miprun"), logging.getLogger("vllm")
    if library.handlers or not vllm_logger.handlers:
        return
    for handler in vllm_logger.handlers:
        library.addHandler(handler)
    library.setLevel(vllm_logger.level or logging.INFO)
    library.propagate = False
