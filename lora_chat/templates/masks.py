"""Assistant-only loss masks for ANY chat template, found by rendering, not by pattern matching.

Most real templates (Llama-3, Mistral, Gemma, Phi-3, Qwen2.5, Zephyr, Vicuna, ...) carry no
`{% generation %}` markers, so we ask the template itself what each reply adds:

    prompt_k = render(messages[:k], add_generation_prompt=True)   # ... "<|im_start|>assistant\n"
    upto_k   = render(messages[:k+1])                             # ... "<|im_start|>assistant\nHi<|im_end|>\n"

The characters `upto_k` adds past its common prefix with `prompt_k` are reply k plus the
end-of-turn marker the template writes after it (the model must learn to stop). The full
conversation is rendered once and tokenized once with offsets; a token is trained when its
characters overlap a trained span. This survives templates that trim content, insert BOS or
merge the system prompt into the first user turn, because every span is measured in the
template's own output.

It relies on `upto_k` being a prefix of the full rendering. Templates that render earlier
turns differently from the last one break that, in two ways, and each turn is then trained in
the form the FULL conversation gives it (what the model reads as history at inference):
  * the reply text is there, only the end differs (Phi-3 writes eos after the last turn alone):
    the reply is located after `prompt_k`, with the end-of-turn text both renderings share;
  * the template rewrites the turn (Qwen3 drops the reasoning of replies before the last user
    message): the turn inside the conversation is a tail of its last-turn form, so the longest
    run after `prompt_k` that ends the last-turn form is the turn. Such turns are counted
    (`Rendered.rewritten`) so `validate` can say what was trained instead of the data's text.
If neither fits, the sample is refused with a message naming it. Templates that do have
`{% generation %}` markers are used directly (one render, exact spans). `train_on: all` needs
no spans at all: the whole rendering is trained.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Any, Literal

from ..data.conversation import Conversation, Message
from ..errors import DataError, Where

TrainOn = Literal["assistant", "last_assistant", "all"]
IGNORE = -100
# A reply no template rewrites or drops: what a template writes after it is its end-of-turn text.
_PROBE = "lorachat-probe-reply"


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,) the input id where trained, IGNORE elsewhere; NOT shifted
    origin: Where
    # (first token, end token, role) of each message's content, for per-role stats (`validate`).
    role_tokens: tuple[tuple[int, int, str], ...] | None = None
    rewritten: int = 0  # assistant turns trained in the form the template rewrote them to

    @property
    def trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)  # list.count runs in C: validate asks for every sample

    @property
    def roles(self) -> dict[str, tuple[int, int]] | None:
        """role -> (tokens, trained tokens) of what is left; "template" is what the template writes around
        messages. Counted from the kept tokens, so a truncated sample counts only what survived the cut."""
        if self.role_tokens is None:
            return None
        return _count_roles(self.labels, self.role_tokens)

    def truncated(self, max_length: int) -> Encoded:
        """The first `max_length` tokens; per-role counts follow the cut."""
        return Encoded(self.input_ids[:max_length], self.labels[:max_length], self.origin, self.role_tokens,
                       self.rewritten)


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # character ranges [start, end) that carry loss
    roles: tuple[tuple[int, int, str], ...]  # (start, end, role) of each message's contribution, for stats
    rewritten: int = 0  # assistant turns trained as the conversation renders them, not as their own text


class ChatTemplate:
    """A chat template compiled once, able to render conversations and find their trained spans."""

    def __init__(self, source: str, tokenizer: Any, name: str, system: str | None = None):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.source = source
        self.name = name
        self.system = system
        self.tokenizer = tokenizer
        self._compiled = _compile_jinja_template(source)
        self._has_generation = "generation" in source and "endgeneration" in source
        # Templates read bos_token/eos_token as variables, as apply_chat_template passes them.
        self._kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}

    # ------------------------------------------------------------ rendering

    def messages_of(self, conversation: Conversation) -> list[dict[str, str]]:
        """The conversation as the template sees it, with the recipe's default system prompt added."""
        messages = conversation.as_dicts()
        if self.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **self._kwargs)

    def prompt(self, conversation: Conversation) -> str:
        """Everything before the last assistant reply, with the generation prompt: what eval asks the model."""
        messages = self.messages_of(conversation)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return self._render_or_refuse(messages[:last], True, conversation.origin)

    def render_spans(self, conversation: Conversation, train_on: TrainOn) -> Rendered:
        """Render a conversation and find the character spans that carry loss under `train_on`."""
        messages = self.messages_of(conversation)
        if train_on == "all":  # everything is trained: no reply needs locating
            text = self._render_or_refuse(messages, False, conversation.origin)
            return Rendered(text, ((0, len(text)),), self._role_spans(messages, text))
        offset = len(messages) - len(conversation.messages)  # 1 when a default system prompt was added
        flags = [None] * offset + [m.train for m in conversation.messages]
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        wanted = [i for i in assistant if flags[i] is not False]
        if train_on == "last_assistant":
            wanted = [i for i in wanted if i == assistant[-1]]

        rewritten = 0
        if self._has_generation:
            text, spans = self._render_marked(messages, conversation.origin)
            spans = [s for i, s in zip(assistant, spans) if i in wanted]
        else:
            text = self._render_or_refuse(messages, False, conversation.origin)
            spans = []
            for k in wanted:
                span, was_rewritten = self._reply_span(messages, k, text, conversation.origin)
                spans.append(span)
                rewritten += was_rewritten
        return Rendered(text, tuple(spans), self._role_spans(messages, text), rewritten)

    def _render_or_refuse(self, messages: list[dict], gen: bool, origin: Where) -> str:
        try:
            return self.render(messages, gen)
        except Exception as err:  # jinja's TemplateError from raise_exception, or a template bug
            roles = "/".join(m["role"] for m in messages)
            raise DataError(f"chat template '{self.name}' refused this conversation ({roles}): {err}",
                            origin) from None

    def _render_marked(self, messages: list[dict], origin: Where) -> tuple[str, list[tuple[int, int]]]:
        from transformers.utils.chat_template_utils import _render_with_assistant_indices

        try:
            text, indices = _render_with_assistant_indices(self._compiled, messages, None, None, False,
                                                           **self._kwargs)
        except Exception as err:
            raise DataError(f"chat template '{self.name}' refused this conversation: {err}", origin) from None
        return text, [tuple(i) for i in indices]

    def _reply_span(self, messages: list[dict], k: int, full: str, origin: Where) -> tuple[tuple[int, int], bool]:
        """The characters of reply k in `full` (reply + end-of-turn), and whether the template rewrote it."""
        prompt = self._render_or_refuse(messages[:k], True, origin)
        upto = full if k == len(messages) - 1 else self._render_or_refuse(messages[: k + 1], False, origin)
        if upto.startswith(prompt):
            start = len(prompt)
        else:
            # The prompt is rendered differently once a reply follows (Mistral v0.3 moves the system
            # prompt into the last user turn only while it is last): the reply starts at its own text.
            start = upto.rfind(messages[k]["content"].strip(), len(os.path.commonprefix([prompt, upto])))
            if start < 0:
                raise DataError(f"chat template '{self.name}' changes the prompt of message {k} (assistant) "
                                f"and its reply cannot be found in the rendering", origin)
        if full.startswith(upto):
            return (start, _trim_after_marker(upto, start, messages[k]["content"])), False
        if full.startswith(upto[:start]):
            # The template renders this turn differently inside the conversation than at its end. The
            # turn ends before the next assistant prompt, which the template renders consistently.
            limit = self._next_prompt_end(messages, k, full, origin)
            reply = messages[k]["content"].strip()
            found = full.find(reply, start, limit)
            if found >= 0:
                # The reply's own text is there; only the end differs. Keep the end-of-turn text the full
                # rendering shares with this turn's own rendering (Phi-3 writes "<|end|>\n</s>" at the
                # very end, "<|end|>\n<|user|>" mid-conversation).
                end = found + len(reply)
                tail = upto[upto.rfind(reply) + len(reply):] if reply in upto else ""
                end += self._shared_marker(tail, full[end:end + len(tail)])
                return (start, _trim_after_marker(full[:end], start, reply)), False
            end = _rewritten_turn_end(upto[start:], full, start, limit)
            if end is not None:
                # Rewritten in history (Qwen3 drops the reasoning of earlier replies): train the turn as
                # the conversation renders it, up to and including its end-of-turn text.
                marker = self._end_of_turn(messages[:k], origin)
                visible = full[start:end - len(marker)] if full[:end].endswith(marker) else full[start:end]
                return (start, _trim_after_marker(full[:end], start, visible)), True
        raise DataError(
            f"chat template '{self.name}' renders message {k} (assistant) differently inside the conversation "
            f"than at its end, so its reply cannot be located; use train_on: last_assistant or a template "
            f"with {{% generation %}} markers", origin)

    def _next_prompt_end(self, messages: list[dict], k: int, full: str, origin: Where) -> int:
        """Where the next assistant turn's prompt ends in `full`: reply k lies before it."""
        later = [i for i in range(k + 1, len(messages)) if messages[i]["role"] == "assistant"]
        if later:
            prompt = self._render_or_refuse(messages[:later[0]], True, origin)
            if full.startswith(prompt):
                return len(prompt)
        return len(full)

    def _end_of_turn(self, history: list[dict], origin: Where) -> str:
        """What the template writes after a plain reply that ends the conversation ("<|im_end|>\n")."""
        probe = self._render_or_refuse(history + [{"role": "assistant", "content": _PROBE}], False, origin)
        return probe[probe.rfind(_PROBE) + len(_PROBE):] if _PROBE in probe else ""

    def _shared_marker(self, tail: str, following: str) -> int:
        """Length of the end-of-turn text two renderings share, ending on a whole marker.

        A character-wise common prefix can stop inside the next marker ("<|end|>\n<|" of
        "<|end|>\n</s>" and "<|end|>\n<|user|>"), so back off to whitespace or a whole added token.
        """
        shared = os.path.commonprefix([tail, following])
        if shared == tail:
            return len(shared)
        markers = [t for t in self.tokenizer.get_added_vocab() if t]
        for cut in range(len(shared), 0, -1):
            head = shared[:cut]
            if head[-1].isspace() or any(head.endswith(m) for m in markers):
                return cut
        return 0

    @staticmethod
    def _role_spans(messages: list[dict], text: str) -> tuple[tuple[int, int, str], ...]:
        """Attribute each character range to the message whose content it holds (for per-role stats)."""
        out, cursor = [], 0
        for m in messages:
            found = text.find(m["content"].strip(), cursor)
            if found < 0:
                continue
            end = found + len(m["content"].strip())
            out.append((found, end, m["role"]))
            cursor = end
        return tuple(out)

    # ------------------------------------------------------------ tokenizing

    def render_batch(self, conversations: list[Conversation], train_on: TrainOn) -> list[Rendered | DataError]:
        """Render each conversation and find its spans; a refused one comes back as its DataError."""
        rendered: list[Rendered | DataError] = []
        for conversation in conversations:
            try:
                rendered.append(self.render_spans(conversation, train_on))
            except DataError as err:
                rendered.append(err)
        return rendered

    def tokenize_rendered(self, conversations: list[Conversation], rendered: list[Rendered | DataError],
                          role_stats: bool = False) -> list[Encoded | DataError]:
        """Tokenize rendered conversations in one batched call and mask them.

        `role_stats` also counts tokens and trained tokens per role (for `validate`).
        """
        ids_iter = iter(self._ids_and_offsets([r.text for r in rendered if isinstance(r, Rendered)]))
        out: list[Encoded | DataError] = []
        for conversation, r in zip(conversations, rendered):
            if isinstance(r, DataError):
                out.append(r)
                continue
            ids, offsets = next(ids_iter)
            labels = mask_labels(ids, offsets, r.spans)
            role_tokens = tuple((*_token_range(offsets, lo, hi), role) for lo, hi, role in r.roles) \
                if role_stats else None
            out.append(Encoded(list(ids), labels, conversation.origin, role_tokens, r.rewritten))
        return out

    def _ids_and_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Token ids and character offsets of each text, no special tokens added, in one batched call."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if (backend is not None and backend.truncation is None and backend.padding is None
                and backend.encode_special_tokens == getattr(self.tokenizer, "split_special_tokens", False)):
            # The Rust tokenizer in the state the tokenizer's own call would put it in (no truncation, no padding,
            # special tokens as tokens): the same ids and offsets without converting every encoding to a
            # BatchEncoding first, which cost a fifth of validate's time on short chats.
            return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
        batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                               return_attention_mask=False) if texts else {"input_ids": [], "offset_mapping": []}
        return list(zip(batch["input_ids"], batch["offset_mapping"]))

    def encode_batch(self, conversations: list[Conversation], train_on: TrainOn,
                     role_stats: bool = False) -> list[Encoded | DataError]:
        """Render, tokenize (one batched call) and mask; a refused conversation comes back as its DataError."""
        return self.tokenize_rendered(conversations, self.render_batch(conversations, train_on), role_stats)

    def encode(self, conversation: Conversation, train_on: TrainOn = "assistant") -> Encoded:
        result = self.encode_batch([conversation], train_on)[0]
        if isinstance(result, DataError):
            raise result
        return result


