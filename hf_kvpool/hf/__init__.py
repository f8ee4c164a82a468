"""What meets transformers: ``PooledCache``, the generate() call it serves, the model fingerprint,
and every private transformers/torch/accelerate/PEFT attribute relied on (``compat``)."""
