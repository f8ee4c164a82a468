"""The pool core: hashing, bookkeeping, block storage, tiers, snapshots. Never imports transformers.

It knows tokens, keys and tensors, nothing of models: ``hf_kvpool.hf`` is what meets transformers.
"""
