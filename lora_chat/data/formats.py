"""Row formats, each turned into a `Conversation`; every problem names the row and the field.

| format            | a row looks like                                                        |
|-------------------|-------------------------------------------------------------------------|
| messages          | {"messages": [{"role": "user", "content": "..."}, ...]} (OpenAI)       |
| sharegpt          | {"conversations": [{"from": "human", "value": "..."}, ...]}            |
| alpaca            | {"instruction": "...", "input": "...", "output": "...", "system"?}      |
| prompt_completion | {"prompt": "...", "completion": "..."} (strings or message lists, TRL)  |
| turns             | {"turns": ["hi", "hello", ...]} alternating user/assistant (chatterbot) |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import DataError, Where
from .conversation import ROLES, Conversation, Message

_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
}


def detect(row: Any, where: Where) -> str:
    """The format of one row, from the keys it has."""
    if isinstance(row, dict):
        if "messages" in row:
            return "messages"
        if "conversations" in row:
            return "sharegpt"
        if "instruction" in row and "output" in row:
            return "alpaca"
        if "prompt" in row and "completion" in row:
            return "prompt_completion"
        if "turns" in row:
            return "turns"
        keys = ", ".join(sorted(map(str, row))[:8]) or "none"
        raise DataError(
            f"cannot tell the format: no messages, conversations, instruction/output or prompt/completion "
            f"(keys: {keys})", where)
    raise DataError(f"a row must be a JSON object, got {type(row).__name__}", where)


def to_conversation(row: Any, fmt: str, where: Where) -> Conversation:
    """Convert and lint one row; raise DataError naming the field for anything unusable."""
    if not isinstance(row, dict):
        raise DataError(f"a row must be a JSON object, got {type(row).__name__}", where)
    messages = _CONVERTERS[fmt](row, where)
    _lint(messages, where)
    return Conversation(tuple(messages), where)


def _field(where: Where, name: str) -> Where:
    return Where(where.file, where.line, name)


def _text(value: Any, where: Where, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"content must be a string, got {type(value).__name__}", _field(where, name))
    if not value.strip():
        raise DataError("content is empty", _field(where, name))
    return value


def _turn_list(row: dict, where: Where, key: str, role_key: str, content_key: str,
               roles: dict[str, str], known: str) -> list[Message]:
    """A list of role/content objects (`messages` or ShareGPT `conversations`), checked item by item."""
    items = row.get(key)
    if not isinstance(items, list) or not items:
        raise DataError(f"{key} must be a non-empty list", _field(where, key))
    messages = []
    for i, item in enumerate(items):
        name = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"each item must be an object with {role_key} and {content_key}", _field(where, name))
        sender = item.get(role_key)
        role = roles.get(sender.lower() if isinstance(sender, str) else None)
        if role is None:
            raise DataError(f"unknown role {sender!r} (use one of {known})", _field(where, f"{name}.{role_key}"))
        train = item.get("train")
        if train is not None and not isinstance(train, bool):
            raise DataError("train must be true or false", _field(where, f"{name}.train"))
        messages.append(Message(role, _text(item.get(content_key), where, f"{name}.{content_key}"), train))
    return messages


def _from_messages(row: dict, where: Where) -> list[Message]:
    return _turn_list(row, where, "messages", "role", "content", {r: r for r in ROLES}, ", ".join(ROLES))


def _from_sharegpt(row: dict, where: Where) -> list[Message]:
    return _turn_list(row, where, "conversations", "from", "value", _SHAREGPT_ROLES, "human, gpt, system")


def _from_alpaca(row: dict, where: Where) -> list[Message]:
    instruction = _text(row.get("instruction"), where, "instruction")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"input must be a string, got {type(extra).__name__}", _field(where, "input"))
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = []
    if row.get("system"):
        messages.append(Message("system", _text(row["system"], where, "system")))
    messages += [Message("user", prompt), Message("assistant", _text(row.get("output"), where, "output"))]
    return messages


def _from_prompt_completion(row: dict, where: Where) -> list[Message]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        # TRL's conversational prompt-completion: two message lists, trained only on the completion.
        return _from_messages({"messages": prompt + completion}, where)
    return [Message("user", _text(prompt, where, "prompt")),
            Message("assistant", _text(completion, where, "completion"))]


def _from_turns(row: dict, where: Where) -> list[Message]:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise DataError("turns must be a non-empty list of strings", _field(where, "turns"))
    messages = [Message("user" if i % 2 == 0 else "assistant", _text(t, where, f"turns[{i}]"))
                for i, t in enumerate(turns)]
    # An odd count ends on a user line that nothing answers: it would only cost tokens.
    return messages[:-1] if len(messages) > 2 and messages[-1].role == "user" else messages


_CONVERTERS: dict[str, Callable[[dict, Where], list[Message]]] = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion, "turns": _from_turns,
}


def _lint(messages: list[Message], where: Where) -> None:
    if not any(m.role == "assistant" for m in messages):
        raise DataError("no assistant turn: nothing to train on", where)
    for i, m in enumerate(messages[1:], 1):
        if m.role == "system":
            raise DataError("a system message may only come first", _field(where, f"messages[{i}].role"))
