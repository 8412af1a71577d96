"""`lorachat eval`: metrics, intervals, masked loss, batched generation, judge and reports on the tiny model."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from adapter_factory import DISTINCT, finetune_adapter, layered
from conftest import chat, sample_rows, write_jsonl
from lora_chat.cli import main
from lora_chat.evaluate import metrics, stats


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    faq = finetune_adapter(root, "faq-en", tiny_base, sample_rows(12), **layered(DISTINCT, {"training": {"seed": 1}}))
    hello = [chat(f"Hello {i}!", f"Hello! How can I help you today? ({i})") for i in range(12)]
    return faq, finetune_adapter(root, "hello-en", tiny_base, hello, **layered(DISTINCT, {"training": {"seed": 2}}))


@pytest.fixture
def own_copy(adapters, tmp_path) -> Path:
    """A private copy of the first adapter, for tests that read what eval writes into it."""
    return Path(shutil.copytree(adapters[0], tmp_path / "faq-en"))


def run_cli(*args: str):
    return CliRunner().invoke(main, ["eval", *args, "--max-new-tokens", "6"], catch_exceptions=False)


# ---------------------------------------------------------------- metrics and intervals


def test_exact_match_ignores_case_punctuation_and_spacing():
    assert metrics.exact_match("Ten  weeks.", "ten weeks") == 100.0
    assert metrics.exact_match("ten weeks", "eleven weeks") == 0.0


def test_token_f1_counts_shared_words():
    # 2 shared words of 3 predicted and 4 reference: P = 2/3, R = 1/2, F1 = 4/7.
    assert metrics.token_f1("ten long weeks", "it takes ten weeks") == pytest.approx(100 * 4 / 7)


def test_rouge_l_uses_the_longest_common_subsequence():
    # LCS("a b c d", "a c b d") = 3 ("a b d" or "a c d"): P = R = 3/4.
    assert metrics.rouge_l("a b c d", "a c b d") == pytest.approx(75.0)


def test_identical_replies_score_full_marks_on_every_metric():
    scores = metrics.score("The statutory processing time is ten weeks.", "The statutory processing time is ten weeks.")
    assert all(v == pytest.approx(100.0) for v in scores.values())


def test_bootstrap_is_seeded_and_brackets_the_token_weighted_ratio():
    a = stats.bootstrap_ratio([2.0, 9.0, 4.0, 1.0], [1, 3, 2, 1], seed=7)
    assert a == stats.bootstrap_ratio([2.0, 9.0, 4.0, 1.0], [1, 3, 2, 1], seed=7)
    assert a.value == pytest.approx(16 / 7)
    assert a.low <= a.value <= a.high


# ---------------------------------------------------------------- loss and generation


@pytest.fixture(scope="module")
def base_only(tiny_base):
    from lora_chat.runtime import AdapterSet

    return AdapterSet.open(base=str(tiny_base))


def test_batched_loss_equals_the_models_own_loss_per_sample(base_only):
    """Padding, batching and the chunked head change nothing: each sample's loss is what HF computes alone."""
    import torch

    from lora_chat.data.formats import to_conversation
    from lora_chat.errors import Where
    from lora_chat.evaluate import loss

    rt = base_only
    template = rt.get("base").template
    rows = [chat("Hi", "Hello!"), chat("How long does a building permit take?", "Ten weeks, by statute.")]
    encoded = [template.encode(to_conversation(r, "messages", Where("x", i))) for i, r in enumerate(rows)]
    chunk = loss.HEAD_CHUNK
    try:
        loss.HEAD_CHUNK = 3  # several head chunks per batch, and a chunk split across rows
        got = loss.sample_losses(rt, ["base", "base"], encoded, batch_size=2)
    finally:
        loss.HEAD_CHUNK = chunk
    for (nll, count), e in zip(got, encoded):
        with torch.no_grad():
            expected = rt.model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
        assert count == e.trained
        assert nll / count == pytest.approx(float(expected), rel=1e-4)


def test_greedy_replies_do_not_depend_on_batch_size_or_data_order(base_only):
    from lora_chat.evaluate.generate import Decoding, generate_replies

    rt = base_only
    questions = ["Hi", "How long does a building permit take in the municipality?", "Vad är bygglov?",
                 "What is a building permit?", "Goodbye and thank you."]
    jobs = [("base", i, rt.render("base", [{"role": "user", "content": q}])) for i, q in enumerate(questions)]
    alone = generate_replies(rt, jobs, Decoding(max_new_tokens=8, batch_size=1))
    assert generate_replies(rt, jobs, Decoding(max_new_tokens=8, batch_size=5)) == alone
    assert generate_replies(rt, jobs[::-1], Decoding(max_new_tokens=8, batch_size=3)) == alone[::-1]


