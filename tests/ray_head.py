"""A local Ray cluster on loopback for one test: start it, write its address, stop on SIGINT.

Usage: python ray_head.py TEMP_DIR WORKERS ADDRESS_FILE

The cluster has WORKERS CPUs and WORKERS (fake) GPUs: the test's CPU platform
(``tests/ray_cpu``) places each vLLM worker on one "GPU". Ray takes 127.0.0.1 as the
node address only when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set (the caller's env):
otherwise it replaces the loopback address given here with the machine's own address; and
``RAY_AUTH_MODE=disabled`` keeps Ray 2.60 from writing a token to ``~/.ray``. Tests start this
in its own session (``harness.start_in_own_group``), so stopping it takes every Ray
process with it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(temp_dir: str, workers: int, address_file: Path) -> None:
    import ray

    ray.init(num_cpus=workers, num_gpus=workers, include_dashboard=False, _temp_dir=temp_dir,
             _node_ip_address="127.0.0.1")
    try:
        partial = address_file.with_suffix(".tmp")
        partial.write_text(ray.get_runtime_context().gcs_address)
        partial.replace(address_file)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