def _trim_after_marker(text: str, start: int, reply: str) -> int:
    """End of a reply span without the whitespace a template puts after its end-of-turn marker.

    "Hi<|im_end|>\n" trains "Hi<|im_end|>": the newline is layout the model never has to emit.
    When the whitespace IS the only end marker ("Assistant: Hi\n"), it is kept.
    """
    end = len(text)
    trimmed = len(text.rstrip())
    found = text.find(reply.strip(), start)
    reply_end = found + len(reply.strip()) if found >= 0 else end
    return trimmed if trimmed > reply_end else end


def _token_range(offsets: list[tuple[int, int]], lo: int, hi: int) -> tuple[int, int]:
    """Indices [i, j) of the tokens whose characters overlap [lo, hi); offsets are sorted."""
    i = bisect.bisect_right(offsets, lo, key=_end)
    j = bisect.bisect_left(offsets, hi, lo=i, key=_start)
    return i, j


def _start(offset: tuple[int, int]) -> int:
    return offset[0]


def _end(offset: tuple[int, int]) -> int:
    return offset[1]


def _rewritten_turn_end(last_form: str, full: str, start: int, limit: int) -> int | None:
    """End of a turn that the template renders, inside the conversation, as a tail of its last-turn form.

    `last_form` is the turn rendered as the conversation's end (Qwen3: "<think>\\nR\\n</think>\\n\\nA<|im_end|>\\n");
    inside the conversation the template wrote `full[start:end]` ("A<|im_end|>\\n"). The longest such tail
    before `limit` is the turn; None when the turn is not a tail of its last-turn form.
    """
    for end in range(min(limit, start + len(last_form)), start, -1):
        if last_form.endswith(full[start:end]) and full[start:end].strip():
            return end
    return None


