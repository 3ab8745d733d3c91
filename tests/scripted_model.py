"""Scripted test models: real mlx-lm models whose greedy output is a given text.

A scripted model is an ordinary model folder (a one-layer `llama`, a `tokenizer.json` and a
chat template in `tokenizer_config.json`) that `mlx_lm.load` loads like any model from the hub.
No code is special: its weights are set by hand so that greedy decoding follows a *script*,
and the script can depend on the conversation. Families (`FAMILIES`) give the chat template
and the tokens of a real model family, so mlx-lm's own detection (`_infer_tool_parser`,
`_infer_thinking`) picks the parser and think tokens as it would for the real thing:

- `hermes`: Qwen3/Hermes style. Tools in the system prompt, calls as
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (mlx-lm's `json_tools`),
  `<think>`/`</think>` single tokens, tool results in `<tool_response>` inside a user turn, and
  `enable_thinking=False` ending the prompt with an empty think section. Byte-level BPE
  (`<tools>` is one token here, unlike in Qwen, so the model can see that tools are offered).
- `mistral`: Mistral Small 3.2 style. `[AVAILABLE_TOOLS]`, calls as
  `[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}` (mlx-lm's `mistral`, no end tag), results in
  `[TOOL_RESULTS]`. SentencePiece-style tokenizer (▁ for spaces, byte fallback).

How the weights make the script happen
--------------------------------------
A script is cut into *pieces* (tags such as `<tool_call>` are their own tokens; the text in
between goes by words) and every piece becomes a token of the vocabulary; the script ends with
the end-of-sequence token. Within one script a text piece is used once (a repeated word is
joined to its neighbour, a repeated name cut differently), so the pair (previous token, current
token) tells where in the script the model is, even where tags repeat (parallel calls).
The network then implements a small rule table:

1. The embedding of a token holds a constant 1, a ±1 binary code of the token (script tokens
   only), a flag for *trigger* tokens, and filler so that every row has the same norm.
2. Attention head 0 attends to the previous position: its query and key are constant vectors
   whose RoPE rotations line up at distance 1 (12 high-frequency pairs; the score is at least
   40 above any other distance up to 200k tokens). It copies the previous token's code.
   Heads 1..K attend to trigger token k wherever it is in the context (the lowest RoPE
   frequency, so position does not matter) and write whether it is there.
3. The MLP has one unit per rule, an AND gate made from SiLU: it fires (about +20) when every
   condition holds, and stays at about -20 (output ~0) if one fails. Rules are
   - *start*: the script of the triggers in the context (default: none) -> its first token;
   - *first*: current token is the script's first token -> its second token;
   - *step*: (previous, current) token of the script -> the next token.
   Each writes into one output dimension per token, with weight 1, 2, 3 so the most specific
   rule wins; `lm_head` reads those dimensions (every other token scores 0, the winner ~100).

So at the prompt's last token only the *start* rule fires and the first token comes out; after
that the step rules carry the chain until end-of-sequence. Triggers are tokens only prompts
have; the fixtures use two: a tool result (`<tool_response>`, `[TOOL_RESULTS]`) selects the
answer, offered tools (`<tools>`, `[AVAILABLE_TOOLS]`) select the calls, and with neither the
model gives a plain answer. Scripts never say a trigger, so the choice made at the start holds.
Thinking off needs no trigger: that prompt ends with `</think>` and `\\n\\n`, the very tokens
the script's own think section ends with, so the step rule after them fires and the model goes
on with what follows its thinking.

The one limit: one token of look-back must place every step. A run of tags and one-character
text that repeats with different continuations cannot be told apart (three Hermes calls:
`</tool_call>`, `\\n`, `<tool_call>` twice); `build_scripted_model` refuses such a script.

    python -m tests.scripted_model /tmp/hermes     # build HERMES_TOOL by hand
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ---- chat templates, written for the tests in the style of the real ones ------------------

HERMES_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" + tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
        "{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content or '' %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' + content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if (loop.first and content) or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

MISTRAL_TEMPLATE = """\
{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {{- '[SYSTEM_PROMPT]' + messages[0].content + '[/SYSTEM_PROMPT]' }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if tools %}
    {{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message.role == 'user' %}
        {{- '[INST]' + message.content + '[/INST]' }}
    {%- elif message.role == 'assistant' %}
        {{- message.content or '' }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- set arguments = tool_call.function.arguments %}
            {%- if arguments is not string %}
                {%- set arguments = arguments | tojson %}
            {%- endif %}
            {{- '[TOOL_CALLS]' + tool_call.function.name + '[ARGS]' + arguments }}
        {%- endfor %}
        {{- eos_token }}
    {%- elif message.role == 'tool' %}
        {{- '[TOOL_RESULTS]' + message.content + '[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}
"""


# ---- families ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One tool call: a function name and its arguments."""

    name: str
    arguments: dict[str, Any]


def _hermes_calls(calls: Sequence[Call]) -> str:
    return "\n".join(
        "<tool_call>\n" + json.dumps({"name": c.name, "arguments": c.arguments}) + "\n</tool_call>" for c in calls
    )


def _mistral_calls(calls: Sequence[Call]) -> str:
    return "".join(f"[TOOL_CALLS]{c.name}[ARGS]{json.dumps(c.arguments)}" for c in calls)


@dataclass(frozen=True)
class Family:
    """The tokens and chat template of one model family."""

    name: str
    chat_template: str
    bos: str | None
    eos: str
    control: tuple[str, ...]  # special tokens (dropped by skip_special_tokens)
    tags: tuple[str, ...]  # single added tokens that stay in decoded text (Qwen's <think>, <tool_call>)
    tools_offered: str  # a token the prompt has when tools are offered: the trigger of the call script
    tool_result: str  # the token a tool result puts into the prompt: the trigger of the answer script
    call_tags: tuple[str, str]  # the markup around calls, as mlx-lm's parser knows it ("" for none)
    think_tags: tuple[str, str] | None
    format_calls: Callable[[Sequence[Call]], str]
    spm: bool  # SentencePiece-style (▁, byte fallback) rather than byte-level BPE

    @property
    def added(self) -> tuple[str, ...]:
        return (*self.control, *self.tags)


HERMES = Family(
    name="hermes",
    chat_template=HERMES_TEMPLATE,
    bos=None,
    eos="<|im_end|>",
    control=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    tags=(
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
        "<tools>",  # not single tokens in Qwen: here they tell the model that tools are offered
        "</tools>",
    ),
    tools_offered="<tools>",
    tool_result="<tool_response>",
    call_tags=("<tool_call>", "</tool_call>"),
    think_tags=("<think>", "</think>"),
    format_calls=_hermes_calls,
    spm=False,
)

MISTRAL = Family(
    name="mistral",
    chat_template=MISTRAL_TEMPLATE,
    bos="<s>",
    eos="</s>",
    control=(
        "<unk>",
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[AVAILABLE_TOOLS]",
        "[/AVAILABLE_TOOLS]",
        "[TOOL_CALLS]",
        "[ARGS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
    ),
    tags=(),
    tools_offered="[AVAILABLE_TOOLS]",
    tool_result="[TOOL_RESULTS]",
    call_tags=("[TOOL_CALLS]", ""),
    think_tags=None,
    format_calls=_mistral_calls,
    spm=True,
)

FAMILIES = {f.name: f for f in (HERMES, MISTRAL)}


# ---- the fixtures' scripts ---------------------------------------------------------------

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name."}},
            "required": ["city"],
        },
    },
}
WEATHER_RESULT = '{"city": "Paris", "sky": "sunny", "temperature_c": 22}'
QUESTION = "What is the weather in Paris?"


@dataclass(frozen=True)
class Scripted:
    """What a ready-made scripted model says: the fixtures' expected outputs.

    A user question with tools offered gets `thinking` (if any) then `calls`; once a tool result
    is in the conversation, the model says `answer_thinking` (if any) then `answer`; with no
    tools offered and no tool result, it says `plain`. With thinking off
    (`enable_thinking=False`) the same turns come without the think section.
    """

    family: Family
    calls: tuple[Call, ...]
    answer: str
    thinking: str | None = None
    answer_thinking: str | None = None
    plain: str = "I have no tool to look up the weather."
    split_tags: bool = False  # the first call's tags come as two tokens each (`<tool` + `_call>`)

    def text(self, *, after_tool: bool = False, thinking: bool = True, tools: bool = True) -> str:
        """The exact text the model generates for that turn (the end-of-sequence token excluded)."""
        if not after_tool and not tools:
            return self.plain
        body = self.answer if after_tool else self.family.format_calls(self.calls)
        reasoning = self.answer_thinking if after_tool else self.thinking
        if not thinking or reasoning is None or self.family.think_tags is None:
            return body
        start, end = self.family.think_tags
        return f"{start}\n{reasoning}\n{end}\n\n{body}"

    def messages(self, *, after_tool: bool = False) -> list[dict[str, Any]]:
        """An OpenAI-style conversation for a turn: the question, then (after_tool) the model's
        calls and one `WEATHER_RESULT` per call."""
        messages: list[dict[str, Any]] = [{"role": "user", "content": QUESTION}]
        if after_tool:
            ids = [f"call_{i}" for i in range(len(self.calls))]
            calls = [
                {"id": id_, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                for id_, c in zip(ids, self.calls, strict=True)
            ]
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            messages += [{"role": "tool", "tool_call_id": id_, "content": WEATHER_RESULT} for id_ in ids]
        return messages

    def scripts(self) -> dict[str | None, str | list[str]]:
        first: str | list[str] = self.text()
        if self.split_tags:
            pieces = split_pieces(self.text(), self.family)
            for tag in filter(None, self.family.call_tags):
                at = pieces.index(tag)
                cut = tag.index("_") if "_" in tag else len(tag) // 2
                pieces[at : at + 1] = [tag[:cut], tag[cut:]]
            first = pieces
        # a tool result outranks the tools: listed first
        return {None: self.plain, self.family.tool_result: self.text(after_tool=True), self.family.tools_offered: first}

    def build(self, folder: Path | str) -> Path:
        return build_scripted_model(folder, self.family, self.scripts())


PARIS = Call("get_weather", {"city": "Paris"})
LONDON = Call("get_weather", {"city": "London"})

HERMES_TOOL = Scripted(
    HERMES,
    calls=(PARIS,),
    thinking="The user wants the weather in Paris, so I call get_weather.",
    answer_thinking="The tool says it is sunny and 22 °C in Paris.",
    answer="It is sunny in Paris, 22 °C.",
)
HERMES_PARALLEL = Scripted(
    HERMES,
    calls=(PARIS, LONDON),
    thinking="The user wants the weather in Paris and London: one call per city.",
    answer="Paris: sunny, 22 °C. London: rain, 14 °C.",
)
HERMES_SPLIT_TAGS = Scripted(HERMES, calls=(PARIS,), answer="It is sunny in Paris, 22 °C.", split_tags=True)
MISTRAL_TOOL = Scripted(MISTRAL, calls=(PARIS,), answer="It is sunny in Paris, 22 °C.")
MISTRAL_PARALLEL = Scripted(MISTRAL, calls=(PARIS, LONDON), answer="Paris: sunny, 22 °C. London: rain, 14 °C.")


# ---- pieces and tokenizer ----------------------------------------------------------------

_WORDS = re.compile(r"\n+|[^\S\n]*\S+|[^\S\n]+")


def split_pieces(script: str, family: Family) -> list[str]:
    """Cut a script into the tokens the model will say: tags whole, text by words, each text
    piece once (a repeat joins the next word, or the previous one at the end of a text run;
    a lone repeated word is cut in two)."""
    tags = family.added
    pieces: list[str] = []
    used: set[str] = set()
    for part in re.split("(" + "|".join(map(re.escape, sorted(tags, key=len, reverse=True))) + ")", script):
        if part in tags:
            pieces.append(part)
            continue
        run: list[str] = []
        pending = ""
        for word in _WORDS.findall(part):
            pending += word
            if pending not in used:
                run.append(pending)
                used.add(pending)
                pending = ""
        if pending and run:
            run[-1] += pending
            used.add(run[-1])
        elif pending:
            cuts = sorted(range(1, len(pending)), key=lambda k: abs(2 * k - len(pending)))
            cut = next((k for k in cuts if {pending[:k], pending[k:]}.isdisjoint(used)), None)
            run = [pending] if cut is None else [pending[:cut], pending[cut:]]
            used.update(run)
        pieces.extend(run)
    return pieces


@functools.cache
def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the ByteLevel alphabet), in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _vocab_entry(piece: str, spm: bool) -> str:
    """How the tokenizer's model spells a text piece."""
    data = piece.encode()
    if spm:
        return f"<0x{data[0]:02X}>" if len(data) == 1 else piece.replace(" ", "▁")
    chars = _byte_chars()
    return "".join(chars[b] for b in data)


def _write_tokenizer(folder: Path, family: Family, pieces: set[str]) -> Any:
    """A real tokenizer: every byte, the scripts' pieces and the family's added tokens. Its only
    merge makes "\\n\\n" one token (byte-level BPE, as after Qwen's `</think>`), so a prompt's
    encoding holds no other piece of a script than that one and single bytes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if family.spm:
        # "▁" (a space) is a token of its own, as in every real SentencePiece vocabulary: spelled
        # in bytes instead, a space is three byte-fallback tokens, which grammar engines misread.
        base = ["<unk>", *(f"<0x{b:02X}>" for b in range(256)), "▁"]
        merges: list[tuple[str, str]] = []
    else:
        newline = _byte_chars()[ord("\n")]
        base = [*_byte_chars(), newline * 2]
        merges = [(newline, newline)]  # "\n\n" is one token, as after Qwen's "</think>"
    vocab = {entry: i for i, entry in enumerate(base)}
    for entry in sorted(_vocab_entry(p, family.spm) for p in pieces):
        vocab.setdefault(entry, len(vocab))
    if family.spm:
        tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tokenizer = Tokenizer(models.BPE(vocab, merges))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.tags])
    tokenizer.save(str(folder / "tokenizer.json"))
    pad = "<|endoftext|>" if "<|endoftext|>" in family.control else family.eos
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": family.bos,
        "eos_token": family.eos,
        "pad_token": pad,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "chat_template": family.chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": family.eos, "pad_token": pad}))
    return tokenizer


# ---- rules and weights -------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    present: int | None  # trigger index that must be in the context
    absent: tuple[int, ...]  # trigger indices that must not be
    prev: int | None  # token id, or None for any
    cur: int | None
    next: int
    weight: int


HEAD_DIM = 64
ROPE_THETA = 1e6
PREV_PAIRS = 12  # RoPE pairs of the previous-token head
PREV_GAP = 0.8153  # min over d != 1, d < 200k of sum_j (1 - cos(theta_j (d - 1))), j < 12
PREV_MARGIN = 40.0  # attention score of the previous token over any other
TRIGGER_SCORE = 60.0  # attention score of a trigger over any other token
GATE = 20.0  # an MLP unit's pre-activation: +GATE when it fires, <= -GATE when not
LOGIT = 100.0  # the winning token's logit, about


def _rules(scripts: list[tuple[str | None, list[int], list[str]]], eos: int) -> list[_Rule]:
    """The rule table (see the module docstring); raises if a script is ambiguous."""
    rules: list[_Rule] = []
    for order, (_, ids, pieces) in enumerate(scripts):
        present = order - 1 if order else None  # scripts[0] is the default
        absent = tuple(range(order - 1 if order else len(scripts) - 1))
        seq = [*ids, eos]
        rules.append(_Rule(present, absent, None, None, seq[0], 1))
        if len(seq) > 1:
            rules.append(_Rule(present, absent, None, seq[0], seq[1], 2))
        seen: dict[tuple[int, int], int] = {}
        for i in range(1, len(seq) - 1):
            key, nxt = (seq[i - 1], seq[i]), seq[i + 1]
            if key in seen:
                if seen[key] != nxt:
                    raise ValueError(f"ambiguous script: {pieces[i - 1 : i + 1]!r} has two different continuations")
                continue
            seen[key] = nxt
            rules.append(_Rule(present, absent, seq[i - 1], seq[i], nxt, 3))
    return rules


def _weights(vocab_size: int, rules: list[_Rule], triggers: list[int]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    tokens = sorted({t for r in rules for t in (r.prev, r.cur, r.next) if t is not None})
    number = {t: i + 1 for i, t in enumerate(tokens)}  # codes start at 1: never all -1
    bits = max(2, len(tokens).bit_length())

    def code(token: int) -> np.ndarray:
        return np.array([1.0 if number[token] >> b & 1 else -1.0 for b in range(bits)])

    k = len(triggers)
    # residual layout: constant, current code, trigger flags, filler | previous code, triggers seen, outputs
    const, cur, flag, fill = 0, 1, 1 + bits, 1 + bits + k
    prev, seen, out = fill + 1, fill + 1 + bits, fill + 1 + bits + k
    heads = 1 + k
    step = math.lcm(heads, 16)  # transformers wants the hidden size to split evenly into heads
    dim = -(-(out + len(tokens)) // step) * step
    norm2 = 1.0 + bits  # every embedding row has this squared norm

    embed = np.zeros((vocab_size, dim))
    embed[:, const] = 1.0
    for t in tokens:
        embed[t, cur : cur + bits] = code(t)
    for i, t in enumerate(triggers):
        embed[t, flag + i] = 1.0
    embed[:, fill] = np.sqrt(norm2 - (embed**2).sum(axis=1))
    kappa = np.sqrt(dim / norm2)  # input_layernorm's scale for every row

    wq, wk, wv = (np.zeros((heads * HEAD_DIM, dim)) for _ in range(3))
    wo = np.zeros((dim, heads * HEAD_DIM))
    half = HEAD_DIM // 2
    theta = ROPE_THETA ** (-np.arange(half) * 2 / HEAD_DIM)
    # head 0: score(d) = a^2 / sqrt(HEAD_DIM) * sum_j cos(theta_j (d - 1)), largest at d = 1
    a = np.sqrt(PREV_MARGIN * np.sqrt(HEAD_DIM) / PREV_GAP)
    for j in range(PREV_PAIRS):
        wq[j, const] = a / kappa
        wk[j, const] = a * np.cos(theta[j]) / kappa
        wk[j + half, const] = a * np.sin(theta[j]) / kappa
    for b in range(bits):
        wv[b, cur + b] = 1 / kappa
        wo[prev + b, b] = 1.0
    # heads 1..k: a trigger scores TRIGGER_SCORE, everything else 0 (slowest RoPE pair: no drift)
    c = np.sqrt(TRIGGER_SCORE * np.sqrt(HEAD_DIM))
    for i in range(k):
        base = (1 + i) * HEAD_DIM
        wq[base + half - 1, const] = c / kappa
        wk[base + half - 1, flag + i] = c / kappa
        wv[base, flag + i] = 1 / kappa
        wo[seen + i, base] = 1.0

    # MLP: unit r computes G_r . h = 0.5 when its conditions hold, <= -0.5 otherwise
    gate = np.zeros((len(rules), dim))
    up = np.zeros((len(rules), dim))
    down = np.zeros((dim, len(rules)))
    largest = np.sqrt(norm2 + bits + k)  # largest |h| after attention
    slope = 2 * GATE * largest / np.sqrt(dim)
    for r, rule in enumerate(rules):
        g = gate[r]
        g[const] = 0.5
        for block, token in ((cur, rule.cur), (prev, rule.prev)):
            if token is not None:
                g[block : block + bits] = code(token) / 2
                g[const] -= bits / 2
        if rule.present is not None:
            g[seen + rule.present] = 1.0
            g[const] -= 1.0
        for i in rule.absent:
            g[seen + i] = -1.0
        gate[r] *= slope
        up[r, const] = 1.0
        down[out + number[rule.next] - 1, r] = rule.weight
    head = np.zeros((vocab_size, dim))
    for t in tokens:
        head[t, out + number[t] - 1] = LOGIT / np.sqrt(dim)

    layer = "model.layers.0."
    weights = {
        "model.embed_tokens.weight": embed,
        layer + "self_attn.q_proj.weight": wq,
        layer + "self_attn.k_proj.weight": wk,
        layer + "self_attn.v_proj.weight": wv,
        layer + "self_attn.o_proj.weight": wo,
        layer + "mlp.gate_proj.weight": gate,
        layer + "mlp.up_proj.weight": up,
        layer + "mlp.down_proj.weight": down,
        layer + "input_layernorm.weight": np.ones(dim),
        layer + "post_attention_layernorm.weight": np.ones(dim),
        "model.norm.weight": np.ones(dim),
        "lm_head.weight": head,
    }
    sizes = {"hidden_size": dim, "intermediate_size": len(rules), "num_attention_heads": heads}
    return weights, sizes


def build_scripted_model(
    folder: Path | str, family: Family | str, scripts: Mapping[str | None, str | Sequence[str]]
) -> Path:
    """Write a scripted model folder and return its path.

    `scripts` maps a trigger token to what the model says when that token is in the
    conversation (`None`: the default, required). A script is a text (cut by `split_pieces`)
    or an explicit list of pieces whose concatenation is the text. With several triggers in
    the conversation, the one listed first wins. Triggers must be single tokens that no
    script says. The end-of-sequence token follows every script.
    """
    import mlx.core as mx

    fam = FAMILIES[family] if isinstance(family, str) else family
    if None not in scripts:
        raise ValueError("scripts need a default (key None)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ordered = [(None, scripts[None]), *((t, s) for t, s in scripts.items() if t is not None)]
    cut = [(t, split_pieces(s, fam) if isinstance(s, str) else list(s)) for t, s in ordered]
    tokenizer = _write_tokenizer(folder, fam, {p for _, ps in cut for p in ps if p not in fam.added})

    def token(piece: str) -> int:
        found = tokenizer.token_to_id(piece if piece in fam.added else _vocab_entry(piece, fam.spm))
        if found is None:
            raise ValueError(f"{piece!r} is not one token")
        return int(found)

    triggers = [token(t) for t, _ in cut[1:] if t is not None]
    compiled = [(t, [token(p) for p in ps], ps) for t, ps in cut]
    for trigger, (_, ids, _) in ((t, c) for t in triggers for c in compiled):
        if trigger in ids:
            raise ValueError(f"a script says its trigger {tokenizer.id_to_token(trigger)!r}")
    eos = token(fam.eos)
    rules = _rules(compiled, eos)
    weights, sizes = _weights(tokenizer.get_vocab_size(), rules, triggers)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **sizes,
        "num_hidden_layers": 1,
        "num_key_value_heads": sizes["num_attention_heads"],
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-6,
        "vocab_size": tokenizer.get_vocab_size(),
        "max_position_embeddings": 131072,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "bos_token_id": token(fam.bos) if fam.bos else None,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    arrays = {name: mx.array(w.astype(np.float32)) for name, w in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), arrays, metadata={"format": "mlx"})
    return folder


if __name__ == "__main__":
    print(HERMES_TOOL.build(sys.argv[1]))
