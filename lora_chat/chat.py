"""`lorachat chat`: talk to the base and its adapters in a terminal, replies streamed as they are decoded.

    lorachat chat adapters/faq-en adapters/faq-sv          # REPL; /help lists the commands
    lorachat chat adapters/faq-en --prompt "How long does a permit take?"   # one reply on stdout, exit 0

One `ChatSession` holds the conversation (a transcript every model renders with its own template, so
switching adapters mid-conversation keeps the history), the model answering, the system prompt and
whether routing picks the model per message. The REPL feeds it lines; tests feed it lines too.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .errors import LorachatError
from .runtime import BASE, Request, Sampling, generate, stream
from .runtime.router import Router

HELP = """\
/adapters          list the base and the adapters (the one answering is marked *)
/adapter NAME      answer with this adapter from now on
/base              answer with the base model
/compare           the last message again, through the base and every adapter, side by side
/route on|off      pick the adapter for each message by its language and domain
/system TEXT       set the system prompt (/system alone clears it)
/reset             forget the conversation
/help              this list
/quit              leave (or Ctrl-D)"""


@dataclass
class ChatSession:
    """The conversation and the settings a REPL changes with its commands."""

    rt: Any  # runtime.AdapterSet
    model: str = BASE
    sampling: Sampling = field(default_factory=Sampling)
    route: bool = False
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    note: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
    _router: Router | None = None

    # ------------------------------------------------------------ the REPL's verbs

    def handle(self, line: str) -> bool:
        """One line typed by the user: a command or a message. False when the user asked to leave."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            command, _, arg = line[1:].partition(" ")
            if command in ("quit", "exit"):
                return False
            action = {"adapters": self._list, "adapter": self._use, "base": lambda _: self._use(BASE),
                      "compare": self._compare, "route": self.set_routing, "system": self._system,
                      "reset": self._reset, "help": lambda _: self.note(HELP)}.get(command)
            if action is None:
                self.note(f"unknown command /{command}; /help lists them")
                return True
        else:
            action, arg = self.ask, line
        try:
            action(arg.strip())
        except LorachatError as err:  # one line, and the chat goes on
            self.note(f"error: {err}")
        return True

    def ask(self, text: str) -> str:
        """Send `text` as the user's next message; the reply is streamed to `out` and kept in the history.

        A prompt the model cannot take (longer than its context, refused by its template) raises LorachatError.
        """
        model = self.model
        if self.route:
            decision = self.router().route(text)
            model = decision.adapter or BASE
            self.note(f"[{model}: {decision.reason}]")
        reply = self._stream(model, self.rt.render(model, self._messages(text)))
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply

    def router(self) -> Router:
        if self._router is None:
            self._router = Router.from_residents(self.rt.adapters)
            for note in self._router.notes:
                self.note(f"note: {note}")
        return self._router

    # ------------------------------------------------------------ commands

    def _list(self, _: str) -> None:
        for name in self.rt.names:
            r = self.rt.get(name)
            facts = ", ".join(f"{k} {v}" for k, v in (("language", r.language), ("domain", r.domain)) if v)
            mark = "*" if name == self.model and not self.route else " "
            self.note(f"{mark} {name}" + (f"  ({facts})" if facts else "") + (f"  {self.rt.base.model_id}"
                                                                                if name == BASE else ""))
        if self.route:
            self.note("routing is on: each message picks its adapter")

    def _use(self, name: str) -> None:
        if not name:
            raise LorachatError("/adapter needs a name; /adapters lists them")
        self.rt.get(name)  # one line naming what is loaded, when it is not
        self.model, self.route = name, False
        self.note(f"answering with {name}")

    def set_routing(self, arg: str) -> None:
        """`on` or `off`; on needs an adapter that declares its language."""
        if arg not in ("on", "off"):
            raise LorachatError("/route on or /route off")
        if arg == "on" and not self.router().targets:
            raise LorachatError("cannot route: no adapter declares a language (output.language in its recipe)")
        self.route = arg == "on"
        self.note(f"routing {arg}")

    def _system(self, text: str) -> None:
        self.system = text or None
        self.note("system prompt set" if text else "system prompt cleared")

    def _reset(self, _: str) -> None:
        self.history = []
        self.note("conversation cleared")

    def _compare(self, _: str) -> None:
        """The last user message (with the history before it) through every resident, in one mixed batch."""
        if not self.history:
            raise LorachatError("nothing to compare yet: send a message first")
        last = len(self.history) - 2  # the last exchange: [user, assistant]
        messages = self._messages(self.history[last]["content"], self.history[:last])
        names = self.rt.names
        done = generate(self.rt, [Request(n, self.rt.render(n, messages), self.sampling) for n in names])
        from rich.columns import Columns
        from rich.console import Console
        from rich.panel import Panel

        panels = [Panel(d.text.strip() or "(empty)", title=n, expand=True) for n, d in zip(names, done)]
        Console(file=self.out, highlight=False).print(Columns(panels, equal=True, expand=True))

    # ------------------------------------------------------------ internals

    def _messages(self, text: str, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *(self.history if history is None else history), {"role": "user", "content": text}]

    def _stream(self, model: str, prompt: str) -> str:
        parts = []
        # Closing the stream (Ctrl-C mid-reply) releases the runtime's lock at once.
        with contextlib.closing(stream(self.rt, [Request(model, prompt, self.sampling)])) as deltas:
            for delta in deltas:
                parts.append(delta.text)
                self.out.write(delta.text)
                self.out.flush()
        self.out.write("\n")
        self.out.flush()
        return "".join(parts)


def repl(session: ChatSession, lines: Callable[[], str]) -> None:
    """Read lines with `lines()` (EOFError ends) and hand them to the session until /quit."""
    while True:
        try:
            line = lines()
        except EOFError:
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as shells do
            session.note("")
            continue
        try:
            if not session.handle(line):
                return
        except KeyboardInterrupt:  # Ctrl-C during a reply stops the reply, not the chat
            session.note("\n[stopped]")
