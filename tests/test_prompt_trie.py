"""The prompt cache's token trie (mlx_manager/engine/prompt_trie.py): which entries serve which
prefix of a prompt, and how much of it."""

from __future__ import annotations

import random

import pytest

from mlx_manager.engine import prompt_trie
from mlx_manager.engine.prompt_trie import Trie


@pytest.fixture(autouse=True)
def any_reuse(monkeypatch):
    monkeypatch.setattr(prompt_trie, "MIN_REUSE", 1)  # the lookups below on a few tokens


def test_a_few_shared_tokens_are_no_hit_unless_they_are_the_whole_prompt(monkeypatch):
    monkeypatch.setattr(prompt_trie, "MIN_REUSE", 32)
    template = tuple(range(10))
    trie = _trie(template + tuple(range(100, 200)), template + (7,))
    assert trie.candidates([*template, 500, 501]) == []  # 10 shared tokens: a miss
    assert trie.candidates([*template, 7]) == [((*template, 7), 10)]  # a short prompt asked again
    assert trie.candidates([*template, 7, 8]) == [((*template, 7), 11)]  # or extended by its last token
    assert trie.candidates([*template, *range(100, 140)]) == [(template + tuple(range(100, 200)), 49)]


def _trie(*keys: tuple[int, ...]) -> Trie:
    trie = Trie()
    for key in keys:
        trie.add(key, key)
    return trie


def test_an_exact_entry_serves_all_but_the_last_token():
    assert _trie((1, 2, 3), (1, 2)).candidates([1, 2, 3]) == [((1, 2, 3), 2)]


def test_a_prompt_extending_an_entry_reuses_it_whole():
    assert _trie((1, 2)).candidates([1, 2, 3, 4]) == [((1, 2), 2)]


def test_an_entry_past_where_the_prompt_leaves_serves_the_common_prefix_first():
    # (1, 2) is used whole; (1, 2, 3, 9, 9) serves three tokens once trimmed back: offered first.
    assert _trie((1, 2), (1, 2, 3, 9, 9)).candidates([1, 2, 3, 4]) == [((1, 2, 3, 9, 9), 3), ((1, 2), 2)]


def test_an_entry_extending_the_whole_prompt_leaves_its_last_token():
    assert _trie((5, 6, 7, 8)).candidates([5, 6, 7]) == [((5, 6, 7, 8), 2)]


def test_a_prompt_that_shares_nothing_finds_nothing():
    assert _trie((1, 2, 3)).candidates([4, 5]) == []
    assert Trie().candidates([1, 2]) == []


def test_the_search_below_the_common_prefix_follows_one_path():
    # Long entries branching where the prompt leaves: any of them serves the same prefix, and a
    # lookup does not walk them all (mlx-lm's PromptTrie copied its path at every node).
    long = [(0, 1, branch, *range(100, 5000)) for branch in range(50)]
    found = _trie(*long).candidates([0, 1, 999])
    assert len(found) == 1 and found[0][0] in long and found[0][1] == 2


def test_pop_removes_an_entry_and_only_its_own_nodes():
    trie = _trie((1, 2, 3), (1, 2, 4))
    assert trie.pop((1, 2, 3)) == (1, 2, 3)
    assert trie.candidates([1, 2, 3]) == [((1, 2, 4), 2)]
    trie.pop((1, 2, 4))
    assert trie.candidates([1, 2, 3]) == [] and not trie._root.edges


def test_pop_prefixes_returns_the_lengths_of_shorter_entries():
    trie = _trie((1,), (1, 2), (1, 2, 3, 4))
    assert trie.pop_prefixes((1, 2, 3, 4)) == [1, 2]
    assert trie.candidates([1, 2, 3]) == [((1, 2, 3, 4), 2)]


def test_an_entry_that_cannot_be_trimmed_serves_only_prompts_that_extend_it():
    trie = Trie()
    trie.add((1, 2, 3), "window", trimmable=False)  # a rotating window or state-space layers
    assert trie.candidates([1, 2, 3]) == []  # asked again: it would have to give back its last token
    assert trie.candidates([1, 2, 9]) == []  # past the common prefix: the same
    assert trie.candidates([1, 2, 3, 4]) == [((1, 2, 3), 3)]  # extended: used whole


def _nodes(trie: Trie) -> int:
    count, stack = 0, [trie._root]
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(child for _, child in node.edges.values())
    return count


def test_a_node_per_entry_and_branch_not_per_token():
    """The cyclic garbage collector walks every node at each full collection: 64 cached 300-token
    prompts are about 64 nodes (one per token: 19,200 dictionaries, 2.4 ms more a collection)."""
    template = tuple(range(5))
    keys = [template + tuple(random.Random(n).randrange(1024) for _ in range(300)) for n in range(64)]
    trie = _trie(*keys)
    assert _nodes(trie) <= 1 + 1 + 64 + 64  # the root, the template's branch, the entries, forks of 1st tokens
    for key in keys:
        trie.pop(key)
    assert _nodes(trie) == 1


def _lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_lookups_agree_with_a_scan_of_every_entry_through_adds_and_removals():
    """Random keys over a small alphabet (so they share prefixes and fork inside edges), added,
    popped and replaced by their extensions, against the answer a scan of all entries gives."""
    rng = random.Random(16)
    trie, entries = Trie(), set()
    for _ in range(3000):
        key = tuple(rng.randrange(3) for _ in range(rng.randrange(1, 9)))
        action = rng.random()
        if action < 0.5:
            trie.add(key, key)
            entries.add(key)
        elif action < 0.7 and entries:
            gone = rng.choice(sorted(entries))
            assert trie.pop(gone) == gone
            entries.discard(gone)
        elif action < 0.8:
            trie.add(key, key)
            entries.add(key)
            lengths = trie.pop_prefixes(key)
            assert lengths == sorted(len(e) for e in entries if len(e) < len(key) and key[: len(e)] == e)
            entries -= {key[:n] for n in lengths}
        prompt = tuple(rng.randrange(3) for _ in range(rng.randrange(2, 10)))
        found = trie.candidates(list(prompt))
        prefixes = [e for e in entries if len(e) <= len(prompt) and prompt[: len(e)] == e]
        shorter = max(map(len, prefixes), default=0)
        if shorter == len(prompt):
            assert found == [(prompt, len(prompt) - 1)]
            continue
        expected_prefix = [(prompt[:shorter], shorter)] if shorter else []
        depth = max((_lcp(e, prompt) for e in entries), default=0)
        if depth > shorter:
            (key, reuse), *rest = found
            assert key in entries and _lcp(key, prompt) == depth and reuse == min(len(prompt) - 1, depth)
            assert rest == expected_prefix
        else:
            assert found == expected_prefix
    assert {key for key in entries if trie.candidates([*key, 9]) != [(key, len(key))]} == set()
