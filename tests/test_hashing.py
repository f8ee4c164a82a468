"""Chained block hashes: model-free unit tests."""

import numpy as np

from hf_kvpool.core.hashing import ROOT, as_token_bytes, block_hashes, chain_hash, namespace_key

NS = namespace_key("model", "")


def test_full_blocks_only():
    assert len(block_hashes(list(range(15)), 4, NS)) == 3
    assert len(block_hashes(list(range(16)), 4, NS)) == 4
    assert block_hashes(list(range(3)), 4, NS) == []


def test_key_depends_on_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, NS)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4, NS)
    assert a[1][1] == b[1][1]  # same tokens in block 1 ...
    assert a[1][0] != b[1][0]  # ... different key: the parent differs


def test_shared_prefix_shares_keys():
    a = block_hashes(list(range(12)), 4, NS)
    b = block_hashes(list(range(8)) + [99, 98, 97, 96], 4, NS)
    assert a[:2] == b[:2] and a[2] != b[2]


def test_namespace_and_salt_separate():
    other = namespace_key("model", "salt")
    assert block_hashes(list(range(8)), 4, NS)[0][0] != block_hashes(list(range(8)), 4, other)[0][0]
    assert namespace_key("ab", "c") != namespace_key("a", "bc")  # parts are length-prefixed


def test_chain_matches_step_by_step_and_is_deterministic():
    tokens = np.arange(8, dtype=np.int64)
    k1 = chain_hash(ROOT, NS, as_token_bytes(tokens[:4]))
    k2 = chain_hash(k1, NS, as_token_bytes(tokens[4:]))
    assert [k for k, _ in block_hashes(tokens, 4, NS)] == [k1, k2]
    assert len(k1) == 16 and k1 == chain_hash(ROOT, NS, as_token_bytes([0, 1, 2, 3]))


def test_token_bytes_are_int64_little_endian():
    assert as_token_bytes([1, 256]) == (1).to_bytes(8, "little") + (256).to_bytes(8, "little")
    assert as_token_bytes(np.array([1, 256], dtype=np.int32)) == as_token_bytes([1, 256])


def test_chain_memo_equals_block_hashes():
    from hf_kvpool.core.hashing import ChainMemo

    memo = ChainMemo(max_entries=3)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 1000, 100)
    other = namespace_key("model", "other")
    cases = [
        (base[:40], NS),
        (base[:90], NS),  # extends the first
        (np.concatenate([base[:50], [7, 7, 7, 7, 7, 7, 7, 7]]), NS),  # diverges inside a block
        (base[:90], other),  # same tokens, another namespace
        (base[:3], NS),  # no full block
        (base, NS),
    ]
    for tokens, ns in cases:
        for bs in (4, 8):
            got = memo.chain(tokens, bs, ns)
            assert got == block_hashes(tokens, bs, ns)
            got.append((b"x", b"y"))  # a caller extending its chain does not change the memo
            assert memo.chain(tokens, bs, ns) == block_hashes(tokens, bs, ns)
    assert len(memo._entries) <= 3
