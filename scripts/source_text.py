"""Real text for real-model workloads: source files of the installed transformers package.

The demo's tool outputs (an agent reading files) and the benchmark's prompts for a real model come
from here, so a real model sees text it can read rather than random token ids. What the text is
depends on the installed transformers version (the files are read from its package folder).

- :func:`read_excerpt`: a file from ``anchor`` on, cut at a line boundary to at most ``max_tokens``.
- :class:`TextTokens`: token ids of several source files as one stream; ``source(rng, n)`` returns
  ``n`` consecutive ids from a random offset (a drop-in for random ids in ``workloads.agent_workload``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["package_file", "read_excerpt", "TextTokens", "CORPUS_FILES"]

# files that make up the benchmark's text stream (relative to the transformers package)
CORPUS_FILES = (
    "generation/stopping_criteria.py",
    "generation/streamers.py",
    "generation/logits_process.py",
    "generation/configuration_utils.py",
    "generation/utils.py",
    "cache_utils.py",
    "masking_utils.py",
    "models/llama/modeling_llama.py",
)


def package_file(relpath: str) -> Path:
    """A file of the installed transformers package."""
    import transformers

    path = Path(transformers.__file__).parent / relpath
    if not path.is_file():
        raise FileNotFoundError(f"transformers {transformers.__version__} has no {relpath}")
    return path


def cut_to_tokens(text: str, tokenizer, max_tokens: int) -> str:
    """The longest run of whole lines of ``text`` that fits in ``max_tokens`` tokens (at least one line's part)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return text
    end = enc["offset_mapping"][max_tokens][0]  # first character past the budget
    cut = text.rfind("\n", 0, end)
    return text[: cut if cut > 0 else end]


def read_excerpt(relpath: str, tokenizer, max_tokens: int = 300, anchor: str | None = None) -> str:
    """``relpath`` of the transformers package from the first line containing ``anchor`` (default: the top),
    at most ``max_tokens`` tokens, ending at a line boundary."""
    text = package_file(relpath).read_text()
    if anchor is not None:
        at = text.find(anchor)
        if at < 0:
            raise ValueError(f"{relpath} has no {anchor!r}")
        text = text[text.rfind("\n", 0, at) + 1 :]
    return cut_to_tokens(text, tokenizer, max_tokens)


class TextTokens:
    """The token ids of ``files`` (transformers source) as one stream, sampled in windows."""

    def __init__(self, tokenizer, files: tuple[str, ...] = CORPUS_FILES):
        texts = [package_file(f).read_text() for f in files]
        ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        self.ids = np.asarray(ids, dtype=np.int64)
        self.files = files

    def __len__(self) -> int:
        return len(self.ids)

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` consecutive token ids from a random offset of the stream."""
        if n > len(self.ids):
            raise ValueError(f"asked for {n} tokens; the text has {len(self.ids)}")
        start = int(rng.integers(0, len(self.ids) - n + 1))
        return self.ids[start : start + n].copy()
