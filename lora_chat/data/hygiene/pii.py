"""Personal data and secrets in text: found with their kind and span, or masked with typed placeholders.

    find_pii("Mejla anna@example.se eller ring 070-123 45 67")
    # [PiiMatch(kind='EMAIL', ...), PiiMatch(kind='PHONE', ...)]
    mask_pii("Mejla anna@example.se")  # ("Mejla <EMAIL>", Counter({'EMAIL': 1}))

A regular expression proposes a candidate and a real check confirms it, so ordinary numbers (prices,
years, SEK amounts, "4-6 veckor") are left alone:
  - phone numbers: Google's libphonenumber (`phonenumbers`), VALID leniency, for numbers written with a
    country code or in Swedish, US or British national form;
  - card numbers: 13-19 digits with an issuer prefix and the Luhn check (`stdnum.luhn`);
  - IBANs: the country's length and the mod-97 check (`stdnum.iban`);
  - national identity numbers: the Swedish personnummer and samordningsnummer (date + Luhn check digit),
    the Norwegian fødselsnummer (two mod-11 digits), the Finnish henkilötunnus (mod-31 letter): `stdnum`;
  - IPv4/IPv6 addresses: parsed by `ipaddress`;
  - secrets: the published prefixes of API keys and tokens (OpenAI, GitHub, AWS, Google, Slack, Hugging
    Face, GitLab, Stripe), JWTs, PEM private keys, and values assigned to a key/token/password name.
Where two candidates overlap, the earlier kind in `KINDS` wins (an IBAN is not also a phone number).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import phonenumbers
from stdnum import iban, luhn
from stdnum.fi import hetu
from stdnum.no import fodselsnummer
from stdnum.se import personnummer

KINDS = ("SECRET", "EMAIL", "IBAN", "CARD", "PERSONNUMMER", "NATIONAL_ID", "IP", "PHONE")
PHONE_REGIONS = ("SE", "US", "GB")  # national forms read without a country code; "+CC ..." is read for all


@dataclass(frozen=True)
class PiiMatch:
    """One finding: its kind (one of `KINDS`), its character span in the text, and the text matched."""

    kind: str
    start: int
    end: int
    text: str


def placeholder(kind: str) -> str:
    """The typed placeholder a masked finding becomes: `<EMAIL>`, `<PHONE>`, ..."""
    return f"<{kind}>"


_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_CARD_ISSUER = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|3[068]|6(?:011|5|4[4-9])|35)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_SE_ID = re.compile(r"(?<![\d-])(?:19|20)?\d{6}[-+ ]?\d{4}(?![\d-])")
_NO_ID = re.compile(r"(?<![\d-])\d{6} ?\d{5}(?![\d-])")
_FI_ID = re.compile(r"(?<![\w-])\d{6}[-+A-FU-Y]\d{3}[0-9A-Y](?![\w-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")  # a full stop after it ends the sentence
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_SECRET = re.compile(
    r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"
    r"|\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,}|\bgithub_pat_[A-Za-z0-9_]{22,}"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bAIza[0-9A-Za-z_-]{35}"
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}|\bhf_[A-Za-z0-9]{30,}|\bglpat-[A-Za-z0-9_-]{20,}"
    r"|\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
)
# `api_key = "..."`, `password: hunter22`: the value, when it is long enough to be a secret and not a word.
_ASSIGNED = re.compile(
    r"(?i)\b(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|token|password|passwd|lösenord)"
    r"\s*[:=]\s*[\"']?(?P<value>[^\s\"']{8,})"
)


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _regex(pattern: re.Pattern, kind: str, check: Callable[[str], bool]) -> Callable[[str], Iterator[PiiMatch]]:
    def finder(text: str) -> Iterator[PiiMatch]:
        for m in pattern.finditer(text):
            if check(m.group()):
                yield PiiMatch(kind, m.start(), m.end(), m.group())
    return finder


def _card(candidate: str) -> bool:
    digits = _digits(candidate)
    return bool(_CARD_ISSUER.match(digits)) and luhn.is_valid(digits)


def _national_id(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    return fodselsnummer.is_valid(compact) or hetu.is_valid(compact)


def _ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return candidate.count(":") >= 2 and len(candidate) > 2 if ":" in candidate else True


def _phones(text: str) -> Iterator[PiiMatch]:
    seen: set[int] = set()
    for region in PHONE_REGIONS:
        for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            if m.start not in seen:
                seen.add(m.start)
                yield PiiMatch("PHONE", m.start, m.end, m.raw_string)


def _secrets(text: str) -> Iterator[PiiMatch]:
    if any(map(text.__contains__, _SECRET_PREFIXES)):
        for m in _SECRET.finditer(text):
            yield PiiMatch("SECRET", m.start(), m.end(), m.group())
    if not ("=" in text or ":" in text) or not any(map(text.casefold().__contains__, _SECRET_NAMES)):
        return
    for m in _ASSIGNED.finditer(text):
        value = m.group("value")
        if any(c.isdigit() for c in value) or not value.isalpha():
            yield PiiMatch("SECRET", m.start("value"), m.end("value"), value)


# Each finder runs only when the text has what its kind cannot do without: most rows have none of it, and these
# tests are C-level string scans, where the regular expressions and libphonenumber cost tens of microseconds.
_Finder = Callable[[str], Iterator[PiiMatch]]
_SECRET_PREFIXES = ("sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "AKIA", "ASIA", "AIza", "xox", "hf_",
                    "glpat-", "k_live_", "k_test_", "eyJ", "-----BEGIN")
_SECRET_NAMES = ("key", "secret", "token", "passw", "lösenord")
_DIGIT_RUN = re.compile(r"\d(?:[ -]?\d){5,}")  # six digits or more, single spaces or dashes between
# RFC 2606 / 6761 reserve these for documentation and examples: no one receives mail there, so nothing to hide
# (a regex tutorial's `user@example.com` stays as written).
_RESERVED_MAIL_DOMAIN = re.compile(
    r"@(?:[\w-]+\.)*(?:example\.(?:com|org|net)|[\w-]+\.(?:example|test|invalid|localhost))$", re.IGNORECASE)
_WITH_AT: tuple[_Finder, ...] = (_regex(_EMAIL, "EMAIL", lambda s: not _RESERVED_MAIL_DOMAIN.search(s)),)
_WITH_DOTTED_DIGITS: tuple[_Finder, ...] = (_regex(_IPV4, "IP", _ip),)
_WITH_DIGIT_RUN: tuple[_Finder, ...] = (
    _regex(_IBAN, "IBAN", iban.is_valid),
    _regex(_CARD, "CARD", _card),
    _regex(_SE_ID, "PERSONNUMMER", personnummer.is_valid),
    _regex(_NO_ID, "NATIONAL_ID", _national_id),
    _regex(_FI_ID, "NATIONAL_ID", _national_id),
    _phones,
)
_WITH_2_COLONS: tuple[_Finder, ...] = (_regex(_IPV6, "IP", _ip),)


def _finders(text: str) -> Iterator[_Finder]:
    yield _secrets  # it tests its own hints: a key's prefix, or a key/token/password name and ':' or '='
    if "@" in text:
        yield from _WITH_AT
    if text.count(".") >= 3:
        yield from _WITH_DOTTED_DIGITS
    if _DIGIT_RUN.search(text):
        yield from _WITH_DIGIT_RUN
    if text.count(":") >= 2:
        yield from _WITH_2_COLONS


def find_pii(text: str) -> list[PiiMatch]:
    """Every finding in `text`, in text order, none overlapping (the earlier kind in `KINDS` wins)."""
    candidates = [m for finder in _finders(text) for m in finder(text)]
    candidates.sort(key=lambda m: (KINDS.index(m.kind), m.start))
    kept: list[PiiMatch] = []
    for m in candidates:
        if all(m.end <= k.start or m.start >= k.end for k in kept):
            kept.append(m)
    return sorted(kept, key=lambda m: m.start)


def mask_pii(text: str) -> tuple[str, Counter[str]]:
    """`text` with each finding replaced by its placeholder, and the count of findings per kind."""
    matches = find_pii(text)
    pieces, last = [], 0
    for m in matches:
        pieces += [text[last:m.start], placeholder(m.kind)]
        last = m.end
    pieces.append(text[last:])
    return "".join(pieces), Counter(m.kind for m in matches)
