"""Split R1-style output into reasoning and answer, incrementally: `<think>…</think>` text is reasoning.

Works on stream chunks of any size (a tag may arrive split across chunks), on output that starts inside the
thought (R1's template opens `<think>` in the prompt), and on output cut off before `</think>`.
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