def _count_roles(labels: list[int], role_tokens: tuple[tuple[int, int, str], ...]) -> dict[str, tuple[int, int]]:
    """Per role: (tokens, trained tokens) among `labels`; token ranges past the end (truncation) are cut."""
    counts: dict[str, list[int]] = {}
    covered = covered_trained = 0
    for i, j, role in role_tokens:
        i, j = min(i, len(labels)), min(j, len(labels))
        trained = j - i - labels[i:j].count(IGNORE)
        c = counts.setdefault(role, [0, 0])
        c[0] += j - i
        c[1] += trained
        covered += j - i
        covered_trained += trained
    total_trained = len(labels) - labels.count(IGNORE)
    counts["template"] = [len(labels) - covered, total_trained - covered_trained]
    return {k: (v[0], v[1]) for k, v in counts.items()}


def mask_labels(ids: list[int], offsets: list[tuple[int, int]], spans: tuple[tuple[int, int], ...]) -> list[int]:
    """Labels (T,): a token is trained when its characters overlap a span; spans are sorted, disjoint.

    Found by bisection per span rather than a loop per token: validate masks millions of tokens.
    """
    labels = [IGNORE] * len(ids)
    for lo, hi in spans:
        i, j = _token_range(offsets, lo, hi)
        labels[i:j] = ids[i:j]
    return labels


__all__ = ["ChatTemplate", "Encoded", "IGNORE", "Message", "Rendered", "TrainOn", "mask_labels"]
