"""Split a model's output into reasoning and answer, incrementally, in the model family's format:

- "think": `<think>…</think>` text is reasoning (DeepSeek R1/V3.x, Qwen3, Qwen3-Next, GLM-4.5, ...) — `ThinkSplitter`;
- "harmony": gpt-oss's channels, `analysis` is reasoning, `final` the answer — `HarmonySplitter`;
- "none": everything is the answer — `PlainSplitter`.

`splitter_for(model)` picks one from the model. Each works on stream chunks of any size (a tag may arrive split
across chunks) and on output cut off mid-thought; ThinkSplitter also on output that starts inside the thought
(R1's template opens `<think>` in the prompt).
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    def __init__(self, starts_in_think: bool = False):
        self.in_think = starts_in_think
        self.seen_any = False
        self.buf = ""
        self.after_close = False  # strip the newline(s) R1 writes right after </think>
        self.emitted_reasoning = False  # strip the newline(s) that open a thought

    def feed(self, text: str) -> tuple[str, str]:
        """-> (reasoning, content) that is safe to emit now; a possible partial tag is held back."""
        self.buf += text
        reasoning, content = [], []
        while self.buf:
            if self.in_think:
                i = self.buf.find(CLOSE)
                if i >= 0:
                    reasoning.append(self.buf[:i])
                    self.buf = self.buf[i + len(CLOSE):]
                    self.in_think = False
                    self.after_close = True
                    continue
                keep = _partial_suffix(self.buf, CLOSE)
                reasoning.append(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            if not self.seen_any:
                # Only a leading <think> opens a thought (R1 emits it first when the prompt did not).
                stripped = self.buf.lstrip()
                if stripped.startswith(OPEN):
                    self.buf = stripped[len(OPEN):]
                    self.in_think = True
                    self.seen_any = True
                    continue
                if OPEN.startswith(stripped):
                    break  # could still become <think>
                self.seen_any = True
            if self.after_close:
                stripped = self.buf.lstrip("\n")
                if not stripped:
                    self.buf = ""
                    break
                self.buf = stripped
                self.after_close = False
            content.append(self.buf)
            self.buf = ""
        if reasoning:
            self.seen_any = True
        r = "".join(reasoning)
        if not self.emitted_reasoning:
            r = r.lstrip("\n")
            self.emitted_reasoning = bool(r)
        return r, "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of output: whatever is held back belongs where we are (a thought cut off at max_tokens stays
        reasoning)."""
        rest, self.buf = self.buf, ""
        if self.in_think:
            return rest, ""
        return "", rest.lstrip("\n") if self.after_close else rest


def _partial_suffix(s: str, tag: str) -> int:
    """Length of the longest suffix of s that is a proper prefix of tag."""
    for n in range(min(len(s), len(tag) - 1), 0, -1):
        if tag.startswith(s[-n:]):
            return n
    return 0


def split_text(text: str, starts_in_think: bool = False) -> tuple[str | None, str]:
    """Whole-message form: -> (reasoning or None, content)."""
    sp = ThinkSplitter(starts_in_think)
    r1, c1 = sp.feed(text)
    r2, c2 = sp.flush()
    reasoning = r1 + r2
    return (reasoning if (reasoning or starts_in_think or text.lstrip().startswith(OPEN)) else None), c1 + c2


# --- gpt-oss harmony ---------------------------------------------------------------------------------------------
#
# The assistant's output after the generation prompt `<|start|>assistant` is a run of messages
#     [<|start|>ROLE][ to=RECIPIENT]<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>TYPE]<|message|>BODY END
# with END one of <|end|> (more messages follow), <|return|> (done) or <|call|> (a tool call, done). Grammar as
# llama.cpp parses it: common/parsers/gpt-oss.cpp (llama-cpp-python 0.3.36's tree). `analysis` is the thought,
# `final` the answer; `commentary` carries preambles and tool calls (`to=functions.NAME`), which are passed through
# unmangled, headers and all, for a tool-call parser downstream. Forms seen from the engines, all handled:
#  - raw text (ik_llama.cpp's chat, any engine's /v1/completions): every header present;
#  - llama-server's chat with --reasoning-format none: `<|channel|>analysis<|message|>T<|end|>F` — the analysis
#    message kept whole, the final message's header already consumed by its parser;
#  - llama.cpp's detokenizer hides <|end|> unless special tokens are shown (it renders only <|channel|>,
#    <|message|>, <|start|>, <|constrain|>; src/llama-vocab.cpp), so a message may end at the next <|start|>.