# ---------------------------------------------------------------- the command


def test_eval_compares_base_and_adapters_on_their_own_eval_splits(adapters, tmp_path):
    result = run_cli(*map(str, adapters), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "faq-en", "hello-en"]
    assert [d["name"] for d in report["datasets"]] == ["faq-en:eval", "hello-en:eval"]
    assert len(report["samples"]) == 6  # 25% of 12 distinct rows, per adapter
    losses = {m["name"]: m["loss"]["value"] for m in report["models"]}
    assert len(set(losses.values())) == 3  # adapters swapped in, and really off for the base
    row = report["models"][1]
    assert set(row["metrics"]) == set(metrics.METRICS)
    assert row["loss"]["ci95"][0] <= row["loss"]["value"] <= row["loss"]["ci95"][1]
    assert sum(row["vs_base"][k] for k in ("win", "tie", "loss")) == 6


def test_eval_writes_markdown_and_self_contained_html(adapters, tmp_path):
    run_cli(str(adapters[0]), "--out", str(tmp_path))
    markdown = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert "| base |" in markdown and "| faq-en |" in markdown and "Reference:" in markdown
    assert page.count("data:image/png;base64,") == 3  # metrics, per-sample loss, learned vs forgot
    assert "src=\"http" not in page and "<script" not in page


def test_eval_summary_goes_into_the_adapters_metrics_and_model_card(own_copy, tmp_path):
    run_cli(str(own_copy), "--out", str(tmp_path / "out"))
    summary = json.loads((own_copy / "metrics.json").read_text())["eval"]
    assert summary["perplexity"] > 1 and len(summary["ci95"]["perplexity"]) == 2
    assert set(summary["by_dataset"]) == {"faq-en:eval"}
    card = (own_copy / "README.md").read_text()
    index = yaml.safe_load(card.split("---")[1])["model-index"][0]
    eval_result = next(r for r in index["results"] if "eval" in r["dataset"]["name"])
    assert {"perplexity", "chrf", "rouge_l"} <= {m["type"] for m in eval_result["metrics"]}


def test_several_data_files_give_an_adapter_by_dataset_matrix(adapters, tmp_path):
    faq = write_jsonl(tmp_path / "faq.jsonl", sample_rows(3))
    greet = write_jsonl(tmp_path / "greet.jsonl", [chat("Hello!", "Goodbye and thank you.")] * 2)
    result = run_cli(*map(str, adapters), "--data", str(faq), "--data", str(greet), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    for model in report["models"]:
        assert set(model["by_dataset"]) == {"faq", "greet"}
    assert "delta_loss" in report["models"][2]["by_dataset"]["faq"]


def test_max_samples_beyond_the_data_uses_all_and_says_so(adapters, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(2))
    result = run_cli(str(adapters[0]), "--data", str(data), "--max-samples", "50", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0
    assert "--max-samples 50 is more than the 2 conversations available: using all 2" in result.output
    assert json.loads((tmp_path / "o" / "report.json").read_text())["datasets"][0]["samples"] == 2


def test_data_without_assistant_turns_is_a_clear_error(adapters, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}] * 2)
    result = run_cli(str(adapters[0]), "--data", str(data))
    assert result.exit_code == 2
    assert "no conversation has an assistant reply" in result.output


