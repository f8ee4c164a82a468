"""Which decoder families reuse, and what the pool keeps for each: writes docs/coverage.md.

For every model type of ``tests/model_zoo.py`` (tiny random configs with each family's features
on): the cache-layer kinds, what the pool stores per token (streams) and per block boundary
(checkpoints), the checkpoint bytes per layer after 1k and after 8k tokens of context (fed in
1,024-token forwards; they must be equal), and a reuse check (a prompt, then the same prompt plus
four tokens: the tokens reused, and whether the outputs equal DynamicCache's).

    python scripts/coverage.py            # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import datetime as dt
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import model_zoo as zoo  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from hf_kvpool import KVPool, PooledCache  # noqa: E402
from hf_kvpool.hf.enable import model_state  # noqa: E402

BS = 16
CHUNK = 1024


def per_layer(specs, nbytes) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for s in specs:
        out[int(s.name.split(".")[0])] += nbytes(s)
    return out


def checkpoint_bytes(model, context: int) -> dict[int, int]:
    """Per layer, the bytes of one checkpoint after ``context`` tokens fed in 1,024-token forwards."""
    pool = KVPool(block_size=BS)
    cache = PooledCache(model, pool=pool)
    ids = zoo.prompt(context, seed=1)
    with torch.no_grad():
        for start in range(0, context, CHUNK):
            model(input_ids=ids[:, start : start + CHUNK], cache=cache, use_cache=True, logits_to_keep=1)
    return per_layer(pool.layout[1], lambda s: s.nbytes) if pool.layout else {}


def reuse_check(model) -> tuple[int, bool]:
    pool = KVPool(block_size=BS)
    ids = zoo.prompt(300, seed=2)
    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, cache=PooledCache(model, pool=pool), max_new_tokens=1)
    ext = torch.cat([ids, zoo.prompt(4, seed=3)], dim=1)
    mask = torch.ones_like(ext)
    cache = PooledCache(model, pool=pool)
    kw = dict(attention_mask=mask, max_new_tokens=4, output_logits=True, return_dict_in_generate=True)
    out = model.generate(ext, cache=cache, **kw)
    ref = model.generate(ext, cache=DynamicCache(config=model.config), **kw)
    same = torch.equal(out.sequences, ref.sequences) and all(
        torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(out.logits, ref.logits)
    )
    return (cache.reused_tokens or [0])[0], same


def row(model_type: str) -> dict:
    attn = "sdpa" if model_type in zoo.SDPA_OK else "eager"
    model = zoo.build(model_type, attn=attn, max_position_embeddings=9000)
    PooledCache(model)  # enables the model
    state = model_state(model)
    kinds = [k.name for k in state.kinds]
    reused, same = reuse_check(model)
    at = {n: checkpoint_bytes(model, n) for n in (1024, 8192)}
    pool = KVPool(block_size=BS)
    model(input_ids=zoo.prompt(BS + 1, seed=4), cache=PooledCache(model, pool=pool), use_cache=True)
    streams = per_layer(
        pool.layout[0], lambda s: s.heads * s.dim * torch.empty((), dtype=s.dtype).element_size()
    )
    names = sorted({s.name.split(".", 1)[1] for s in pool.layout[0]})
    states = sorted({s.name.split(".", 1)[1] for s in pool.layout[1]})
    return dict(
        type=model_type,
        kinds=kinds,
        streams=names,
        states=states,
        stream_bytes=streams,
        ckpt_1k=at[1024],
        ckpt_8k=at[8192],
        reused=reused,
        same=same,
        single_steps=state.single_steps,
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| model type | cache layers (kind per layer) | per token, in blocks | per boundary, checkpointed | "
        "checkpoint bytes per layer at 1k / 8k tokens | reused of 304 (equal to DynamicCache) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        counts: dict[str, int] = defaultdict(int)
        for k in r["kinds"]:
            counts[k] += 1
        kinds = ", ".join(f"{n} x{c}" for n, c in counts.items())
        ckpt = "-"
        if r["ckpt_1k"]:
            parts = [f"L{i}: {r['ckpt_1k'][i]:,} / {r['ckpt_8k'].get(i, 0):,}" for i in sorted(r["ckpt_1k"])]
            ckpt = "; ".join(parts)
        note = " (1-token steps after a restore: the cost model decides)" if r["single_steps"] else ""
        lines.append(
            f"| {r['type']} | {kinds} | {', '.join(r['streams']) or '-'} | {', '.join(r['states']) or '-'} | "
            f"{ckpt} | {r['reused']} ({'yes' if r['same'] else 'NO'}){note} |"
        )
    return "\n".join(lines)


def main() -> int:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    rows = []
    for t in zoo.MODEL_TYPES:
        rows.append(row(t))
        r = rows[-1]
        print(
            f"{t:18s} reused={r['reused']:3d} same={r['same']} ckpt 1k==8k: {r['ckpt_1k'] == r['ckpt_8k']}",
            flush=True,
        )
    equal = all(r["ckpt_1k"] == r["ckpt_8k"] for r in rows)
    text = f"""# Coverage: every decoder family of transformers {transformers.__version__}

Written by `python scripts/coverage.py` on {dt.date.today()} (tiny random configs of `tests/model_zoo.py`, each
family's distinctive features on; block size {BS}; CPU, float32). `tests/test_model_coverage.py` checks the
same families on every CI run: three turns and a left-padded batch each, identical to DynamicCache.

- *per token, in blocks*: the streams the pool stores for a layer (`keys`/`values` as the cache holds them:
  MLA latents and rope keys have different widths; `indexer`: DSA indexer keys; `comp.*`: DeepSeek-V4's
  compressed entries, at their window's last token).
- *per boundary*: state that holds at one token boundary (conv windows, recurrent states, V4's compressor
  buffer and overlap), kept as checkpoints attached to the block that ends there. Its size does not depend on
  the context: checkpoint bytes after 1k and 8k tokens are {"equal for every family" if equal else "NOT equal"}.
- *reused*: a 300-token prompt, then the same prompt plus 4 tokens: the tokens the second call took from the
  pool (288 = every full block of the first call), and whether its tokens and logits (within 1e-4) equal
  DynamicCache's. MiniMax v1 (`minimax`) takes no cache but its own in generate(): `PooledCache(model)`
  says so and raises; it is the one family without reuse.

{table(rows)}
"""
    out = REPO / "docs" / "coverage.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0 if equal and all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
