"""``python -m hf_kvpool.serve``: see :mod:`hf_kvpool.serve.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
