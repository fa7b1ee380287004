"""vllm-miprun: a vLLM model-loader plugin that prunes whole decoder blocks at load time."""

__version__ = "0.1.0"


def register() -> None:
    """``vllm.general_plugins`` entry point; vLLM calls it in every process, maybe twice.

    Importing ``loader`` registers the ``miprun`` load format; ``install`` adds the
    ``--miprun-*`` flags and the front-process planning hook, once. It never raises: a
    plugin that fails here would stop every vLLM command, miprun or not. On a vLLM
    release the plugin was not checked against it warns once, and planning refuses
    ``--load-format miprun`` (``vllm.compat``).
    """
    import logging

    try:
        from vllm_miprun.vllm import compat, engine_args, loader  # noqa: F401 - import registers the loader

        compat.warn_if_unchecked()
        engine_args.install()
        route_library_logs_to_vllm()
    except Exception as error:  # noqa: BLE001 - vLLM itself must keep working
        logging.getLogger("vllm.vllm_miprun").warning(
            "vllm-miprun is disabled in this process: registering it failed with %s: %s "
            "(--load-format miprun will be unknown)", type(error).__name__, error)


def route_library_logs_to_vllm() -> None:
    """Inside vLLM, the library's standard loggers (planning, calibration) print through
    vLLM's handler and format; outside vLLM they stay plain ``logging`` loggers. vLLM may
    configure its logger after the plugin registers (``vllm serve`` does), so planning
    calls this again; once routed, it does nothing."""
    import logging

    library, vllm_logger = logging.getLogger("vllm_miprun"), logging.getLogger("vllm")
    if library.handlers or not vllm_logger.handlers:
        return
    for handler in vllm_logger.handlers:
        library.addHandler(handler)
    library.setLevel(vllm_logger.level or logging.INFO)
    library.propagate = False
