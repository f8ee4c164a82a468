"""hf-kvpool: a drop-in DynamicCache that reuses K/V of shared prompt prefixes across generate() calls."""