H_START, H_CHANNEL, H_MESSAGE, H_CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
H_END, H_RETURN, H_CALL = "<|end|>", "<|return|>", "<|call|>"
_H_ENDS = (H_END, H_RETURN, H_CALL, H_START)
_H_HEADS = (H_START, H_CHANNEL)


class HarmonySplitter:
    """Incremental harmony parser: analysis -> reasoning, final -> content, other channels passed through raw."""

    def __init__(self, starts_in_think: bool = False):  # same signature as ThinkSplitter; harmony opens nothing
        self.buf = ""
        self.state = "boundary"  # boundary | header | body
        self.header = ""
        self.kind = "content"  # where the current body goes: reasoning | content | raw

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning, content = [], []
        while self.buf:
            if self.state == "boundary":
                if self.buf.startswith(_H_HEADS):
                    self.state, self.header = "header", ""
                    continue
                if any(h.startswith(self.buf) for h in _H_HEADS):
                    break  # could still become a header
                self.state, self.kind = "body", "content"  # a message without a header is the answer
                continue
            if self.state == "header":
                i = self.buf.find(H_MESSAGE)
                if i < 0:
                    keep = _partial_suffix(self.buf, H_MESSAGE)
                    self.header += self.buf[:len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                self.header += self.buf[:i]
                self.buf = self.buf[i + len(H_MESSAGE):]
                self.kind = _harmony_kind(self.header)
                if self.kind == "raw":
                    content.append(self.header + H_MESSAGE)
                self.state = "body"
                continue
            # body: up to the first end marker (or a partial one held back)
            hits = [(self.buf.find(m), m) for m in _H_ENDS]
            hits = [(i, m) for i, m in hits if i >= 0]
            if hits:
                i, m = min(hits)
                body, self.buf = self.buf[:i], self.buf[i:]
                out = reasoning if self.kind == "reasoning" else content
                out.append(body)
                if m != H_START:  # a visible end marker is consumed (kept in a raw message)
                    self.buf = self.buf[len(m):]
                    if self.kind == "raw":
                        content.append(m)
                self.state = "boundary"
                continue
            keep = max(_partial_suffix(self.buf, m) for m in _H_ENDS)
            (reasoning if self.kind == "reasoning" else content).append(self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of output: a body cut off at max_tokens stays where it was going; a dangling header is dropped
        (it carries no text), except a tool call's."""
        rest, self.buf = self.buf, ""
        if self.state == "body":
            return (rest, "") if self.kind == "reasoning" else ("", rest)
        if self.state == "header":
            header, self.header = self.header + rest, ""
            return ("", header) if " to=" in header else ("", "")
        return "", ("" if any(h.startswith(rest) for h in _H_HEADS) else rest)


def _harmony_kind(header: str) -> str:
    """A message header -> where its body goes."""
    if " to=" in header:
        return "raw"  # a tool call (recipient in the role or the channel)
    ch = header.split(H_CHANNEL, 1)[1] if H_CHANNEL in header else ""
    ch = ch.split(H_CONSTRAIN, 1)[0].strip()
    if ch == "analysis":
        return "reasoning"
    if ch == "final" or not ch:
        return "content"
    return "raw"  # commentary (preambles) and anything else


class PlainSplitter:
    """A model without a reasoning format: everything is the answer."""

    def __init__(self, starts_in_think: bool = False):
        pass

    def feed(self, text: str) -> tuple[str, str]:
        return "", text

    def flush(self) -> tuple[str, str]:
        return "", ""


SPLITTERS = {"think": ThinkSplitter, "harmony": HarmonySplitter, "none": PlainSplitter}
# Until the family table (hybridinfer/archs) is merged: the reasoning format by GGUF architecture. Families whose
# templates write <think> (DeepSeek R1/V3.1, Qwen3, Qwen3-Next, GLM-4.5, MiniMax-M2, Kimi) keep the default, which
# only opens a thought on a leading <think>, so it is harmless for their non-thinking variants.
def reasoning_format(model) -> str:
    """"think" | "harmony" | "none" for a model (an inspect ModelInfo): its family's (archs/)."""
    from ..archs import family_of

    return family_of(model.arch).reasoning


def splitter_for(model):
    """The splitter class for a model's output (instantiate with starts_in_think)."""
    return SPLITTERS[reasoning_format(model)]


def split_with(kind: str, text: str, starts_in_think: bool = False) -> tuple[str | None, str]:
    """Whole-message form for any format: -> (reasoning or None, content)."""
    if kind == "think":
        return split_text(text, starts_in_think)
    sp = SPLITTERS[kind](starts_in_think)
    r1, c1 = sp.feed(text)
    r2, c2 = sp.flush()
    reasoning = r1 + r2
    return (reasoning or None), c1 + c2
