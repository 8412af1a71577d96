"""Row formats, each turned into a `Conversation`; every problem names the row and the field.

| format            | a row looks like                                                        |
|-------------------|-------------------------------------------------------------------------|
| messages          | {"messages": [{"role": "user", "content": "..."}, ...]} (OpenAI)       |
| sharegpt          | {"conversations": [{"from": "human", "value": "..."}, ...]}            |
| alpaca            | {"instruction": "...", "input": "...", "output": "...", "system"?}      |
| prompt_completion | {"prompt": "...", "completion": "..."} (strings or message lists, TRL)  |
| turns             | {"turns": ["hi", "hello", ...]} alternating user/assistant (chatterbot) |
| dailydialog       | {"dialog": ["hi", ...], "act": [2, ...], "emotion": [0, ...]} (daily_dialog on the hub) |
| personachat       | {"personality": [...], "utterances": [{"candidates": [...], "history": [...]}, ...]}     |
|                   | or one row per turn: {"personality", "candidates", "history", "conv_id", ...}           |
| multiwoz          | {"dialogue_id", "services", "turns": {"speaker": [0, 1, ...], "utterance": [...]}}      |
|                   | (multi_woz_v22; `turns` may also be a list of {speaker, utterance}) or MultiWOZ 2.0/2.1's |
|                   | data.json dialogue {"goal": {...}, "log": [{"text", "metadata"}, ...]}                   |
| preference        | {"prompt" or "messages", "chosen", "rejected"}: one prompt, two replies (strings or       |
|                   | assistant messages); TRL's implicit-prompt rows and Anthropic HH's full conversations    |
|                   | ({"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}), UltraFeedback's sides |
|                   | that repeat the prompt                                                                  |

The three dialogue datasets are published as speaker turns, not roles: a recipe's `roles` says which
speaker is the assistant, and what the rows carry besides turns (MultiWOZ's domains, DailyDialog's act
and emotion labels) is kept in `Conversation.meta`.

A preference row becomes the conversation prompt + chosen reply (so SFT on it trains the chosen reply, and the
prompt's own assistant turns are never trained), with the rejected reply in `meta["rejected"]`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import DataError, Where
from ..recipe import Source
from .conversation import ROLES, Conversation, Message

# Formats whose rows are two speakers taking turns: `roles` maps the first and second speaker.
TWO_SPEAKERS = ("turns", "dailydialog", "multiwoz")
# Formats whose conversations carry domains, so `data.train[].domains` can select them.
WITH_DOMAINS = ("multiwoz",)
_DEFAULTS = Source(path="")

# daily_dialog's ClassLabel names (dataset card), for rows whose labels are the integer ids.
DAILYDIALOG_ACTS = ("__dummy__", "inform", "question", "directive", "commissive")
DAILYDIALOG_EMOTIONS = ("no emotion", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
# MultiWOZ 2.0/2.1 goals have one key per domain (empty when unused) besides `message` and `topic`.
MULTIWOZ_DOMAINS = ("attraction", "hospital", "hotel", "police", "restaurant", "taxi", "train")
MULTIWOZ_SPEAKERS = ("USER", "SYSTEM")  # multi_woz_v22's ClassLabel order
# ConvAI2 writes this where the persona's owner speaks first: the partner said nothing.
PERSONACHAT_SILENCE = "__ SILENCE __"

_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
}


def detect(row: Any, where: Where) -> str:
    """The format of one row, from the keys it has."""
    if isinstance(row, dict):
        if "chosen" in row and "rejected" in row:  # before messages: a preference row may hold its prompt there
            return "preference"
        if "messages" in row:
            return "messages"
        if "conversations" in row:
            return "sharegpt"
        if "instruction" in row and "output" in row:
            return "alpaca"
        if "prompt" in row and "completion" in row:
            return "prompt_completion"
        if "personality" in row and ("utterances" in row or "candidates" in row):
            return "personachat"
        if ("dialogue_id" in row and "services" in row and "turns" in row) or ("goal" in row and "log" in row):
            return "multiwoz"
        if "turns" in row:
            return "turns"
        if "dialog" in row:
            return "dailydialog"
        keys = ", ".join(sorted(map(str, row))[:8]) or "none"
        raise DataError(
            f"cannot tell the format: no messages, conversations, instruction/output or prompt/completion, "
            f"nor DailyDialog's dialog, PersonaChat's personality or MultiWOZ's log or turns (keys: {keys})", where)
    raise DataError(f"a row must be a JSON object, got {type(row).__name__}", where)


def to_conversation(row: Any, fmt: str, where: Where, source: Source | None = None) -> Conversation:
    """Convert and lint one row; raise DataError naming the field for anything unusable.

    `source` carries the per-source options some formats read (`roles`, `persona`).
    """
    if not isinstance(row, dict):
        raise DataError(f"a row must be a JSON object, got {type(row).__name__}", where)
    converted = _CONVERTERS[fmt](row, where, source or _DEFAULTS)
    messages, meta = converted if isinstance(converted, tuple) else (converted, {})
    _lint(messages, where)
    return Conversation(tuple(messages), where, meta)


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


def _from_messages(row: dict, where: Where, source: Source = _DEFAULTS) -> list[Message]:
    return _turn_list(row, where, "messages", "role", "content", {r: r for r in ROLES}, ", ".join(ROLES))


def _from_sharegpt(row: dict, where: Where, source: Source = _DEFAULTS) -> list[Message]:
    return _turn_list(row, where, "conversations", "from", "value", _SHAREGPT_ROLES, "human, gpt, system")


def _from_alpaca(row: dict, where: Where, source: Source = _DEFAULTS) -> list[Message]:
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


def _from_prompt_completion(row: dict, where: Where, source: Source = _DEFAULTS) -> list[Message]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        # TRL's conversational prompt-completion: two message lists, trained only on the completion.
        return _from_messages({"messages": prompt + completion}, where)
    return [Message("user", _text(prompt, where, "prompt")),
            Message("assistant", _text(completion, where, "completion"))]


def _from_turns(row: dict, where: Where, source: Source = _DEFAULTS) -> list[Message]:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise DataError("turns must be a non-empty list of strings", _field(where, "turns"))
    roles = source.roles or ("user", "assistant")
    messages = [Message(roles[i % 2], _text(t, where, f"turns[{i}]")) for i, t in enumerate(turns)]
    return _without_unanswered(messages)


def _without_unanswered(messages: list[Message]) -> list[Message]:
    # An odd count ends on a user line that nothing answers: it would only cost tokens.
    return messages[:-1] if len(messages) > 2 and messages[-1].role == "user" else messages


def _speaker_turns(turns: list[tuple[int, Any, str]], roles: tuple[str, str], where: Where) -> list[Message]:
    """(speaker 0 or 1, text, field) in dialogue order -> messages.

    Published dialogue corpora hold empty utterances (a speaker who said nothing, ConvAI2's silence
    marker): those are left out, and a speaker's turns that then follow each other are joined with a
    newline, so roles still alternate as templates expect. Text is stripped (DailyDialog pads every
    utterance with spaces).
    """
    messages: list[Message] = []
    for speaker, text, name in turns:
        if not isinstance(text, str):
            raise DataError(f"an utterance must be a string, got {type(text).__name__}", _field(where, name))
        text = text.strip()
        if not text or text == PERSONACHAT_SILENCE:
            continue
        role = roles[speaker]
        if messages and messages[-1].role == role:
            messages[-1] = Message(role, f"{messages[-1].content}\n{text}")
        else:
            messages.append(Message(role, text))
    return _without_unanswered(messages)


def _string_list(row: dict, key: str, where: Where, name: str | None = None) -> list:
    value = row.get(key)
    if not isinstance(value, list) or not value:
        raise DataError(f"{key} must be a non-empty list", _field(where, name or key))
    return value


def _labels(row: dict, key: str, names: tuple[str, ...], count: int, where: Where) -> list[str] | None:
    """Per-utterance class labels as names (the hub's parquet rows hold the ClassLabel ids)."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != count:
        raise DataError(f"{key} must hold one label per utterance ({count})", _field(where, key))
    out = []
    for i, label in enumerate(value):
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
            out.append(names[label])
        elif isinstance(label, str) and label in names:
            out.append(label)
        else:
            raise DataError(f"unknown label {label!r} (use 0-{len(names) - 1} or one of {', '.join(names)})",
                            _field(where, f"{key}[{i}]"))
    return out


def _from_dailydialog(row: dict, where: Where, source: Source) -> tuple[list[Message], dict]:
    dialog = _string_list(row, "dialog", where)
    roles = source.roles or ("user", "assistant")
    messages = _speaker_turns([(i % 2, u, f"dialog[{i}]") for i, u in enumerate(dialog)], roles, where)
    meta = {key: labels for key, names in (("act", DAILYDIALOG_ACTS), ("emotion", DAILYDIALOG_EMOTIONS))
            if (labels := _labels(row, key, names, len(dialog), where)) is not None}
    return messages, meta


def _from_personachat(row: dict, where: Where, source: Source) -> tuple[list[Message], dict]:
    """Persona sentences -> system message; the dialogue so far + the gold reply -> turns.

    In both published shapes the gold reply is the LAST candidate (the others are distractors for
    ranking and never become turns). The ParlAI/HF shape has one row per dialogue whose last
    `utterances` entry holds the whole history; the per-turn shape (bavard/personachat_truecased)
    holds one turn per row, folded into its dialogue's last row by `fold_dialogues`.
    """
    persona = _string_list(row, "personality", where)
    if "utterances" in row:
        utterances = _string_list(row, "utterances", where)
        name = f"utterances[{len(utterances) - 1}]"
        last = utterances[-1]
        if not isinstance(last, dict):
            raise DataError("each utterance must be an object with candidates and history", _field(where, name))
        history, candidates, prefix = last.get("history"), last.get("candidates"), f"{name}."
    else:
        history, candidates, prefix = row.get("history"), row.get("candidates"), ""
    if not isinstance(history, list):
        raise DataError("history must be a list of utterances", _field(where, f"{prefix}history"))
    if not isinstance(candidates, list) or not candidates:
        raise DataError("candidates must be a non-empty list (the last is the gold reply)",
                        _field(where, f"{prefix}candidates"))
    turns = [*((u, f"{prefix}history[{i}]") for i, u in enumerate(history)),
             (candidates[-1], f"{prefix}candidates[{len(candidates) - 1}]")]
    # The gold reply is the persona's owner (assistant); speakers alternate backwards from it.
    speakers = [(1 if (len(turns) - 1 - i) % 2 == 0 else 0, text, name) for i, (text, name) in enumerate(turns)]
    messages = _speaker_turns(speakers, ("user", "assistant"), where)
    if source.persona is not False:
        sentences = []
        for i, sentence in enumerate(persona):
            if not isinstance(sentence, str):
                raise DataError("persona sentences must be strings", _field(where, f"personality[{i}]"))
            if sentence.strip():
                sentences.append(sentence.strip())
        if sentences:
            messages.insert(0, Message("system", source.persona.replace("{persona}", "\n".join(sentences))))
    meta = {"dialogue_id": row["conv_id"]} if "conv_id" in row and "utterances" not in row else {}
    return messages, meta


def _from_multiwoz(row: dict, where: Where, source: Source) -> tuple[list[Message], dict]:
    roles = source.roles or ("user", "assistant")
    if "log" in row:  # MultiWOZ 2.0/2.1 data.json: the log alternates user and system, user first
        log = _string_list(row, "log", where)
        turns = []
        for i, entry in enumerate(log):
            if not isinstance(entry, dict):
                raise DataError("each log entry must be an object with text", _field(where, f"log[{i}]"))
            turns.append((i % 2, entry.get("text"), f"log[{i}].text"))
        goal = row.get("goal") if isinstance(row.get("goal"), dict) else {}
        domains = [d for d in MULTIWOZ_DOMAINS if goal.get(d)]
    else:  # MultiWOZ 2.2: the release's list of turn objects, or the hub's columns (dict of lists)
        raw = row.get("turns")
        if isinstance(raw, dict):
            speakers, texts = raw.get("speaker"), raw.get("utterance")
            if not isinstance(speakers, list) or not isinstance(texts, list) or len(speakers) != len(texts):
                raise DataError("turns must hold speaker and utterance lists of equal length", _field(where, "turns"))
            raw = [{"speaker": s, "utterance": u} for s, u in zip(speakers, texts)]
        if not isinstance(raw, list) or not raw:
            raise DataError("turns must be a non-empty list of {speaker, utterance}", _field(where, "turns"))
        turns = []
        for i, turn in enumerate(raw):
            speaker = turn.get("speaker") if isinstance(turn, dict) else None
            index = MULTIWOZ_SPEAKERS.index(speaker) if speaker in MULTIWOZ_SPEAKERS else \
                speaker if speaker in (0, 1) and not isinstance(speaker, bool) else None
            if index is None:
                raise DataError(f"unknown speaker {speaker!r} (use USER or SYSTEM, or 0 or 1)",
                                _field(where, f"turns[{i}].speaker"))
            turns.append((index, turn.get("utterance"), f"turns[{i}].utterance"))
        services = row.get("services")
        if not isinstance(services, list) or not all(isinstance(d, str) for d in services):
            raise DataError("services must be a list of domain names", _field(where, "services"))
        domains = services
    meta: dict[str, Any] = {"domains": tuple(dict.fromkeys(d.lower() for d in domains))}
    if row.get("dialogue_id") is not None:
        meta["dialogue_id"] = row["dialogue_id"]
    return _speaker_turns(turns, roles, where), meta


# Anthropic HH-RLHF writes each side as one string of turns: "\n\nHuman: ...\n\nAssistant: ...".
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _from_preference(row: dict, where: Where, source: Source = _DEFAULTS) -> tuple[list[Message], dict]:
    """One prompt and two replies -> prompt + chosen, with the rejected reply in meta["rejected"].

    The prompt is the row's `prompt` (a string or messages) or `messages`; without either (TRL's implicit-prompt
    shape, Anthropic HH) each side is a whole conversation whose last turn is the reply and whose earlier turns
    must be the same on both sides. A side that repeats the prompt before its reply (UltraFeedback-binarized)
    must repeat it exactly.
    """
    key = "prompt" if "prompt" in row else "messages" if "messages" in row else None
    prompt = None if key is None else _preference_prompt(row[key], where, key)
    replies, prompts = {}, {}
    for side in ("chosen", "rejected"):
        turns = _preference_side(row.get(side), where, side, hh=prompt is None)
        if prompt is not None and turns[:-1] and turns[:-1] != prompt:
            raise DataError(f"{side} repeats a prompt that differs from {key}", _field(where, side))
        if prompt is None and len(turns) < 2:
            raise DataError("a side without a prompt field must be the whole conversation (prompt turns, then "
                            "the reply)", _field(where, side))
        if turns[-1].role != "assistant":
            raise DataError("must end with the assistant's reply", _field(where, side))
        prompts[side], replies[side] = turns[:-1], turns[-1]
    if prompt is None:
        if prompts["chosen"] != prompts["rejected"]:
            turn = next((i for i, (a, b) in enumerate(zip(prompts["chosen"], prompts["rejected"])) if a != b),
                        min(len(prompts["chosen"]), len(prompts["rejected"])))
            raise DataError(f"chosen and rejected have different prompts (they differ at turn {turn})",
                            _field(where, "rejected"))
        prompt = prompts["chosen"]
    if replies["chosen"].content.strip() == replies["rejected"].content.strip():
        raise DataError("chosen and rejected are the same reply: the pair teaches nothing", _field(where, "rejected"))
    if prompt[-1].role != "user":
        raise DataError("the prompt must end with a user turn", _field(where, key or "chosen"))
    # Only the reply is trained: the prompt's earlier assistant turns are context.
    context = [Message(m.role, m.content, False) if m.role == "assistant" else m for m in prompt]
    return [*context, replies["chosen"]], {"rejected": replies["rejected"]}


def _preference_prompt(value: Any, where: Where, key: str) -> list[Message]:
    if isinstance(value, str):
        return [Message("user", _text(value, where, key))]
    return _from_messages({"messages": value}, where) if isinstance(value, list) else \
        _from_messages({"messages": [value]}, where)


def _preference_side(value: Any, where: Where, side: str, hh: bool) -> list[Message]:
    """A side's turns: a reply string, HH's conversation string, one message or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError("the reply is empty", _field(where, side))
        if hh and _HH_TURN.search("\n\n" + value.lstrip("\n")):
            parts = _HH_TURN.split("\n\n" + value.lstrip("\n"))[1:]  # speaker, text, speaker, text, ...
            turns = [Message("user" if who == "Human" else "assistant", text.strip())
                     for who, text in zip(parts[::2], parts[1::2])]
            if not turns or not turns[-1].content:
                raise DataError("the reply is empty", _field(where, side))
            return turns
        return [Message("assistant", value)]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError("must be a reply string or a non-empty list of messages", _field(where, side))
    try:
        return _from_messages({"messages": value}, where)
    except DataError as err:  # name the side, not a `messages` field the row does not have
        field = (err.where.field or "").replace("messages", side, 1)
        reason = "the reply is empty" if err.reason == "content is empty" else err.reason
        raise DataError(reason, _field(where, field)) from None


def fold_dialogues(conversations: list[Conversation]) -> tuple[list[Conversation], int]:
    """Keep only the longest row of each dialogue that was published one row per turn (PersonaChat's
    per-turn shape): every earlier row is a prefix of it. So no reply is trained twice and no dialogue
    sits on both sides of the eval split. Returns the kept conversations and how many were folded."""
    longest: dict[Any, int] = {}
    for i, c in enumerate(conversations):
        key = c.meta.get("dialogue_id")
        if key is not None and (key not in longest or len(c.messages) >= len(conversations[longest[key]].messages)):
            longest[key] = i
    kept = [c for i, c in enumerate(conversations)
            if c.meta.get("dialogue_id") is None or longest[c.meta["dialogue_id"]] == i]
    return kept, len(conversations) - len(kept)


_CONVERTERS: dict[str, Callable[[dict, Where, Source], list[Message] | tuple[list[Message], dict]]] = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion, "turns": _from_turns, "dailydialog": _from_dailydialog,
    "personachat": _from_personachat, "multiwoz": _from_multiwoz, "preference": _from_preference,
}


def _lint(messages: list[Message], where: Where) -> None:
    if not any(m.role == "assistant" for m in messages):
        raise DataError("no assistant turn: nothing to train on", where)
    for i, m in enumerate(messages[1:], 1):
        if m.role == "system":
            raise DataError("a system message may only come first", _field(where, f"messages[{i}].role"))
