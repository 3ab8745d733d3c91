"""The prompt cache's token trie (mlx_manager/engine/prompt_trie.py): which entries serve which
prefix of a prompt, and how much of it."""

from __future__ import annotations

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
    assert trie.candidates([1, 2, 3]) == [] and trie._root == {}


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
