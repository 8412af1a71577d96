"""Pairwise LLM judge over any OpenAI-compatible `/v1/chat/completions` endpoint.

Each sample is judged twice with the answers' positions swapped; the adapter wins a sample only
when both orders prefer it (and loses only when both prefer the base), anything else is a tie.
That cancels the position bias judges are known for (Zheng et al. 2023, "Judging LLM-as-a-judge").
A judge that cannot be reached, or whose replies mostly do not parse, is reported as failed with
the reason; it never takes the other metrics down with it.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from .stats import bootstrap_mean

TIMEOUT_S = 60
# More unparseable verdicts than this share and the judge's numbers would mean little.
MAX_INVALID_SHARE = 0.5

PROMPT = """You compare two answers to the same conversation. The reference answer shows what a good reply says.

Conversation:
{prompt}

Reference answer:
{reference}

Answer A:
{a}

Answer B:
{b}

Which answer is better (more correct and more helpful, judged against the reference)? \
Reply with exactly one of: A, B, TIE."""

_VERDICT = re.compile(r"\b(A|B|TIE)\b")


class JudgeFailed(Exception):
    """The endpoint is unreachable or does not answer in the expected shape."""


@dataclass
class JudgeResult:
    status: str  # "ok" | "failed"
    reason: str | None = None
    verdicts: list[str | None] = field(default_factory=list)  # per sample: "win" | "tie" | "loss" | None

    def summary(self, seed: int) -> dict:
        if self.status != "ok":
            return {"status": self.status, "reason": self.reason}
        valid = [v for v in self.verdicts if v is not None]
        points = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[v] for v in valid]
        return {"status": "ok", "win_rate": bootstrap_mean(points, seed).as_dict(),
                **{k: valid.count(k) for k in ("win", "tie", "loss")},
                "invalid": len(self.verdicts) - len(valid)}


class Judge:
    def __init__(self, url: str, model: str, api_key: str | None = None):
        # Accept the server root, .../v1 or the full completions URL, as people paste any of them.
        url = url.rstrip("/")
        if not url.endswith("/chat/completions"):
            url = url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")
        self.url = url
        self.model = model
        self.api_key = api_key or os.environ.get("LORACHAT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")

    def compare(self, prompts: list[str], references: list[str], base: list[str], adapter: list[str]) -> JudgeResult:
        """Verdict for the adapter against the base on every sample; never raises for the endpoint's faults."""
        verdicts: list[str | None] = []
        try:
            for prompt, reference, b, a in zip(prompts, references, base, adapter, strict=True):
                first = self._ask(prompt, reference, a, b)  # adapter is A
                second = self._ask(prompt, reference, b, a)  # adapter is B
                verdicts.append(_combine(first, second))
        except JudgeFailed as err:
            return JudgeResult("failed", str(err))
        invalid = verdicts.count(None)
        if verdicts and invalid > MAX_INVALID_SHARE * len(verdicts):
            return JudgeResult("failed", f"{invalid} of {len(verdicts)} verdicts did not parse as A, B or TIE",
                               verdicts)
        return JudgeResult("ok", None, verdicts)

    def _ask(self, prompt: str, reference: str, a: str, b: str) -> str | None:
        """'A', 'B', 'TIE', or None when the reply holds no verdict."""
        body = {"model": self.model, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": PROMPT.format(prompt=prompt, reference=reference,
                                                                      a=a, b=b)}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise JudgeFailed(f"{self.url} answered HTTP {err.code}") from None
        except (urllib.error.URLError, OSError) as err:
            raise JudgeFailed(f"{self.url} unreachable: {getattr(err, 'reason', err)}") from None
        except ValueError:
            raise JudgeFailed(f"{self.url} did not answer JSON") from None
        try:
            text = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeFailed(f"{self.url} answered JSON without choices[0].message.content") from None
        found = _VERDICT.search(str(text).upper())
        return found.group(1) if found else None


def _combine(adapter_first: str | None, adapter_second: str | None) -> str | None:
    """Both orders as one verdict for the adapter: each order says adapter, base or tie."""
    if adapter_first is None or adapter_second is None:
        return None
    first = {"A": 1, "B": -1, "TIE": 0}[adapter_first]
    second = {"A": -1, "B": 1, "TIE": 0}[adapter_second]
    total = first + second
    return "win" if total == 2 else "loss" if total == -2 else "tie"
