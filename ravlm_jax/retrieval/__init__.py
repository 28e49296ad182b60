"""Retrieval: indexes over unit vectors (``scann``, ``exact``) and on-disk datastores."""

from ravlm_jax.retrieval.datastore import (
    BuildSources,
    Datastore,
    DatastoreError,
    build_datastore,
    encoder_fingerprint,
    payload_hash,
    search_filtered,
    sharded_encode_fn,
)
from ravlm_jax.retrieval.index import (
    ExactIndex,
    Index,
    ScannIndex,
    default_scann_params,
    exact_search,
    load_index,
    make_index,
)

__all__ = [
    "BuildSources",
    "Datastore",
    "DatastoreError",
    "ExactIndex",
    "Index",
    "ScannIndex",
    "build_datastore",
    "default_scann_params",
    "encoder_fingerprint",
    "exact_search",
    "load_index",
    "make_index",
    "payload_hash",
    "search_filtered",
    "sharded_encode_fn",
]
