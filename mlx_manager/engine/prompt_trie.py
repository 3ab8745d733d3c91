"""The token trie the prompt cache finds its entries in (memory and disk tiers alike).

mlx-lm's `PromptTrie` looks for an entry that extends a prompt's common prefix with a search that
copies its path at every node it passes: on a daemon holding long conversations, one lookup for a
short unrelated prompt walked thousands of nodes that way (about 2 ms a request, measured on
single-turn prompts after a conversation workload). Any entry below the point where the prompt
leaves the trie serves the same prefix, so this one follows a single path down to the first.
"""

from __future__ import annotations

from typing import Any

_VALUE = "value"  # a node's key for the entry ending there (token ids are ints)
# The fewest tokens a hit reuses, unless it is all of a short prompt (but its last token). Distinct
# prompts share a chat template's first few tokens: reusing those saves nothing, and every such
# lookup would make some unrelated entry the most recently used (measured: 4 clients' single-turn
# requests through the server, 0.94x of the cache off with these hits, 0.975x without).
MIN_REUSE = 32


class Trie:
    def __init__(self) -> None:
        self._root: dict[Any, Any] = {}

    def add(self, tokens: tuple[int, ...], value: Any, trimmable: bool = True) -> None:
        """Keep `value` for `tokens`; one that is not `trimmable` (a rotating window, a state-space
        layer) only serves prompts that extend it."""
        node = self._root
        for token in tokens:
            node = node.setdefault(token, {})
        node[_VALUE] = (value, trimmable)

    def pop(self, tokens: tuple[int, ...]) -> Any:
        """Remove the entry of `tokens` (which must be there), and the nodes only it used."""
        path = [self._root]
        for token in tokens:
            path.append(path[-1][token])
        value, _ = path[-1].pop(_VALUE)
        for depth in range(len(tokens), 0, -1):
            if path[depth]:
                break
            del path[depth - 1][tokens[depth - 1]]
        return value

    def pop_prefixes(self, tokens: tuple[int, ...]) -> list[int]:
        """Remove the entries of the strict prefixes of `tokens`; their lengths."""
        lengths, node = [], self._root
        for depth, token in enumerate(tokens):
            if node.pop(_VALUE, None) is not None:
                lengths.append(depth)
            node = node[token]
        return lengths

    def candidates(self, tokens: list[int]) -> list[tuple[tuple[int, ...], int]]:
        """The entries that can serve a prefix of `tokens`, best first: (an entry's tokens, how
        many of `tokens` it serves). At least the last token is always left to compute (it gives
        the first logits): an exact entry, or one extending the whole prompt, serves all but it.
        An entry longer than what it serves is offered only if it can be trimmed back; none
        serving fewer than MIN_REUSE tokens (or all but the last of a shorter prompt)."""
        node, depth, shorter = self._root, 0, 0
        while depth < len(tokens) and tokens[depth] in node:
            node = node[tokens[depth]]
            depth += 1
            if _VALUE in node:
                shorter = depth
        found: list[tuple[tuple[int, ...], int]] = []
        if shorter == len(tokens):
            if node[_VALUE][1]:  # trimmed back by its last token
                found.append((tuple(tokens), len(tokens) - 1))
        elif depth > shorter:  # the prompt leaves the trie (or ends) below its last entry: any entry under here
            extension: list[int] = []
            while _VALUE not in node:
                token = next(iter(node))
                extension.append(token)
                node = node[token]
            if node[_VALUE][1]:
                found.append((tuple(tokens[:depth]) + tuple(extension), min(len(tokens) - 1, depth)))
        if 0 < shorter < len(tokens):  # a strict prefix of the prompt: used whole
            found.append((tuple(tokens[:shorter]), shorter))
        least = min(MIN_REUSE, len(tokens) - 1)
        return [(key, reuse) for key, reuse in found if reuse >= least]
