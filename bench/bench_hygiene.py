"""How well `validate`'s data hygiene finds duplicates, wrong-language rows and personal data, on real rows.

    HF_HUB_OFFLINE=1 python bench/bench_hygiene.py [--quick]

Rows: the installed packages' text, nothing copied into the repo: the construction FAQ (zaragoza-construction-faq,
Swedish and English, question + answer) and the chatterbot-corpus conversations. Every check splits its rows
once by a seeded shuffle into a tuning half and a test half: a threshold is chosen on the tuning half and the
figures are reported on the test half, at the threshold lorachat ships (the tuned one is printed beside it).

Duplicates: conversations of at least MIN_WORDS words. Natural near-duplicates among them (accent-folded word
sets, pair by pair: Jaccard >= 0.8, or 90% of the smaller held by the larger) are set aside first, so every
pair found among the rest is a false one (rows on one template, such as chatterbot's jokes, stay and must not
be paired). A quarter of the rows get a near copy (1-2 of: two adjacent words swapped, punctuation dropped
or added, a real sentence from another row added; casing changed on top half of the time), a tenth an exact
copy (casing and whitespace only). Found = the copy is paired with its source; precision = right pairs / pairs.

Language: every distinct 3-8 word chatterbot line (the router's measurement set, docs/routing.md) plus the
FAQ's sentences of 3-12 words, for a Swedish and an English recipe: lines in another language must be found.
Also the whole-conversation check on chatterbot's swedish/ folder (its conversations.yml is English).

Personal data: generated cases of each kind (valid check digits; written the ways people write them) put into
real rows; found = a finding of that kind covers the case. False positives: clean real rows, and real rows with
prices, years, SEK amounts, times and ranges put in. PII has no threshold, so nothing is tuned there.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

MIN_WORDS = 12  # shorter conversations ("Hello / Hi") have too few words for a sentence added to leave a near copy
SEED = 7


# ---------------------------------------------------------------- real rows


def _package_dir(name: str) -> Path:
    import importlib.util

    return Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))


def faq_rows() -> list[list[str]]:
    """Question and answer of every FAQ row, Swedish and English."""
    out = []
    for name in ("faq.jsonl", "faq-en.jsonl"):
        for line in (_package_dir("zaragoza_construction_faq") / "data" / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                out.append([row["q"], row["a"]])
    return out


def chatterbot_rows() -> list[tuple[list[str], str, str]]:
    """(turns, language folder, file name) of every chatterbot-corpus conversation."""
    import yaml

    out = []
    for folder in sorted((_package_dir("chatterbot_corpus") / "data").iterdir()):
        for file in sorted(folder.glob("*.yml")):
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            for turns in data.get("conversations") or []:
                turns = [str(t) for t in turns if isinstance(t, str | int | float) and str(t).strip()]
                if turns:
                    out.append((turns, folder.name, file.name))
    return out


def halves(items: list, seed: int = SEED) -> tuple[list, list]:
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2:]


# ---------------------------------------------------------------- duplicates


def _conversation(turns: list[str]):
    from lora_chat.data import Conversation, Message
    from lora_chat.errors import Where

    return Conversation(tuple(Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)),
                        Where("bench"))


NATURAL = 0.8  # plain word-set Jaccard from which two real rows are near-duplicates already (set aside)
NATURAL_CONTAINED = 0.9  # or the share of the smaller row's words the larger holds


def _plain_words(text: str) -> set[str]:
    import unicodedata

    folded = "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))
    return set(re.findall(r"\w+", folded))


def _distinct(rows: list[list[str]]) -> tuple[list[list[str]], int]:
    """Rows with no natural near-duplicate (accent-folded word sets: Jaccard >= NATURAL, or the smaller held
    NATURAL_CONTAINED by the larger), and how many were set aside. Rows that merely share a template
    (chatterbot's jokes, its code answers) stay: pairing them counts as wrong."""
    sets = [_plain_words("\n".join(r)) for r in rows]
    aside = set()
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            a, b = sets[i], sets[j]
            shared = len(a & b)
            if shared >= NATURAL * len(a | b) or shared >= NATURAL_CONTAINED * min(len(a), len(b)):
                aside.update((i, j))
    return [r for i, r in enumerate(rows) if i not in aside], len(aside)


def _swap(text: str, rng: random.Random) -> str:
    w = text.split()
    if len(w) < 2:
        return text
    i = rng.randrange(len(w) - 1)
    w[i], w[i + 1] = w[i + 1], w[i]
    return " ".join(w)


def _punctuation(text: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"([.?!])?$", lambda m: rng.choice(["!", "?", "...", " !"]), text, count=1)


def _near_copy(turns: list[str], sentences: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    turns = list(turns)
    edits = rng.sample(["swap", "punctuation", "sentence"], rng.choice([1, 2]))
    for edit in edits:
        k = rng.randrange(len(turns))
        if edit == "swap":
            turns[k] = _swap(turns[k], rng)
        elif edit == "punctuation":
            turns[k] = _punctuation(turns[k], rng)
        else:
            turns[k] = f"{turns[k]} {rng.choice(sentences)}"
    if rng.random() < 0.5:
        k = rng.randrange(len(turns))
        turns[k] = rng.choice([str.lower, str.upper, str.title])(turns[k])
        edits.append("casing")
    return turns, edits


def _exact_copy(turns: list[str], rng: random.Random) -> list[str]:
    return [rng.choice([str.lower, str.upper, lambda t: "  " + t.replace(" ", "   ") + "\n"])(t) for t in turns]


def duplicate_case(rows: list[list[str]], sentences: list[str], seed: int) -> tuple[list, dict, dict]:
    """Rows + injected copies (appended in random order); copy index -> (source index, "near" | "exact")."""
    rng = random.Random(seed)
    all_rows = [list(r) for r in rows]
    truth: dict[int, tuple[int, str]] = {}
    edits_of: dict[int, list[str]] = {}
    picks = list(range(len(rows)))
    rng.shuffle(picks)
    n_near, n_exact = len(rows) // 4, len(rows) // 10
    copies = [(i, "near") for i in picks[:n_near]] + [(i, "exact") for i in picks[n_near:n_near + n_exact]]
    rng.shuffle(copies)
    for source, kind in copies:
        if kind == "near":
            turns, edits = _near_copy(rows[source], sentences, rng)
        else:
            turns, edits = _exact_copy(rows[source], rng), ["casing+whitespace"]
        truth[len(all_rows)] = (source, kind)
        edits_of[len(all_rows)] = edits
        all_rows.append(turns)
    return all_rows, truth, edits_of


def score_duplicates(all_rows: list, truth: dict, threshold: float) -> dict:
    from lora_chat.data.hygiene.duplicates import NearIndex, exact_key
    from lora_chat.data.hygiene.scan import row_text, spoken_text

    conversations = [_conversation(t) for t in all_rows]
    first: dict[bytes, int] = {}
    exact_pairs, unique = {}, []
    index = NearIndex(threshold, seed=42)
    for i, c in enumerate(conversations):
        key = exact_key(row_text(c))
        if key in first:
            exact_pairs[i] = first[key]
        else:
            first[key] = i
            unique.append(i)
        index.add(spoken_text(c))
    near_pairs = {p.later: p.earlier for p in index.pairs(allowed=unique)}
    exact_truth = [c for c, (_, kind) in truth.items() if kind == "exact"]
    near_truth = [c for c, (_, kind) in truth.items() if kind == "near"]
    found_pairs = {**exact_pairs, **near_pairs}
    return {
        "exact_recall": sum(exact_pairs.get(c) == truth[c][0] for c in exact_truth) / len(exact_truth),
        "near_recall": sum(found_pairs.get(c) == truth[c][0] for c in near_truth) / len(near_truth),
        "near_precision": (sum(truth.get(later, (None,))[0] == earlier for later, earlier in near_pairs.items())
                           / max(len(near_pairs), 1)),
        "near_pairs": len(near_pairs),
        "missed": [c for c in near_truth if found_pairs.get(c) != truth[c][0]],
    }


def duplicates(quick: bool) -> tuple[list[dict], list[str]]:
    from lora_chat.recipe import Data

    rows = [r for r in faq_rows() + [t for t, _, _ in chatterbot_rows()] if len(" ".join(r).split()) >= MIN_WORDS]
    distinct, aside = _distinct(rows)
    tune, test = halves(distinct)
    sentences = [s for r in rows for t in r for s in re.split(r"(?<=[.!?])\s+", t) if 3 <= len(s.split()) <= 10]
    shipped = Data.model_fields["near_threshold"].default
    tuned = {}
    case = duplicate_case(tune, sentences, SEED)
    for t in (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9):
        s = score_duplicates(case[0], case[1], t)
        tuned[t] = 2 * s["near_recall"] * s["near_precision"] / (s["near_recall"] + s["near_precision"])
    best = max(tuned, key=lambda k: (round(tuned[k], 3), k))  # ties: the higher threshold
    all_rows, truth, edits = duplicate_case(test, sentences, SEED + 1)
    start = time.perf_counter()
    s = score_duplicates(all_rows, truth, shipped)
    seconds = time.perf_counter() - start
    missed_edits = sorted({e for c in s["missed"] for e in edits[c]})
    lines = [f"duplicates: {len(rows)} real conversations of >= {MIN_WORDS} words, {aside} set aside as natural "
             f"near-duplicates; tuning half {len(tune)}, test half {len(test)} + {len(truth)} copies",
             f"  near_threshold F1 on the tuning half: " + ", ".join(f"{t}: {f:.3f}" for t, f in tuned.items())
             + f" -> best {best}, shipped {shipped}",
             f"  test half at {shipped}: exact recall {s['exact_recall']:.3f}, near recall {s['near_recall']:.3f}, "
             f"near precision {s['near_precision']:.3f} ({s['near_pairs']} pairs), {len(s['missed'])} missed "
             f"(edits among them: {', '.join(missed_edits) or '-'}); {seconds / len(all_rows) * 1e6:.0f} us/row"]
    return [
        _row("hygiene_exact_dup_recall", 100 * s["exact_recall"], "%", "goal", 100, ">= 100 %"),
        _row("hygiene_near_dup_recall", 100 * s["near_recall"], "%", "goal", 95, ">= 95 %"),
        _row("hygiene_near_dup_precision", 100 * s["near_precision"], "%", "goal", 95, ">= 95 %"),
    ], lines


# ---------------------------------------------------------------- language


def language_lines() -> list[tuple[str, str]]:
    from bench_serve import everyday_lines

    lines = dict(everyday_lines(min_words=3, max_words=8))
    for name, code in (("faq.jsonl", "sv"), ("faq-en.jsonl", "en")):
        for line in (_package_dir("zaragoza_construction_faq") / "data" / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                for s in re.split(r"(?<=[.!?])\s+", f"{row['q']} {row['a']}"):
                    if 3 <= len(s.split()) <= 12:
                        lines.setdefault(s.strip(), code)
    return list(lines.items())


def score_language(lines: list[tuple[str, str]], target: str, share: float) -> tuple[float, float, int, int]:
    from lora_chat.data.hygiene.language import row_language

    wrong = [lang != target for _, lang in lines]
    flagged = [row_language(text, target, share).wrong for text, _ in lines]
    tp = sum(w and f for w, f in zip(wrong, flagged))
    return tp / max(sum(wrong), 1), tp / max(sum(flagged), 1), sum(wrong), len(lines) - sum(wrong)


def language(quick: bool) -> tuple[list[dict], list[str]]:
    from lora_chat.data.hygiene.language import WRONG_LANGUAGE_SHARE
    from lora_chat.data.hygiene.scan import spoken_text

    tune, test = halves(language_lines())
    lines, rows = [], []
    grid = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    for target in ("sv", "en"):
        f1 = {}
        for share in grid:
            r, p, _, _ = score_language(tune, target, share)
            f1[share] = 2 * r * p / (r + p) if r + p else 0.0
        r, p, n_wrong, n_right = score_language(test, target, WRONG_LANGUAGE_SHARE)
        lines.append(f"language, {target} recipe: tuning-half F1 " + ", ".join(f"{s}: {v:.3f}" for s, v in f1.items())
                     + f" -> best {max(f1, key=lambda k: (round(f1[k], 3), k))}, shipped {WRONG_LANGUAGE_SHARE}; test half: {n_wrong} lines "
                     f"in another language, {n_right} in {target}: found {r:.3f} at precision {p:.3f}")
        rows += [_row(f"hygiene_wrong_language_found_{target}", 100 * r, "%", "goal", 95, ">= 95 %"),
                 _row(f"hygiene_wrong_language_precision_{target}", 100 * p, "%", "goal", 95, ">= 95 %")]
    from lora_chat.data.hygiene.language import row_language

    swedish = [(t, f) for t, folder, f in chatterbot_rows() if folder == "swedish"]
    flagged = [(f, row_language(spoken_text(_conversation(t)), "sv").wrong) for t, f in swedish]
    english = sum(1 for f, _ in flagged if f == "conversations.yml")
    found = sum(1 for f, w in flagged if w and f == "conversations.yml")
    false = sum(1 for f, w in flagged if w and f != "conversations.yml")
    lines.append(f"language, chatterbot swedish/ conversations: {found} of the {english} in conversations.yml "
                 f"(English) found, {false} of the {len(flagged) - english} Swedish ones flagged")
    return rows, lines


# ---------------------------------------------------------------- personal data


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    from stdnum import luhn

    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return body + luhn.calc_check_digit(body)


def _group(digits: str, sizes: tuple[int, ...], sep: str) -> str:
    out, i = [], 0
    for n in sizes:
        out.append(digits[i:i + n])
        i += n
    return sep.join(p for p in out if p)


def pii_cases(kind: str, rng: random.Random) -> str:
    """One realistic value of `kind`, written as people write it."""
    from stdnum import iban

    if kind == "EMAIL":
        first = rng.choice(["anna", "erik", "maria", "lars", "karin", "johan", "sara", "jose", "lucia", "mike"])
        last = rng.choice(["andersson", "johansson", "karlsson", "nilsson", "garcia", "smith", "lindqvist"])
        domain = rng.choice(["gmail.com", "hotmail.se", "telia.com", "zaragoza.se", "bredband.net", "outlook.com",
                             "foretag.co.uk"])
        return f"{first}{rng.choice(['.', '_', ''])}{last}{rng.choice(['', str(rng.randint(1, 99))])}@{domain}"
    if kind == "PHONE":
        form = rng.randrange(6)
        mobile = rng.choice(["70", "72", "73", "76", "79"]) + "".join(rng.choice(string.digits) for _ in range(7))
        if form == 0:
            return f"0{mobile[:2]}-{mobile[2:5]} {mobile[5:7]} {mobile[7:]}"
        if form == 1:
            return f"+46 {mobile[:2]} {mobile[2:5]} {mobile[5:7]} {mobile[7:]}"
        if form == 2:
            return f"0{mobile}"
        if form == 3:
            return f"08-{rng.randint(100, 999)} {rng.randint(10, 99)} {rng.randint(10, 99)}"
        if form == 4:
            return f"+44 20 7{rng.randint(100, 999)} {rng.randint(1000, 9999)}"
        return f"({rng.choice(['212', '415', '312', '617'])}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}"
    if kind == "CARD":
        number = rng.choice([lambda: _luhn_complete("4", 16, rng), lambda: _luhn_complete(str(rng.randint(51, 55)), 16, rng),
                             lambda: _luhn_complete(rng.choice(["34", "37"]), 15, rng)])()
        sep = rng.choice([" ", "-", ""])
        return _group(number, (4, 6, 5) if len(number) == 15 else (4, 4, 4, 4), sep)
    if kind == "IBAN":
        country, length = rng.choice([("SE", 20), ("DE", 18), ("GB", 18), ("ES", 20)])
        bban = "".join(rng.choice(string.digits) for _ in range(length))
        if country == "GB":
            bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + bban[4:]
        if country == "ES":  # a Spanish account number carries its own two check digits (CCC)
            from stdnum.es import ccc

            bban = bban[:8] + ccc.calc_check_digits(bban[:8] + "00" + bban[10:]) + bban[10:]
        number = country + iban.calc_check_digits(country + "00" + bban) + bban
        return iban.format(number) if rng.random() < 0.6 else number
    if kind == "PERSONNUMMER":
        from stdnum import luhn

        year, month, day = rng.randint(1940, 2010), rng.randint(1, 12), rng.randint(1, 28)
        body = f"{year % 100:02d}{month:02d}{day:02d}{rng.randint(0, 999):03d}"
        number = body + luhn.calc_check_digit(body)
        form = rng.randrange(3)
        return [f"{number[:6]}-{number[6:]}", f"{year // 100}{number}", f"{year // 100}{number[:6]}-{number[6:]}"][form]
    if kind == "IP":
        import ipaddress

        if rng.random() < 0.6:
            return ".".join(str(rng.randint(1, 254)) for _ in range(4))
        return str(ipaddress.IPv6Address(rng.getrandbits(128)))
    if kind == "SECRET":
        alnum = string.ascii_letters + string.digits
        token = lambda n: "".join(rng.choice(alnum) for _ in range(n))  # noqa: E731
        return rng.choice([f"sk-proj-{token(40)}", f"ghp_{token(36)}", "AKIA" + "".join(
            rng.choice(string.ascii_uppercase + string.digits) for _ in range(16)), f"hf_{token(34)}",
            f"xoxb-{rng.randint(10**11, 10**12)}-{token(24)}", f"api_key={token(32)}"])
    raise ValueError(kind)


PHRASES = {"sv": ["Kontakta mig på {x}.", "Mitt nummer är {x}", "Skicka till {x} tack", "({x})"],
           "en": ["Reach me at {x}.", "It is {x}", "use {x} for that", "({x})"]}
NUMBERS = ["kostar 12 500 kr", "år 2024", "SEK 1 250 000", "3 500 000 kronor", "4-6 veckor", "kl. 08:30-17:00",
           "ca 25 000-40 000 kr", "1 200 m2", "20 %", "mellan 1990 och 2010", "tel. kontoret", "version 2.1",
           "$1,299.99", "10-12 weeks", "from 2019-2023", "45 000 SEK", "EUR 3 400", "0,5 mm", "150 000:-"]


def pii(quick: bool) -> tuple[list[dict], list[str]]:
    from lora_chat.data.hygiene.pii import KINDS, find_pii

    rng = random.Random(SEED)
    real = [t for r in faq_rows() for t in r] + [t for turns, _, _ in chatterbot_rows() for t in turns]
    per_kind = 100 if quick else 300
    rows, lines = [], []
    for kind in [k for k in KINDS if k != "NATIONAL_ID"]:
        hits = 0
        for _ in range(per_kind):
            value = pii_cases(kind, rng)
            host = rng.choice(real)
            phrase = rng.choice(PHRASES["sv" if rng.random() < 0.5 else "en"]).format(x=value)
            words = host.split()
            at = rng.randint(0, len(words))
            text = " ".join(words[:at] + [phrase] + words[at:])
            start = text.index(value)
            hits += any(m.kind == kind and m.start <= start + len(value) // 2 < m.end for m in find_pii(text))
        rows.append(_row(f"hygiene_pii_recall_{kind.lower()}", 100 * hits / per_kind, "%", "goal", 95, ">= 95 %"))
        lines.append(f"personal data {kind}: {hits}/{per_kind} generated cases in real rows found")
    clean = [t for t in dict.fromkeys(real)]
    flagged = [(t, find_pii(t)) for t in clean]
    flagged = [(t, m) for t, m in flagged if m]
    with_numbers = []
    for t in clean[: len(clean) // 2]:
        words = t.split()
        at = rng.randint(0, len(words))
        with_numbers.append(" ".join(words[:at] + [rng.choice(NUMBERS)] + words[at:]))
    number_flags = [(t, find_pii(t)) for t in with_numbers]
    number_flags = [(t, m) for t, m in number_flags if m]
    share = len(flagged) / len(clean)
    lines.append(f"personal data, false positives: {len(flagged)} of {len(clean)} distinct clean real turns flagged "
                 f"({100 * share:.2f}%); {len(number_flags)} of {len(with_numbers)} with a price/year/amount put in")
    for t, m in (flagged + number_flags)[:5]:
        lines.append(f"  flagged: {[(x.kind, x.text) for x in m]} in {t[:100]!r}")
    rows.append(_row("hygiene_pii_false_positive_rows", 100 * share, "%", "goal", 1, "<= 1 %"))
    rows.append(_row("hygiene_pii_false_positive_numbers", 100 * len(number_flags) / len(with_numbers), "%", "goal", 1,
                     "<= 1 %"))
    return rows, lines


def _row(name: str, value: float, unit: str, baseline: str, baseline_value: float, goal: str) -> dict:
    return {"name": name, "value": round(value, 2), "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": None, "goal": goal}


def results(quick: bool) -> list[dict]:
    out = []
    for check in (duplicates, language, pii):
        rows, lines = check(quick)
        print("\n".join(lines), file=sys.stderr, flush=True)
        out += rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer generated PII cases (100 per kind, not 300).")
    args = parser.parse_args()
    for row in results(args.quick):
        print(f"{row['name']}: {row['value']} {row['unit']} (goal {row['goal']})")


if __name__ == "__main__":
    main()
