"""scripts/workloads.py: seeded agent sessions, ideal hit rates, Mooncake trace loading (no model runs)."""

from __future__ import annotations

import json

import numpy as np
from workloads import (
    PrefixIndex,
    agent_workload,
    ideal_hits,
    load_mooncake,
    scaled_length,
    trace_ideal_hits,
    trace_prompt,
)

SMALL = dict(sessions=3, turns=4, system_tokens=40, tool_tokens=24, task_tokens=(5, 9), result_tokens=(3, 50))


def test_agent_workload_is_seeded():
    a, b, c = (
        agent_workload(**SMALL, seed=1),
        agent_workload(**SMALL, seed=1),
        agent_workload(**SMALL, seed=2),
    )
    assert np.array_equal(a.shared_prefix, b.shared_prefix)
    assert [(x.session, x.turn, x.max_new_tokens) for x in a.calls] == [
        (x.session, x.turn, x.max_new_tokens) for x in b.calls
    ]
    assert all(np.array_equal(x.new_tokens, y.new_tokens) for x, y in zip(a.calls, b.calls))
    assert not np.array_equal(a.shared_prefix, c.shared_prefix)


def test_agent_calls_are_round_robin_and_in_range():
    w = agent_workload(**SMALL, answer_tokens=(16, 128), vocab_size=100)
    assert [(x.turn, x.session) for x in w.calls] == [(t, s) for t in range(4) for s in range(3)]
    assert [x.index for x in w.calls] == list(range(12))
    for x in w.calls:
        assert 16 <= x.max_new_tokens <= 128
        lo, hi = (5, 9) if x.turn == 0 else (3, 50)
        assert lo <= len(x.new_tokens) <= hi
        assert x.new_tokens.min() >= 3 and x.new_tokens.max() < 100


def _run(w, fake_output_len=5):
    """Drive the sessions with fake answers; returns the prompts in call order."""
    sessions = w.new_sessions()
    prompts = []
    for call in w.calls:
        s = sessions[call.session]
        prompt = s.prompt(call)
        output = np.full(fake_output_len, 1000 + call.index)
        s.record(prompt, output)
        prompts.append((call, prompt, output))
    return prompts


def test_histories_extend_previous_prompt_and_output():
    w = agent_workload(**SMALL)
    last = {}
    for call, prompt, output in _run(w):
        if call.turn == 0:
            assert np.array_equal(prompt[: len(w.shared_prefix)], w.shared_prefix)
        else:
            prev_prompt, prev_output = last[call.session]
            history = np.concatenate([prev_prompt, prev_output])
            assert np.array_equal(prompt[: len(history)], history)
            assert np.array_equal(prompt[len(history) :], call.new_tokens)
        last[call.session] = (prompt, output)


def test_no_sharing_keeps_lengths_but_shares_nothing():
    shared, fresh = _run(agent_workload(**SMALL)), _run(agent_workload(**SMALL, share=False))
    assert [len(p) for _, p, _ in shared] == [len(p) for _, p, _ in fresh]
    pairs = [(p, np.concatenate([p, o[:-1]])) for _, p, o in fresh]
    assert sum(ideal_hits(pairs, 4)) == 0


def test_ideal_hits_hand_made():
    bs = 4
    a = np.arange(10)  # blocks [0-3] [4-7], 2 tokens left over
    b = np.concatenate([np.arange(8), [50, 51, 52, 53, 54]])  # shares a's 2 full blocks
    c = np.arange(8)  # all of it cached: capped at len - 1
    d = np.array([9, 9, 9, 9, 9])  # nothing shared
    e = np.arange(3)  # shorter than a block
    hits = ideal_hits([(x, x) for x in (a, b, c, d, e)], bs)
    assert hits == [0, 8, 7, 0, 0]
    # what a call leaves in the cache counts, not only its prompt
    hits = ideal_hits([(a[:4], a), (a, a)], bs)
    assert hits == [0, 8]
    index = PrefixIndex(bs)
    index.add(b)
    assert index.match(a) == 8 and index.match(d) == 0 and index.num_blocks == 3


def _trace(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 1500, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 10, "input_length": 1300, "output_length": 7, "hash_ids": [0, 1, 3]},
        {"timestamp": 20, "input_length": 2048, "output_length": 9, "hash_ids": [4, 1, 2, 5]},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_load_mooncake(tmp_path):
    reqs = load_mooncake(_trace(tmp_path))
    assert len(reqs) == 3
    assert reqs[1].input_length == 1300 and reqs[1].output_length == 7 and reqs[1].hash_ids == (0, 1, 3)
    assert reqs[2].timestamp == 20
    assert len(load_mooncake(_trace(tmp_path), limit=2)) == 2


def test_trace_prompts_and_ideal_hits(tmp_path):
    reqs = load_mooncake(_trace(tmp_path))
    bt = 16
    # 1500 tokens of 512-token blocks -> 46.875 -> 47 scaled tokens; 1300 -> 40.6 -> 41; 2048 -> 64
    assert [scaled_length(r, bt) for r in reqs] == [47, 41, 64]
    p0, p1, p2 = (trace_prompt(r, bt) for r in reqs)
    assert len(p0) == 47 and np.array_equal(p0[:32], p1[:32]) and not np.array_equal(p0[32:41], p1[32:41])
    assert np.array_equal(p0[16:32], p2[16:32])  # hash id 1 is the same run of tokens everywhere
    assert np.array_equal(trace_prompt(reqs[0], bt), p0)  # fixed map
    donors = []
    hits, lengths = trace_ideal_hits(reqs, bt, donors=donors)
    # request 1 reuses blocks 0, 1 of request 0; request 2 starts with a new id: nothing
    # (block 2 of request 1 is partial, 41 // 16 = 2 full blocks)
    assert hits == [0, 32, 0] and lengths == [47, 41, 64]
    assert donors == [None, 0, None]
    # the same, checked against token-level ideal hits
    pairs = [(p, p) for p in (p0, p1, p2)]
    assert ideal_hits(pairs, bt) == hits
    # unscaled: full 512-token blocks, capped at input_length - 1
    hits512, lengths512 = trace_ideal_hits(reqs, 512)
    assert hits512 == [0, 1024, 0] and lengths512 == [1500, 1300, 2048]