def test_adapter_from_another_base_fails_in_one_line_before_weights_load(own_copy, tiny_base, monkeypatch):
    from lora_chat.runtime import adapter_set

    monkeypatch.setattr(adapter_set, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    manifest = json.loads((own_copy / "manifest.json").read_text())
    manifest["base"].update(model_id="other/model", hidden_size=4096)
    (own_copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(str(own_copy), "--base", str(tiny_base))
    assert result.exit_code == 2
    assert "hidden_size 4096 != 32" in result.output and len(result.output.strip().splitlines()) == 1


def test_adapter_directory_without_a_manifest_is_a_one_line_error(own_copy):
    (own_copy / "manifest.json").unlink()
    result = run_cli(str(own_copy))
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {own_copy}: not a complete lorachat adapter: no manifest.json " \
                                    f"(an unfinished or foreign run?)"


def test_report_records_dtype_batch_size_and_that_replies_are_batch_invariant(adapters, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    assert run_cli(str(adapters[0]), "--data", str(data), "--batch-size", "4", "--out", str(tmp_path)).exit_code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["generation"] == {"dtype": "float32", "batch_size": 4, "batch_invariant": True}
    assert "batch-invariant: a greedy reply does not depend on the batch" in (tmp_path / "report.md").read_text()


def test_fast_trades_invariance_back_and_the_report_says_so(adapters, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    assert run_cli(str(adapters[0]), "--data", str(data), "--fast", "--out", str(tmp_path)).exit_code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["generation"]["batch_invariant"] is False
    assert any("the generation metrics depend on batching" in n for n in report["notes"])
    assert "NOT batch-invariant (--fast)" in (tmp_path / "report.md").read_text()


def test_a_merged_model_folder_is_compared_beside_its_adapter(adapters, tiny_base, tmp_path):
    """The adapter merged into the base (what `lorachat merge` writes) scores as the adapter does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "faq-merged"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(adapters[0]))
    model.merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(adapters[0]).save_pretrained(merged)
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    result = run_cli(str(adapters[0]), "--model", str(merged), "--data", str(data), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    rows = {m["name"]: m for m in json.loads((tmp_path / "o" / "report.json").read_text())["models"]}
    assert list(rows) == ["base", "faq-en", "faq-merged"] and rows["faq-merged"]["kind"] == "merged"
    assert rows["faq-merged"]["loss"]["value"] == pytest.approx(rows["faq-en"]["loss"]["value"], abs=1e-3)
    assert rows["faq-merged"]["loss"]["value"] != pytest.approx(rows["base"]["loss"]["value"], abs=1e-3)


def test_an_adapter_passed_as_a_merged_model_is_refused(adapters, tmp_path):
    result = run_cli(str(adapters[0]), "--model", str(adapters[1]))
    assert result.exit_code == 2
    assert "this is an adapter, not a merged model: pass it as an ADAPTER argument" in result.output


def test_an_interval_whose_lower_bound_is_zero_is_drawn_to_zero():
    """Old behaviour: a 95% interval [0, 30] was drawn as no interval below the bar (0 read as missing)."""
    from lora_chat.evaluate.report import _bars

    class Axes:
        def bar(self, xs, values, width, yerr, **kwargs):
            self.yerr = yerr

    ax = Axes()
    _bars(ax, [0, 1], [{"value": 10.0, "ci95": [0.0, 30.0]}, {"value": 5.0, "ci95": [None, None]}], 0, 0.2, "m")
    assert ax.yerr == [[10.0, 0.0], [20.0, 0.0]]


# ---------------------------------------------------------------- the judge


class _Judge(BaseHTTPRequestHandler):
    reply = "A"  # content the judge answers; None: not JSON at all
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        if self.reply is None:
            payload = b"<html>not an API</html>"
        else:
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": self.reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    def start(reply: str | None) -> str:
        handler = type("Handler", (_Judge,), {"reply": reply, "requests": []})
        server = HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((server, handler))
        return f"http://127.0.0.1:{server.server_port}/v1"

    servers: list = []
    yield start, servers
    for server, _ in servers:
        server.shutdown()
        server.server_close()


def test_judge_asks_both_orders_so_a_position_biased_judge_gives_ties(adapters, tmp_path, judge_server):
    start, servers = judge_server
    url = start("A")  # always prefers whatever comes first
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    result = run_cli(str(adapters[0]), "--data", str(data), "--judge-url", url, "--judge-model", "judge-1",
                     "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    judge = json.loads((tmp_path / "o" / "report.json").read_text())["models"][1]["judge"]
    assert judge["status"] == "ok" and judge["tie"] == 3 and judge["win_rate"]["value"] == 0.5
    requests = servers[0][1].requests
    assert len(requests) == 6 and {r["path"] for r in requests} == {"/v1/chat/completions"}
    assert {r["model"] for r in requests} == {"judge-1"}


@pytest.mark.parametrize("reply", ["I cannot decide, sorry.", None], ids=["no-verdict", "not-json"])
def test_judge_answering_garbage_fails_alone(adapters, tmp_path, judge_server, reply):
    url = judge_server[0](reply)
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(2))
    result = run_cli(str(adapters[0]), "--data", str(data), "--judge-url", url, "--judge-model", "j",
                     "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "o" / "report.json").read_text())["models"][1]
    assert row["judge"]["status"] == "failed" and row["metrics"]["chrf"]["value"] is not None


def test_unreachable_judge_is_reported_failed_and_every_other_metric_kept(adapters, tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(2))
    result = run_cli(str(adapters[0]), "--data", str(data), "--judge-url", f"http://127.0.0.1:{port}",
                     "--judge-model", "j", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "judge failed" in result.output and "unreachable" in result.output
    row = json.loads((tmp_path / "o" / "report.json").read_text())["models"][1]
    assert row["judge"]["status"] == "failed" and row["loss"]["value"] is not None
