"""`lorachat eval`: metrics, intervals, masked loss, batched generation, judge and reports on the tiny model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import CHATML, chat, sample_rows, write_jsonl
from lora_chat.cli import main
from lora_chat.evaluate import metrics, stats


def build_adapter(root: Path, name: str, base: Path, rows: list[dict], seed: int, facts: dict | None = None) -> Path:
    """An adapter directory as `lorachat finetune` writes it, with LoRA weights perturbed away from zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_chat.models import model_facts, resolve_base

    out = root / name
    data = write_jsonl(root / f"{name}-train.jsonl", rows)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.5)  # lora_B starts at zero: without this the adapter IS the base
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    recipe = {"name": name, "base": {"model": str(base), "dtype": "float32"},
              "data": {"train": [{"path": str(data)}], "eval": {"split": 0.25}, "max_length": 128},
              "training": {"seed": 42}, "output": {"dir": str(out), "domain": "construction", "language": "en"}}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    facts = facts or {"model_id": str(base), **model_facts(resolve_base(str(base)))}
    (out / "README.md").write_text(f"---\nlibrary_name: peft\nbase_model: {base}\n---\n\n# {name}\n", encoding="utf-8")
    # Written last, as `adapters.finish` does: a folder with a manifest is whole.
    (out / "manifest.json").write_text(json.dumps({"format": 1, "name": name, "base": facts}), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    faq = build_adapter(root, "faq-en", tiny_base, sample_rows(12), seed=1)
    hello = [chat(f"Hello {i}!", f"Hello! How can I help you today? ({i})") for i in range(12)]
    return faq, build_adapter(root, "hello-en", tiny_base, hello, seed=2)


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
def tiny(tiny_base):
    from transformers import AutoModelForCausalLM

    from lora_chat.models import load_tokenizer, resolve_base
    from lora_chat.templates import ChatTemplate

    tokenizer = load_tokenizer(resolve_base(str(tiny_base)))
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    return model, tokenizer, ChatTemplate(CHATML, tokenizer, "chatml")


def test_batched_loss_equals_the_models_own_loss_per_sample(tiny):
    """Padding and batching change nothing: each sample's loss is what HF computes on it alone."""
    import torch

    from lora_chat.data.formats import to_conversation
    from lora_chat.errors import Where
    from lora_chat.evaluate.loss import sample_losses

    model, tokenizer, template = tiny
    rows = [chat("Hi", "Hello!"), chat("How long does a building permit take?", "Ten weeks, by statute.")]
    encoded = [template.encode(to_conversation(r, "messages", Where("x", i))) for i, r in enumerate(rows)]
    got = sample_losses(model, encoded, tokenizer.pad_token_id, batch_size=2)
    for (nll, count), e in zip(got, encoded):
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
        assert count == e.trained
        assert nll / count == pytest.approx(float(expected), rel=1e-4)


def test_batched_greedy_generation_matches_one_prompt_at_a_time(tiny):
    from lora_chat.evaluate.generate import Decoding, generate_batched

    model, tokenizer, _ = tiny
    prompts = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
               for q in ("Hi", "How long does a building permit take in the municipality?", "Vad är bygglov?")]
    batched = generate_batched(model, tokenizer, prompts, Decoding(max_new_tokens=8, batch_size=3))
    single = [generate_batched(model, tokenizer, [p], Decoding(max_new_tokens=8, batch_size=1))[0] for p in prompts]
    assert batched == single


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
    assert page.count("data:image/png;base64,") == 2
    assert "src=\"http" not in page and "<script" not in page


def test_eval_summary_goes_into_the_adapters_metrics_and_model_card(adapters, tmp_path):
    run_cli(str(adapters[0]), "--out", str(tmp_path))
    summary = json.loads((adapters[0] / "metrics.json").read_text())["eval"]
    assert summary["perplexity"] > 1 and len(summary["ci95"]["perplexity"]) == 2
    assert set(summary["by_dataset"]) == {"faq-en:eval"}
    card = (adapters[0] / "README.md").read_text()
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


def test_adapter_from_another_base_fails_in_one_line_before_weights_load(adapters, tiny_base, tmp_path, monkeypatch):
    from lora_chat.evaluate import run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    other = build_adapter(tmp_path, "other", tiny_base, sample_rows(4), seed=3,
                          facts={"model_id": "other/model", "architecture": "LlamaForCausalLM", "hidden_size": 4096})
    result = run_cli(str(other), "--base", str(tiny_base))
    assert result.exit_code == 2
    assert "hidden_size" in result.output and len(result.output.strip().splitlines()) == 1


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
