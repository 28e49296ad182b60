"""Data: sources (OpenMoji, TFDS by name, JSONL/folder), safe image decoding, tokenizers and
the grain pipeline that turns them into static-shape, sharded, resumable batches.

Kept import-free so worker processes and ``python -m ravlm_jax.data.openmoji`` start fast.
"""
