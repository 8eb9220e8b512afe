"""Stop strings found in time linear in the new text, however many and however long.

An Aho-Corasick automaton over the stop strings is built once per set of strings; each
row keeps one state, advanced by every new character. The state's depth is the length
of the longest tail of the text that is still the start of some stop string: exactly
the text a stream must hold back, because the next characters may complete a stop.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache


class StopAutomaton:
    """The automaton for one tuple of stop strings (shared by every row that uses it)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]
        self.fail = [0]
        self.match = [0]  # length of the longest stop string ending at this state, or 0
        for s in stops:
            state = 0
            for ch in s:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[state][ch] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.fail.append(0)
                    self.match.append(0)
                state = nxt
            self.match[state] = max(self.match[state], len(s))
        # Breadth first, so a state's failure link (a shorter state) is final before it.
        todo = deque(self.goto[0].values())
        while todo:
            state = todo.popleft()
            for ch, nxt in self.goto[state].items():
                f = self.fail[state]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                link = self.goto[f].get(ch, 0)
                self.fail[nxt] = link if link != nxt else 0
                # A stop that ends inside a longer candidate ends here too; the longest one
                # starts first, and the text is cut before it.
                self.match[nxt] = max(self.match[nxt], self.match[self.fail[nxt]])
                todo.append(nxt)

    def step(self, state: int, ch: str) -> int:
        goto, fail = self.goto, self.fail
        while state and ch not in goto[state]:
            state = fail[state]
        return goto[state].get(ch, 0)

    def feed(self, state: int, text: str, check: bool = True) -> tuple[int, int]:
        """Advance over ``text``: (new state, index just past the first stop string that
        ends in ``text``, or 0). On a match the state returned is the one at the match.
        ``check=False`` follows the text without looking for matches."""
        match = self.match
        for i, ch in enumerate(text):
            state = self.step(state, ch)
            if check and match[state]:
                return state, i + 1
        return state, 0


@lru_cache(maxsize=256)
def automaton(stops: tuple[str, ...]) -> StopAutomaton:
    """Built once per distinct set of stop strings (requests often repeat theirs)."""
    return StopAutomaton(stops)


class StopText:
    """A row's generated text with its stop strings: text that can no longer be part of a
    stop is committed in pieces (no string grows by copying), the rest is pending."""

    __slots__ = ("_auto", "_joined", "_parts", "_pending", "_sent", "_state")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._auto = automaton(stops) if stops else None
        self._state = 0
        self._parts: list[str] = []
        self._pending = ""
        self._sent = 0  # parts already handed to a streaming caller
        self._joined: str | None = ""

    def add(self, piece: str, check: bool = True) -> bool:
        """Append decoded text; True when it completed a stop string (the text then ends
        before it). ``check=False`` (before min_tokens) appends without stopping."""
        self._joined = None
        auto = self._auto
        if auto is None:
            self._parts.append(piece)
            return False
        pending = self._pending + piece
        state, end = auto.feed(self._state, piece, check)
        if end:
            # The automaton's state is a tail of the text no longer than what is pending,
            # so the stop starts inside ``pending``.
            cut = len(pending) - len(piece) + end - auto.match[state]
            assert cut >= 0
            self._pending = pending[:cut]
            return True
        self._state = state
        hold = auto.depth[state]
        if len(pending) > hold:
            self._parts.append(pending[:len(pending) - hold])
            pending = pending[len(pending) - hold:]
        self._pending = pending
        return False

    @property
    def text(self) -> str:
        """The whole text (joined on demand: read it when the row is done)."""
        if self._joined is None:
            self._joined = "".join(self._parts) + self._pending
        return self._joined

    def take_new(self, done: bool) -> str:
        """Text not handed out yet that is safe to show: committed text, and the pending
        tail too once the row is done (it can no longer become a stop)."""
        if done and self._pending:
            self._parts.append(self._pending)
            self._pending = ""
        out = "".join(self._parts[self._sent:])
        self._sent = len(self._parts)
        return out
