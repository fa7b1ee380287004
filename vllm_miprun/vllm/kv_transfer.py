"""KV transfer between instances (disaggregated prefill and decode) never pairs two plans.

NIXL's compatibility hash (vLLM's ``compute_nixl_compatibility_hash``) covers the model path and
its layer count, but not which blocks were kept: two instances that kept different sets of the
same size would exchange KV computed by different layers, and NIXL would accept it. The plugin
folds the plan digest into that hash where NIXL's worker looks it up, so NIXL's own handshake
check refuses such a pair (and unpruned instances keep vLLM's hash unchanged). The connector is
created before the model is loaded, so the loader installs the fold when that module is loaded;
nothing is imported for it otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import sys

from vllm_miprun.pipeline.plan import DIGEST_FIELD

NIXL_WORKER_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker"
_FOLDED = "_miprun_folds_plan_digest"


def hash_with_plan(compat_hash: str, digest: str | None) -> str:
    """``compat_hash`` with the plan ``digest`` folded in; unchanged for an unpruned model."""
    if digest is None:
        return compat_hash
    return hashlib.sha256(f"{compat_hash}:miprun-plan:{digest}".encode()).hexdigest()


def cover_plan_in_nixl_hash() -> None:
    """Wrap NIXL's compatibility hash (once) to cover the served plan, if NIXL is loaded."""
    module = sys.modules.get(NIXL_WORKER_MODULE)
    original = getattr(module, "compute_nixl_compatibility_hash", None)
    if original is None or getattr(original, _FOLDED, False):
        return

    @functools.wraps(original)
    def compute_nixl_compatibility_hash(vllm_config, *args, **kwargs):
        digest = getattr(vllm_config.model_config.hf_config, DIGEST_FIELD, None)
        return hash_with_plan(original(vllm_config, *args, **kwargs), digest)

    setattr(compute_nixl_compatibility_hash, _FOLDED, True)
    module.compute_nixl_compatibility_hash = compute_nixl_compatibility_hash
