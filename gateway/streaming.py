"""Token ids → the text a client sees: incremental detokenization and stop strings.

A stop string may arrive split over several tokens, so text that could be the start of one is
held back until the next tokens show whether it is::

    emitted so far | safe to emit | held: a suffix that is a prefix of some stop string |

When a stop string appears, the text before it is the last to go out and the request ends with
``finish_reason = "stop"`` (the stop string itself is never shown, as in OpenAI's API).
Torch-free.
"""

from __future__ import annotations

from engine.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["TextStream"]


class TextStream:
    """One request's output text. Not thread-safe; one per request."""

    __slots__ = ("_detokenizer", "_held", "_stop", "is_stopped")

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.is_stopped = False  # a stop string was seen: emit nothing more

    def push(self, token_ids: list[int]) -> str:
        """The text the new tokens make safe to show (often ``""``)."""
        if self.is_stopped:
            return ""
        text = "".join(self._detokenizer.push(token_id) for token_id in token_ids)
        if not self._stop:
            return text
        return self._release(self._held + text)

    def finish(self) -> str:
        """End of the stream: whatever was held back (nothing after a stop string)."""
        if self.is_stopped:
            return ""
        text = self._held + self._detokenizer.flush()
        self._held = ""
        if not self._stop:
            return text
        cut = self._find_stop(text)
        if cut is not None:
            self.is_stopped = True
            return text[:cut]
        return text

    def _release(self, text: str) -> str:
        cut = self._find_stop(text)
        if cut is not None:
            self.is_stopped = True
            self._held = ""
            return text[:cut]
        keep = self._partial_stop_length(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _find_stop(self, text: str) -> int | None:
        """Where the earliest stop string begins in ``text``, if any does."""
        found = [index for stop in self._stop if (index := text.find(stop)) >= 0]
        return min(found) if found else None

    def _partial_stop_length(self, text: str) -> int:
        """The length of the longest suffix of ``text`` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
