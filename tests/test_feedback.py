"""Feedback, as a user meets it: `serve --record DIR` stores each exchange and the votes given on it, through
`POST /v1/feedback` (OpenAI-shaped errors); the folder survives kill -9 and several writers; `lorachat feedback
report` ranks the models from the votes and `lorachat feedback export` turns them into training rows."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from adapter_factory import tiny_adapters
from lora_chat.cli import main
from lora_chat.errors import LorachatError
from lora_chat.feedback.ranking import rank, wilson
from lora_chat.feedback.store import RecordWriter, read_records
from lora_chat.serve.app import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]
# A writer process: RecordWriter(DIR, SERVER).append(...) N times (forever when N is 0), a payload of SIZE bytes.
WRITER = """
import sys, itertools
sys.path.insert(0, sys.argv[1])
from lora_chat.feedback.store import RecordWriter
folder, server, n, size, rotate = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
writer = RecordWriter(folder, server, rotate_bytes=rotate)
for i in (itertools.count() if n == 0 else range(n)):
    writer.append({"kind": "exchange", "id": f"{server}-{i}", "server": server, "model": "m",
                   "messages": [{"role": "user", "content": "q"}], "reply": "x" * size})
"""


def writer_process(folder: Path, server: str, n: int, size: int = 100, rotate: int = 1 << 26) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), str(folder), server, str(n), str(size),
                             str(rotate)])


def exchange(rid: str, model: str, reply: str, prompt: str = "How long does a permit take?", **extra) -> dict:
    return {"kind": "exchange", "id": rid, "server": "s1", "model": model, "adapter": model, "messages":
            [{"role": "user", "content": prompt}], "reply": reply, **extra}


def write_records(folder: Path, records: list[dict]) -> Path:
    writer = RecordWriter(folder, "s1")
    for record in records:
        writer.append(record)
    writer.close()
    return writer.path


# ---------------------------------------------------------------- the folder


def test_records_are_whole_lines_read_back_in_order(tmp_path):
    path = write_records(tmp_path, [exchange(f"r{i}", "faq-en", f"reply {i}") for i in range(5)])
    assert path.name == "record-s1-0001.jsonl"
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [f"r{i}" for i in range(5)]
    assert list(read_records(tmp_path).exchanges) == [f"r{i}" for i in range(5)]


def test_a_truncated_last_line_is_kept_skipped_and_counted(tmp_path):
    path = write_records(tmp_path, [exchange(f"r{i}", "faq-en", "ok") for i in range(3)])
    with path.open("ab") as f:
        f.write(b'{"kind": "exchange", "id": "r3", "mod')  # what a writer killed mid-line would leave
    before = path.read_bytes()
    records = read_records(tmp_path)
    assert list(records.exchanges) == ["r0", "r1", "r2"]
    assert [str(s) for s in records.skipped] == [f"{path}:4: truncated last line (its writer stopped mid-line); "
                                                 "skipped"]
    assert path.read_bytes() == before  # kept as it is
    result = CliRunner().invoke(main, ["feedback", "report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"1 unreadable line(s) skipped, e.g. {path}:4: truncated last line" in result.output


def test_a_writer_killed_with_sigkill_leaves_only_whole_records(tmp_path):
    process = writer_process(tmp_path, "killed", 0, size=30_000)
    try:
        deadline = time.monotonic() + 60
        while sum(f.read_bytes().count(b"\n") for f in tmp_path.glob("record-*.jsonl")) < 40:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.01)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    records = read_records(tmp_path)
    assert len(records.exchanges) >= 40
    assert all(r["reply"] == "x" * 30_000 for r in records.exchanges.values())  # none torn
    assert len(records.skipped) <= 1  # at most the line in flight


def test_files_rotate_by_size(tmp_path):
    writer = RecordWriter(tmp_path, "s1", rotate_bytes=1000)
    for i in range(30):
        writer.append(exchange(f"r{i}", "faq-en", "a reply of some length"))
    writer.close()
    files = sorted(tmp_path.glob("record-*.jsonl"))
    assert len(files) > 3 and all(f.stat().st_size <= 1000 for f in files)
    assert list(read_records(tmp_path).exchanges) == [f"r{i}" for i in range(30)]


def test_two_writer_processes_share_a_folder(tmp_path):
    processes = [writer_process(tmp_path, server, 400, size=500, rotate=50_000) for server in ("one", "two")]
    for p in processes:
        assert p.wait(timeout=120) == 0
    records = read_records(tmp_path)
    assert not records.skipped
    for server in ("one", "two"):
        assert [r for r in records.exchanges if r.startswith(server)] == [f"{server}-{i}" for i in range(400)]
    assert {f.name.split("-")[1] for f in tmp_path.glob("record-*.jsonl")} == {"one", "two"}  # a file per process


def test_a_recording_folder_that_is_not_writable_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(LorachatError, match="the recording folder is not writable"):
        RecordWriter(blocker / "feedback", "s1")
    result = CliRunner().invoke(main, ["serve", "--record", str(blocker / "feedback")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: --record: {blocker / 'feedback'}: the recording folder is not writable (Not a directory)"]


# ---------------------------------------------------------------- the report's figures


def votes(winners: list[str], a: str = "faq-en", b: str = "base") -> list[dict]:
    """One side-by-side vote per entry: "a", "b" or "tie", each on its own pair of replies."""
    out = []
    for i, winner in enumerate(winners):
        out += [exchange(f"a{i}", a, f"A says {i}", prompt=f"q{i}"), exchange(f"b{i}", b, f"B says {i}", prompt=f"q{i}"),
                {"kind": "comparison", "id": f"c{i}", "responses": [f"a{i}", f"b{i}"], "models": [a, b],
                 "winner": winner}]
    return out


def test_the_report_on_a_known_vote_set(tmp_path):
    records = votes(["a"] * 7 + ["b"] * 2 + ["tie"] * 2)
    records += [{"kind": "feedback", "id": f"f{i}", "response": f"a{i}", "model": "faq-en", "rating": r}
                for i, r in enumerate(["up", "up", "up", "down"])]
    write_records(tmp_path, records)
    figures = rank(read_records(tmp_path))
    pair = next(p for p in figures["pairs"] if p["model"] == "faq-en")
    assert (pair["wins"], pair["ties"], pair["losses"]) == (7, 2, 2)
    assert pair["win_rate"]["value"] == round(8 / 11, 4)
    # Wilson's interval for 8 of 11, worked by hand: centre (p + z²/2n) / (1 + z²/n), half-width as below.
    z, n, p = 1.959964, 11, 8 / 11
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    assert pair["win_rate"]["ci95"] == [round(centre - half, 4), round(centre + half, 4)]
    assert "note" not in pair
    # Two models: Bradley-Terry with the prior's virtual tie gives P(faq-en wins) = (8 + 0.5) / (11 + 1).
    first, second = figures["ranking"]
    assert first["model"] == "faq-en" and first["rank"] == 1
    assert first["score"] - second["score"] == pytest.approx(400 * math.log10(8.5 / 3.5), abs=0.2)
    assert first["ci95"][0] < first["score"] < first["ci95"][1]
    faq = next(m for m in figures["models"] if m["model"] == "faq-en")
    assert (faq["up"], faq["down"], faq["up_rate"]["value"]) == (3, 1, 0.75)
    assert "too few side-by-side votes for a firm ranking (11 < 20)" in " ".join(figures["notes"])


def test_few_votes_are_flagged_and_a_changed_mind_counts_once(tmp_path):
    records = votes(["b", "a"])
    records.append({"kind": "comparison", "id": "c0-again", "responses": ["b0", "a0"], "models": ["base", "faq-en"],
                    "winner": "b"})  # the same two replies, voted again: base's reply better -> faq-en's now wins
    write_records(tmp_path, records)
    figures = rank(read_records(tmp_path))
    pair = next(p for p in figures["pairs"] if p["model"] == "faq-en")
    assert (pair["wins"], pair["losses"], pair["note"]) == (2, 0, "too few votes (2 < 10)")


def test_wilson_matches_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17, example: 81 of 263 -> [0.2553, 0.3662]
    low, high = wilson(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def test_report_html_is_written_like_the_eval_report(tmp_path):
    write_records(tmp_path / "rec", votes(["a", "b", "a"]))
    out = tmp_path / "feedback.html"
    result = CliRunner().invoke(main, ["feedback", "report", str(tmp_path / "rec"), "--html", str(out)])
    assert result.exit_code == 0, result.output
    assert "Bradley-Terry ranking" in result.output and "too few votes (3 < 10)" in result.output
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "<h2>Win rate against each other model" in page


# ---------------------------------------------------------------- export


def test_export_writes_masked_deduplicated_rows_and_counts_them(tmp_path):
    rec = tmp_path / "rec"
    records = [
        exchange("e1", "faq-en", "Ten weeks.", prompt="My email is anna@example.se: how long?"),
        {"kind": "feedback", "id": "f1", "response": "e1", "model": "faq-en", "rating": "down"},
        {"kind": "feedback", "id": "f2", "response": "e1", "model": "faq-en",
         "edit": "The statutory time is ten weeks; write to anna@example.se"},
        exchange("e2", "faq-en", "Ten weeks from a complete application."),
        {"kind": "feedback", "id": "f3", "response": "e2", "model": "faq-en", "rating": "up"},
        exchange("e3", "faq-en", "Ten weeks from a complete application."),  # the same row again
        {"kind": "feedback", "id": "f4", "response": "e3", "model": "faq-en", "rating": "up"},
        exchange("e4", "base", "I do not know."),  # same prompt as e2, voted down: a pair up vs down
        {"kind": "feedback", "id": "f5", "response": "e4", "model": "base", "rating": "down"},
        *votes(["a", "tie"]),
    ]
    write_records(rec, records)
    sft, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(main, ["feedback", "export", str(rec), "--sft", str(sft), "--pairs", str(pairs)])
    assert result.exit_code == 0, result.output
    sft_rows = [json.loads(line) for line in sft.read_text().splitlines()]
    pair_rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in sft_rows] == [
        "The statutory time is ten weeks; write to <EMAIL>", "Ten weeks from a complete application."]
    assert sft_rows[0]["messages"][0]["content"] == "My email is <EMAIL>: how long?"
    assert {(r["chosen"], r["rejected"]) for r in pair_rows} == {
        ("The statutory time is ten weeks; write to <EMAIL>", "Ten weeks."),
        ("Ten weeks from a complete application.", "I do not know."),
        ("A says 0", "B says 0")}
    from lora_chat.data.formats import detect, to_conversation
    from lora_chat.errors import Where

    assert {detect(r, Where()) for r in sft_rows} == {"messages"} and {detect(r, Where()) for r in pair_rows} == {
        "preference"}
    first = to_conversation(pair_rows[0], "preference", Where())
    assert first.messages[-1].content == pair_rows[0]["chosen"] and first.meta["rejected"].content == \
        pair_rows[0]["rejected"]
    for line in ["SFT rows from edits: 1", "SFT rows from up-voted replies: 1", "pairs from edits: 1",
                 "pairs from side-by-side votes: 1", "pairs from up vs down votes on one prompt: 1",
                 "left out, SFT duplicates: 1", "left out, pair duplicates: 1",
                 "left out, side-by-side ties (no preference): 1", "personal data masked: EMAIL 2",
                 "written: 2 SFT rows, 3 preference pairs"]:
        assert line in result.output


def test_export_needs_an_output_and_an_existing_folder_for_it(tmp_path):
    write_records(tmp_path / "rec", votes(["a"]))
    result = CliRunner().invoke(main, ["feedback", "export", str(tmp_path / "rec")])
    assert result.exit_code == 2 and "name at least one output" in result.output
    result = CliRunner().invoke(main, ["feedback", "export", str(tmp_path / "rec"), "--pairs",
                                       str(tmp_path / "missing" / "p.jsonl")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    from lora_chat.runtime import AdapterSet

    _, en, sv = tiny_adapters(tmp_path_factory)
    return AdapterSet.open([en, sv])


def _serve(rt, record: Path | None) -> BackgroundServer:
    from lora_chat.serve.app import ServeOptions, build_app

    return BackgroundServer(build_app(rt, ServeOptions(record=record)))


@pytest.fixture(scope="module")
def recorded(rt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recorded")
    live = _serve(rt, folder)
    yield live, folder
    live.stop()


def ask(live: BackgroundServer, model: str, content: str, stream: bool = False, seed: int | None = None) -> str:
    """The response id of one 8-token answer: greedy, or sampled hot with `seed` (the tiny models' greedy replies
    are blank lines, which an export rightly leaves out)."""
    client = openai.OpenAI(base_url=live.url, api_key="unused", max_retries=0, timeout=120)
    kwargs = dict(model=model, max_tokens=8, messages=[{"role": "user", "content": content}])
    if seed is not None:
        kwargs.update(temperature=1.5, seed=seed)
    if not stream:
        return client.chat.completions.create(**kwargs).id
    ids = {chunk.id for chunk in client.chat.completions.create(stream=True, **kwargs)}
    assert len(ids) == 1
    return ids.pop()


def post(live: BackgroundServer, path: str, body: dict | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(live.url + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_each_exchange_is_recorded_under_the_id_the_client_got(recorded):
    live, folder = recorded
    plain, streamed = ask(live, "faq-en", "How long?"), ask(live, "auto", "Hej, hur mår du?", stream=True)
    records = read_records(folder).exchanges
    assert records[plain]["model"] == "faq-en" and records[plain]["adapter"] == "faq-en"
    assert records[plain]["messages"] == [{"role": "user", "content": "How long?"}]
    assert records[plain]["sampling"] == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    assert records[plain]["route"]["reason"] == "named in the request"
    assert records[streamed]["adapter"] == "talk-sv" and records[streamed]["route"]["language"] == "sv"
    assert records[streamed]["server"] == records[plain]["server"] == post(live, "/feedback")[1]["server"]
    assert records[streamed]["reply"] and records[streamed]["usage"]["completion_tokens"] >= 1


def test_votes_through_the_api_reach_the_report_and_the_export(recorded, tmp_path):
    live, folder = recorded
    a, b = ask(live, "faq-en", "What is a permit?", seed=1), ask(live, "talk-sv", "What is a permit?", seed=2)
    assert post(live, "/feedback", {"response_id": a, "model": "faq-en", "rating": "up"})[0] == 200
    status, body = post(live, "/feedback", {"response_id": b, "edit": "A permit is a decision."})
    assert status == 200 and body["object"] == "feedback" and body["model"] == "talk-sv"
    assert post(live, "/feedback", {"response_id": a, "other_response_id": b, "winner": "a"})[0] == 200
    figures = rank(read_records(folder))
    assert [(p["model"], p["other"], p["wins"]) for p in figures["pairs"]] == [("faq-en", "talk-sv", 1),
                                                                               ("talk-sv", "faq-en", 0)]
    pairs = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(main, ["feedback", "export", str(folder), "--pairs", str(pairs)])
    assert result.exit_code == 0, result.output
    assert "pairs from side-by-side votes: 1" in result.output and "pairs from edits: 1" in result.output


@pytest.mark.parametrize("body, status, code", [
    ({"response_id": "chatcmpl-nope", "rating": "up"}, 404, "response_not_found"),
    ({"response_id": "ANSWERED", "model": "no-such-adapter", "rating": "up"}, 404, "model_not_found"),
    ({"response_id": "ANSWERED", "model": "talk-sv", "rating": "up"}, 400, None),
    ({"response_id": "ANSWERED", "other_response_id": "OTHER-PROMPT", "winner": "a"}, 400, "different_prompts"),
    ({"response_id": "ANSWERED"}, 400, None),
    ({"response_id": "ANSWERED", "edit": "  "}, 400, None),
])
def test_bad_feedback_is_an_openai_error_and_nothing_is_stored(recorded, body, status, code):
    live, folder = recorded
    ids = {"ANSWERED": ask(live, "faq-en", "Who checks?"), "OTHER-PROMPT": ask(live, "faq-en", "Something else")}
    body = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    before = len(read_records(folder).feedback) + len(read_records(folder).comparisons)
    got, answer = post(live, "/feedback", body)
    assert got == status
    assert set(answer) == {"error"} and answer["error"]["code"] == code and answer["error"]["message"]
    assert len(read_records(folder).feedback) + len(read_records(folder).comparisons) == before


def test_a_vote_on_another_servers_reply_is_refused(rt, recorded):
    live, folder = recorded
    theirs = ask(live, "faq-en", "Whose reply is this?")
    other = _serve(rt, folder)  # a second server on the same folder
    try:
        status, body = post(other, "/feedback", {"response_id": theirs, "rating": "up"})
    finally:
        other.stop()
    assert status == 409 and body["error"]["code"] == "response_from_another_server"


def test_without_record_nothing_is_stored_and_feedback_is_refused(rt, tmp_path):
    live = _serve(rt, None)
    try:
        rid = ask(live, "faq-en", "How long?")
        assert post(live, "/feedback")[1] == {"object": "recording", "recording": False, "server": None}
        status, body = post(live, "/feedback", {"response_id": rid, "rating": "up"})
    finally:
        live.stop()
    assert status == 400 and body["error"]["code"] == "recording_off"
