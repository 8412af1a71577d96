"""`lorachat adapters push` and `pull` against the hub's HTTP API.

The Hugging Face hub cannot be reached from the test machines, so it is mocked at the transport level: `fake_hub`
serves the hub's endpoints on 127.0.0.1 with the hub's request and response shapes, and huggingface_hub's own client
talks to it over a real socket (HF_ENDPOINT). Xet storage is switched off (HF_HUB_DISABLE_XET) so uploads take
the hub's LFS protocol, which the fake speaks; everything else is the library's normal path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fake_hub import FakeHub
from lora_chat.cli import main

TOKEN = "hf_lorachatTestTokenNeverShown"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake hub on loopback, with the token in HF_TOKEN and the hub switched on for this test only."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def run(*args: str):
    return CliRunner().invoke(main, ["adapters", *args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_then_pull_gives_the_same_verified_adapter(hub, trained, tmp_path):
    pushed = run("push", str(trained), "--repo", "user/faq-en")
    assert pushed.exit_code == 0, pushed.output
    assert set(hub.repos["user/faq-en"].files) == set(files_of(trained))
    pulled = run("pull", "user/faq-en", "--to", str(tmp_path / "machine-b"))
    assert pulled.exit_code == 0, pulled.output
    assert files_of(tmp_path / "machine-b" / "faq-en") == files_of(trained)
    assert run("verify", str(tmp_path / "machine-b" / "faq-en")).exit_code == 0


def test_push_sends_a_hub_card_with_adapter_metadata(hub, trained):
    assert run("push", str(trained), "--repo", "user/faq-en", "--private").exit_code == 0
    meta = yaml.safe_load(hub.cards[0].split("---")[1])
    assert meta["base_model"] == json.loads((trained / "manifest.json").read_text())["base"]["model_id"]
    assert (meta["base_model_relation"], meta["library_name"], meta["pipeline_tag"]) == \
        ("adapter", "peft", "text-generation")
    assert "lorachat" in meta["tags"] and meta["language"] == ["en"] and meta["datasets"] == ["train.jsonl"]
    assert meta["model-index"][0]["results"] and "license" in meta
    assert hub.repos["user/faq-en"].private


def test_push_to_a_branch_creates_it_and_commits_there(hub, trained):
    assert run("push", str(trained), "--repo", "user/faq-en", "--revision", "v1").exit_code == 0
    posts = [path for method, path, _ in hub.requests if method == "POST"]
    assert "/api/models/user/faq-en/branch/v1" in posts and "/api/models/user/faq-en/commit/v1" in posts


def test_the_token_is_sent_to_the_hub_but_never_printed_or_written(hub, trained, tmp_path):
    pushed = run("push", str(trained), "--repo", "user/faq-en")
    pulled = run("pull", "user/faq-en", "--to", str(tmp_path / "b"))
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for _, path, headers in hub.requests
               if not path.startswith("/lfs-upload/"))  # LFS uploads go to a pre-signed URL
    assert TOKEN not in pushed.output + pulled.output
    assert all(TOKEN.encode() not in data for data in files_of(tmp_path / "b").values())
    assert all(TOKEN.encode() not in data for data in files_of(trained).values())


def test_pull_refuses_a_repo_whose_weights_are_a_pickle(hub, trained, tmp_path):
    files = files_of(trained)
    del files["adapter_model.safetensors"], files["manifest.json"]
    hub.add_repo("someone/pickled", {**files, "adapter_model.bin": b"\x80\x04\x95 pickle that runs code"})
    result = run("pull", "someone/pickled", "--to", str(tmp_path / "dest"))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "adapter_model.bin" in line and "--allow-pickle" in line
    assert not (tmp_path / "dest").exists() or list((tmp_path / "dest").iterdir()) == []
    assert not any("adapter_model.bin" in path for method, path, _ in hub.requests if method == "GET")


def test_pull_with_allow_pickle_downloads_the_pickle_and_says_so(hub, trained, tmp_path):
    files = files_of(trained)
    del files["adapter_model.safetensors"], files["manifest.json"]
    hub.add_repo("someone/pickled", {**files, "adapter_model.bin": b"\x80\x04\x95 pickle that runs code"})
    result = run("pull", "someone/pickled", "--to", str(tmp_path / "dest"), "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert "downloaded pickle files because of --allow-pickle: adapter_model.bin" in result.stderr
    assert (tmp_path / "dest" / "pickled" / "adapter_model.bin").is_file()


def test_pull_skips_pickles_that_sit_beside_safetensors_weights(hub, trained, tmp_path):
    files = files_of(trained)
    del files["manifest.json"]
    hub.add_repo("someone/both", {**files, "adapter_model.bin": b"\x80\x04\x95 pickle"})
    result = run("pull", "someone/both", "--to", str(tmp_path / "dest"))
    assert result.exit_code == 0, result.output
    assert "skipped pickle files" in result.stderr and not (tmp_path / "dest" / "both" / "adapter_model.bin").exists()


def test_pull_accepts_a_plain_peft_adapter_and_writes_its_manifest(hub, trained, tmp_path, tiny_base):
    plain = {name: data for name, data in files_of(trained).items()
             if name in ("adapter_config.json", "adapter_model.safetensors", "README.md")}
    hub.add_repo("someone/plain", plain)
    result = run("pull", "someone/plain", "--to", str(tmp_path / "dest"))
    assert result.exit_code == 0, result.output
    assert "warning: someone/plain has no manifest.json" in result.stderr
    manifest = json.loads((tmp_path / "dest" / "plain" / "manifest.json").read_text())
    assert manifest["base"]["model_id"] == str(tiny_base) and manifest["origin"]["hub"] == "someone/plain"
    assert run("verify", str(tmp_path / "dest" / "plain")).exit_code == 0


def test_pull_refuses_a_repo_whose_files_do_not_match_its_manifest(hub, trained, tmp_path):
    files = files_of(trained)
    weights = bytearray(files["adapter_model.safetensors"])
    weights[-1] ^= 0x01
    hub.add_repo("someone/tampered", {**files, "adapter_model.safetensors": bytes(weights)})
    result = run("pull", "someone/tampered", "--to", str(tmp_path / "dest"))
    assert result.exit_code == 2
    assert "adapter_model.safetensors: sha256 differs from manifest.json" in one_error_line(result)
    assert list((tmp_path / "dest").iterdir()) == []


def test_pull_keeps_an_existing_adapter_unless_overwrite(hub, trained, tmp_path):
    run("push", str(trained), "--repo", "user/faq-en")
    dest = tmp_path / "dest"
    shutil.copytree(trained, dest / "faq-en")
    (dest / "faq-en" / "mine.txt").write_text("local\n")
    result = run("pull", "user/faq-en", "--to", str(dest))
    assert result.exit_code == 2 and "kept as it is" in one_error_line(result)
    assert (dest / "faq-en" / "mine.txt").exists()
    assert run("pull", "user/faq-en", "--to", str(dest), "--overwrite").exit_code == 0
    assert not (dest / "faq-en" / "mine.txt").exists()


@pytest.mark.parametrize("status, message", [
    (401, "the hub refused the token (401)"),
    (404, "no such repository on the hub, or no access to it with this token (404)"),
    (500, "the hub answered 500"),
    ("stall", "the hub did not answer in time (timeout)"),
])
def test_pull_turns_a_hub_failure_into_one_line_and_installs_nothing(hub, trained, tmp_path, status, message):
    run("push", str(trained), "--repo", "user/faq-en")
    hub.fail = (status, "/api/models/")
    result = run("pull", "user/faq-en", "--to", str(tmp_path / "dest"), "--timeout", "0.5")
    assert result.exit_code == 2
    assert message in one_error_line(result) and "Traceback" not in result.output
    assert not (tmp_path / "dest").exists() or list((tmp_path / "dest").iterdir()) == []


def test_pull_failing_halfway_through_the_downloads_installs_nothing(hub, trained, tmp_path):
    run("push", str(trained), "--repo", "user/faq-en")
    hub.fail = (404, "/user/faq-en/resolve/")  # the listing works, the files do not
    result = run("pull", "user/faq-en", "--to", str(tmp_path / "dest"))
    assert result.exit_code == 2, result.output
    assert "404" in one_error_line(result)
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.parametrize("status, message", [
    (401, "the hub refused the token (401)"),
    (500, "the hub answered 500"),
    ("stall", "the hub did not answer in time (timeout)"),
])
def test_push_turns_a_hub_failure_into_one_line(hub, trained, status, message):
    hub.fail = (status, "/api/repos/create")
    result = run("push", str(trained), "--repo", "user/faq-en", "--timeout", "0.5")
    assert result.exit_code == 2
    assert message in one_error_line(result) and TOKEN not in result.output
    assert "user/faq-en" not in hub.repos


def test_push_without_a_token_says_how_to_log_in(hub, trained, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = run("push", str(trained), "--repo", "user/faq-en")
    assert result.exit_code == 2
    assert "no Hugging Face token: run `hf auth login` or set HF_TOKEN" in one_error_line(result)
    assert hub.requests == []


def test_push_refuses_an_adapter_that_is_not_whole(hub, trained, tmp_path):
    copy = Path(shutil.copytree(trained, tmp_path / "faq-en"))
    (copy / "recipe.yaml").write_text("changed\n")
    result = run("push", str(copy), "--repo", "user/faq-en")
    assert result.exit_code == 2 and "not whole, not pushed" in one_error_line(result)
    assert hub.requests == []


def test_offline_mode_is_one_line_not_a_network_attempt(trained, tmp_path):
    result = run("pull", "user/faq-en", "--to", str(tmp_path / "dest"))  # HF_HUB_OFFLINE=1 from conftest
    assert result.exit_code == 2 and "HF_HUB_OFFLINE=1" in one_error_line(result)
