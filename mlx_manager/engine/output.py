"""A job's generated text, split by what it is: answer text, reasoning, tool calls.

Tokens become text (`TextStream`: whole characters, stop strings held back), then mlx-lm's
`TextStateMachine` follows the model family's markers (think tags, tool-call tags, chosen by
mlx-lm from the tokenizer and chat template) on the *text*, so a tag split across tokens or
merged with its neighbour is still found, and text that may be the start of a marker is held
back until it is known not to be. Thinking goes out as reasoning; a tool call's text is
collected until its end marker (or the end of the output, for families without one) and parsed
by mlx-lm's parser for the family; the markup itself never reaches the answer text.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from mlx_manager.engine.textstream import TextStream
from mlx_manager.engine.types import ReasoningDelta, TextDelta, ToolCall

log = logging.getLogger("mlx_manager.engine")

NORMAL, REASONING, TOOL = "normal", "reasoning", "tool"
Piece = TextDelta | ReasoningDelta | ToolCall


class Output:
    """One job's output: `add(token)` and `finish()` return what the caller sees, in order."""

    def __init__(
        self,
        tokenizer: Any,
        prompt: list[int],
        stop: list[str],
        *,
        chat: bool,
        tools: list[dict[str, Any]] | None = None,
        parallel_tool_calls: bool = True,
    ) -> None:
        """`chat`: split off reasoning (a plain completion is raw text); `tools`: the tools
        offered, whose calls are parsed (None: a call is just text)."""
        from mlx_lm.generate import TextStateMachine

        self.text = TextStream(tokenizer.detokenizer, stop)
        self._tokenizer = tokenizer
        self._tools = tools
        self._parallel = parallel_tool_calls
        self._machine = TextStateMachine(_transitions(tokenizer, chat, tools is not None))
        self._state = self._machine.make_state(initial=_initial_state(tokenizer, prompt) if chat else NORMAL)
        self._call_text = ""
        self._section = self._state[0]  # the state of the last text sent
        self._trim_start = True  # at the start of a section: its leading whitespace goes
        self._held_space = ""  # trailing whitespace of reasoning, sent only if more text follows
        self.calls = 0  # tool calls made so far
        self.reasoning_tokens = 0

    @property
    def stopped(self) -> bool:
        """A stop string was found, or the one call allowed (parallel_tool_calls false) is made."""
        return self.text.stopped or self._called_enough

    @property
    def _called_enough(self) -> bool:
        return not self._parallel and self.calls > 0

    def add(self, token: int) -> list[Piece]:
        before = self._state[0]
        pieces = self._split(self.text.add(token))
        if REASONING in (before, self._state[0]):
            self.reasoning_tokens += 1
        return pieces

    def finish(self) -> list[Piece]:
        """The rest, at the end of the output: held-back text, and a call without an end marker."""
        pieces = self._split(self.text.finish())
        self._state, rest, state = self._machine.flush(self._state)
        pieces += self._pieces([(state, rest)])
        if state == TOOL and self._call_text:
            pieces += self._parse_call(complete=False)
        return pieces

    def _split(self, text: str) -> list[Piece]:
        if not text or self._called_enough:
            return []
        self._state, segments = self._machine.split(self._state, text)
        return self._pieces(segments)

    def _pieces(self, segments: list[tuple[str | None, str]]) -> list[Piece]:
        """Turn (state, text) segments into pieces; a tool segment followed by another state ends a call."""
        pieces: list[Piece] = []
        for i, (state, text) in enumerate(segments):
            if self._called_enough:
                break
            if state == TOOL:
                self._call_text += text
                if i < len(segments) - 1:  # the end marker came: the call is complete
                    pieces += self._parse_call(complete=True)
            elif state is not None:
                piece = self._text(state, text)
                if piece is not None:
                    pieces.append(piece)
        return pieces

    def _text(self, state: str, text: str) -> Piece | None:
        """A reasoning section is sent without the whitespace around it (`<think>\n...\n</think>`),
        and the answer after it without the blank lines that follow the think tag."""
        if state != self._section:
            self._section, self._trim_start, self._held_space = state, True, ""
        if state == REASONING:
            text = self._held_space + text
            body = text.rstrip()
            self._held_space = text[len(body) :]
            text = body
        if self._trim_start and (state == REASONING or self.reasoning_tokens):
            text = text.lstrip()
        if not text:
            return None
        self._trim_start = False
        return ReasoningDelta(text) if state == REASONING else TextDelta(text)

    def _parse_call(self, complete: bool) -> list[Piece]:
        """The calls in the collected text. Text that does not parse as a call is the model's
        own malformed output: it goes out as answer text, unless the output was cut short."""
        text, self._call_text = self._call_text, ""
        try:
            parsed = self._tokenizer.tool_parser(text, self._tools)
        except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            if not complete and not self.text.stopped:
                log.info("dropped a tool call cut short (%s)", type(exc).__name__)
                return []
            log.info("tool call text did not parse (%s): sent as text", type(exc).__name__)
            return [TextDelta(self._tokenizer.tool_call_start + text + (self._tokenizer.tool_call_end or ""))]
        calls: list[Piece] = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if self._called_enough:
                break
            arguments = call.get("arguments", {})
            calls.append(
                ToolCall(
                    index=self.calls,
                    id=str(call.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
                    name=str(call["name"]),
                    arguments=arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
                )
            )
            self.calls += 1
        return calls


def _transitions(tokenizer: Any, chat: bool, parse_tools: bool) -> dict[str, list[tuple[str, str]]]:
    """The markers of the model's family, as mlx-lm's `make_text_state_machine` has them, with
    tool calls only when the request offered tools (otherwise a call is just text)."""
    transitions: dict[str, list[tuple[str, str]]] = {NORMAL: []}
    if not chat:
        return transitions
    if tokenizer.has_thinking:
        transitions[NORMAL].append((tokenizer.think_start, REASONING))
        transitions[REASONING] = [(tokenizer.think_end, NORMAL)]
    if parse_tools and tokenizer.has_tool_calling:
        targets = {dst for edges in tokenizer.response_transitions.values() for _, dst in edges}
        if TOOL not in targets:
            transitions[NORMAL].append((tokenizer.tool_call_start, TOOL))
        if tokenizer.has_thinking:
            transitions[REASONING].append((tokenizer.tool_call_start, TOOL))
        transitions[TOOL] = [(tokenizer.tool_call_end, NORMAL)] if tokenizer.tool_call_end else []
    for marker in tokenizer.structural_markers or ():
        transitions[NORMAL].append((marker, NORMAL))
    for state, edges in tokenizer.response_transitions.items():
        transitions.setdefault(state, []).extend(edges)
    return transitions


def _initial_state(tokenizer: Any, prompt: list[int]) -> str:
    """Reasoning when the prompt itself opened a think section the model is to continue."""
    if tokenizer.response_initial_state:
        return str(tokenizer.response_initial_state)
    if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
        return REASONING
    return NORMAL
