"""The token trie the prompt cache finds its entries in (memory and disk tiers alike).

A radix trie: an edge holds the run of tokens up to the next branch or entry, so 64 distinct
300-token prompts make about 64 nodes, not 19,000 dictionaries (one per token, as mlx-lm's
`PromptTrie` keeps). Python's cyclic garbage collector walks every such object at each full
collection, on whichever thread triggers it, the inference thread's steps and the event loop
alike: 2.4 ms more a collection with 64 of those prompts cached, and in proportion to every token
a large cache holds. Adding and removing an entry is a handful of objects, not one per token.

mlx-lm's search for an entry that extends a prompt's common prefix also copied its path at every
node it passed (about 2 ms a lookup for a short prompt beside long conversations). Any entry below
the point where the prompt leaves the trie serves the same prefix, so this one follows one path
down to the first.
"""

from __future__ import annotations

from typing import Any

# The fewest tokens a hit reuses, unless it is all of a short prompt (but its last token). Distinct
# prompts share a chat template's first few tokens: reusing those saves nothing, and every such
# lookup would make some unrelated entry the most recently used (measured: 4 clients' single-turn
# requests through the server, 0.94x of the cache off with these hits, 0.975x without).
MIN_REUSE = 32


class _Node:
    __slots__ = ("edges", "entry")

    def __init__(self) -> None:
        # first token -> (the edge's tokens, the node at its end)
        self.edges: dict[int, tuple[tuple[int, ...], _Node]] = {}
        self.entry: tuple[Any, bool] | None = None  # (value, trimmable) of the entry ending here


def _common(label: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
    """How many of `label`'s tokens `tokens` has from `start` on, in order."""
    if tokens[start : start + len(label)] == label:
        return len(label)
    n = 0
    for a, b in zip(label, tokens[start:], strict=False):
        if a != b:
            break
        n += 1
    return n


class Trie:
    def __init__(self) -> None:
        self._root = _Node()

    def add(self, tokens: tuple[int, ...], value: Any, trimmable: bool = True) -> None:
        """Keep `value` for `tokens`; one that is not `trimmable` (a rotating window, a state-space
        layer) only serves prompts that extend it."""
        node, depth = self._root, 0
        while depth < len(tokens):
            edge = node.edges.get(tokens[depth])
            if edge is None:
                leaf = _Node()
                node.edges[tokens[depth]] = (tokens[depth:], leaf)
                node = leaf
                break
            label, child = edge
            n = _common(label, tokens, depth)
            if n < len(label):  # the key leaves (or ends) inside this edge: a node where it does
                middle = _Node()
                middle.edges[label[n]] = (label[n:], child)
                node.edges[tokens[depth]] = (label[:n], middle)
                child = middle
            node, depth = child, depth + n
        node.entry = (value, trimmable)

    def _path(self, tokens: tuple[int, ...]) -> tuple[list[tuple[_Node, int]], _Node]:
        """The (node, first token of the edge taken) pairs from the root down the key `tokens`
        (which must be there), and the node it ends at."""
        path, node, depth = [], self._root, 0
        while depth < len(tokens):
            label, child = node.edges[tokens[depth]]
            path.append((node, tokens[depth]))
            node, depth = child, depth + len(label)
        return path, node

    def pop(self, tokens: tuple[int, ...]) -> Any:
        """Remove the entry of `tokens` (which must be there), and the nodes only it used."""
        path, node = self._path(tokens)
        assert node.entry is not None
        value, _ = node.entry
        node.entry = None
        while path:  # a node with no entry left: gone if it has no edge, joined to its one edge
            parent, first = path.pop()
            label, child = parent.edges[first]
            if child.entry is not None or len(child.edges) > 1:
                break
            if not child.edges:
                del parent.edges[first]
                continue  # the parent may now have one edge and no entry
            ((rest, grandchild),) = child.edges.values()
            parent.edges[first] = (label + rest, grandchild)
            break
        return value

    def pop_prefixes(self, tokens: tuple[int, ...]) -> list[int]:
        """Remove the entries of the strict prefixes of `tokens`; their lengths."""
        lengths, depth = [], 0
        for parent, first in self._path(tokens)[0]:
            label, node = parent.edges[first]
            depth += len(label)
            if depth < len(tokens) and node.entry is not None:
                lengths.append(depth)
        for length in lengths:
            self.pop(tokens[:length])
        return lengths

    def candidates(self, tokens: list[int]) -> list[tuple[tuple[int, ...], int]]:
        """The entries that can serve a prefix of `tokens`, best first: (an entry's tokens, how
        many of `tokens` it serves). At least the last token is always left to compute (it gives
        the first logits): an exact entry, or one extending the whole prompt, serves all but it.
        An entry longer than what it serves is offered only if it can be trimmed back; none
        serving fewer than MIN_REUSE tokens (or all but the last of a shorter prompt)."""
        prompt = tuple(tokens)
        node, depth, shorter = self._root, 0, 0
        inside: tuple[_Node, tuple[int, ...]] | None = None  # the prompt left inside an edge: its end, its rest
        while depth < len(prompt):
            edge = node.edges.get(prompt[depth])
            if edge is None:
                break
            label, child = edge
            n = _common(label, prompt, depth)
            depth += n
            if n < len(label):
                inside = (child, label[n:])
                break
            node = child
            if node.entry is not None:
                shorter = depth
        found: list[tuple[tuple[int, ...], int]] = []
        if shorter == len(prompt):
            if node.entry is not None and node.entry[1]:  # trimmed back by its last token
                found.append((prompt, len(prompt) - 1))
        elif depth > shorter:  # the prompt leaves the trie (or ends) below its last entry: any entry under here
            node, extension = inside or (node, ())
            while node.entry is None:
                rest, node = next(iter(node.edges.values()))
                extension += rest
            if node.entry[1]:
                found.append((prompt[:depth] + extension, min(len(prompt) - 1, depth)))
        if 0 < shorter < len(prompt):  # a strict prefix of the prompt: used whole
            found.append((prompt[:shorter], shorter))
        least = min(MIN_REUSE, len(prompt) - 1)
        return [(key, reuse) for key, reuse in found if reuse >= least]
