"""Token ids → text deltas for streaming: incremental detokenisation, the thinking split, stop strings.

- Incremental: byte-level BPE tokens may end in the middle of a UTF-8 character, so a delta is released only
  once the decoded window no longer ends in U+FFFD; decoding restarts from a recent offset each time, so the
  cost per token stays constant (the prefix/read-offset scheme vLLM and TGI use).
- Thinking: with thinking on, tokens before `</think>` are reasoning (`reasoning_content`), the rest the
  answer (`content`); the think tags themselves are special tokens and never appear in either.
- Stop strings: the answer is cut before the first stop string to complete; text that could still
  grow into one is held back from the stream until it cannot. Each stop string is matched by a KMP
  automaton fed the answer one character at a time, so the work per generated character is amortised
  O(1) per stop string and the hold-back is the automaton's state (the longest stop prefix the text
  ends in): linear in the text and the stop strings, where the former `buf.endswith(s[:k])` for
  every k was quadratic in the stop's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Stream:
    """Incremental decoder of one token stream."""

    decode: object
    ids: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        now = self.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.decode(self.ids[self.prefix : self.read])
        now = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :] if len(now) > len(before) else ""


class StopMatcher:
    """Streaming KMP search for one stop string: `feed(ch)` returns True when the string has just
    completed; `state` is the length of the longest prefix of the stop string the text fed so far
    ends in."""

    def __init__(self, stop: str):
        if not stop:
            raise ValueError("a stop string must not be empty")
        self.stop = stop
        fail = [0] * len(stop)  # fail[i]: longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            fail[i] = k
        self.fail = fail
        self.state = 0

    def feed(self, ch: str) -> bool:
        stop, k = self.stop, self.state
        if k == len(stop):
            k = self.fail[k - 1]
        while k and ch != stop[k]:
            k = self.fail[k - 1]
        if ch == stop[k]:
            k += 1
        self.state = k
        return k == len(stop)


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    stopped: bool = False  # a stop string was hit: generation should end with finish_reason "stop"


class TextAssembler:
    """Assemble one choice's text from its tokens. `push` returns the delta to stream; `finish` the rest."""

    def __init__(self, tokenizer, thinking: bool, stop: list[str] | None = None):
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        self.end_think_id = tokenizer.end_think_id
        self.think_id = tokenizer.think_id
        self.thinking = thinking
        self.in_reasoning = thinking
        self.reasoning_stream = _Stream(decode)
        self.content_stream = _Stream(decode)
        self.stop = stop or []
        self._matchers = [StopMatcher(s) for s in self.stop]
        self.content = ""  # everything accepted so far (after stop-string trimming)
        self.reasoning = ""
        self._pending = ""  # answer text held back because it may begin a stop string
        self._lead = (
            True  # strip the whitespace that follows </think> (and leads a reasoning block)
        )
        self._rlead = True
        self.stopped = False

    def push(self, token: int) -> Delta:
        if self.stopped:
            return Delta(stopped=True)
        if self.in_reasoning:
            if token == self.end_think_id:
                self.in_reasoning = False
                tail = self.reasoning_stream.flush()
                return Delta(reasoning=self._take_reasoning(tail, final=True))
            if token == self.think_id:
                return Delta()
            return Delta(reasoning=self._take_reasoning(self.reasoning_stream.push(token)))
        return self._take_content(self.content_stream.push(token))

    def finish(self) -> Delta:
        """Flush what is held back at the end of generation."""
        if self.stopped:
            return Delta(stopped=True)
        if self.in_reasoning:
            return Delta(reasoning=self._take_reasoning(self.reasoning_stream.flush(), final=True))
        d = self._take_content(self.content_stream.flush())
        rest = self._pending
        self._pending = ""
        self.content += rest
        return Delta(content=d.content + rest, stopped=d.stopped)

    def _take_reasoning(self, text: str, final: bool = False) -> str:
        if self._rlead:
            text = text.lstrip()
            self._rlead = not text
        if final:
            # the newline before </think> belongs to the format, not the reasoning
            full = (self.reasoning + text).rstrip()
            text = full[len(self.reasoning) :] if len(full) >= len(self.reasoning) else ""
        self.reasoning += text
        return text

    def _take_content(self, text: str) -> Delta:
        if self._lead:
            text = text.lstrip() if self.thinking else text
            self._lead = not text
        buf = self._pending + text
        if not self._matchers:
            self.content += buf
            self._pending = ""
            return Delta(content=buf)
        base = len(self._pending)  # the matchers have seen the pending text: feed only the new
        for j, ch in enumerate(text):
            for m in self._matchers:
                if m.feed(ch):  # the stop string ends at buf[base + j]: cut before its start
                    buf = buf[: base + j + 1 - len(m.stop)]
                    self.stopped = True
                    self._pending = ""
                    self.content += buf
                    return Delta(content=buf, stopped=True)
        hold = max(m.state for m in self._matchers)  # <= len(buf): what may still become a stop
        out, self._pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.content += out
        return Delta(content=out)
