"""Retrieval: indexes over unit vectors (``scann``, ``exact``) and on-disk datastores.

Names are resolved lazily, so ``python -m ravlm_jax.retrieval.datastore`` runs its module
once (no runpy warning) and importing the package stays cheap.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "index": ("ExactIndex", "Index", "ScannIndex", "default_scann_params", "exact_search",
              "load_index", "make_index"),
    "datastore": ("BuildSources", "Datastore", "DatastoreError", "build_datastore",
                  "encoder_fingerprint", "payload_hash", "search_filtered",
                  "sharded_encode_fn"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
