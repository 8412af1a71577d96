"""Sharing adapters: list, show, verify, pack and unpack, each as a user meets it, on a real trained adapter.

One adapter is trained with `lorachat finetune` on the tiny model for the session (conftest's `trained`); each test
works on a copy (`adapter`).
Hostile archives are built here byte by byte with tarfile, as an attacker would.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_chat.adapters.inspect import runtimes
from lora_chat.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def nothing_installed(folder: Path) -> bool:
    """No adapter and no leftover staging folder under `folder`."""
    return not folder.exists() or list(folder.iterdir()) == []


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- hostile archives, built by hand


def build_archive(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with gzip.open(path, "wb") as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_entry(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def adapter_entries(adapter: Path, changes: dict[str, bytes | None] | None = None) -> list:
    """The adapter's own files as archive entries under faq-en/; `changes` replaces (or, with None, drops) some."""
    changes = changes or {}
    entries = []
    for file in sorted(p for p in adapter.rglob("*") if p.is_file()):
        name = file.relative_to(adapter).as_posix()
        data = changes.get(name, file.read_bytes())
        if data is not None:
            entries.append(file_entry(f"faq-en/{name}", data))
    return entries


def special_entry(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


# ---------------------------------------------------------------- verify


def test_verify_passes_a_whole_adapter(adapter):
    result = run("adapters", "verify", str(adapter))
    assert result.exit_code == 0, result.output
    assert "whole" in result.stdout


def test_verify_names_a_changed_byte_in_the_weights(adapter):
    flip_byte(adapter / "adapter_model.safetensors")
    result = run("adapters", "verify", str(adapter))
    assert result.exit_code == 1
    assert "adapter_model.safetensors: sha256 differs from manifest.json" in one_error_line(result)


def test_verify_names_each_missing_and_extra_file(adapter):
    (adapter / "tokenizer.json").unlink()
    (adapter / "notes.txt").write_text("not in the manifest\n")
    result = run("adapters", "verify", str(adapter))
    assert result.exit_code == 1
    assert "tokenizer.json: missing" in result.stderr and "notes.txt: not listed in manifest.json" in result.stderr


def test_verify_finds_an_adapter_by_name_under_adapters(adapter, monkeypatch):
    monkeypatch.chdir(adapter.parent.parent)
    assert run("adapters", "verify", "faq-en").exit_code == 0


# ---------------------------------------------------------------- pack


def test_pack_gives_the_same_bytes_for_the_same_adapter(adapter, tmp_path):
    first = tmp_path / "a.tar.gz"
    assert run("adapters", "pack", str(adapter), "-o", str(first)).exit_code == 0
    moved = Path(shutil.copytree(adapter, tmp_path / "elsewhere" / "faq-en"))  # new inodes, mtimes, maybe modes
    os.utime(moved / "adapter_model.safetensors", (1, 1))
    (moved / "recipe.yaml").chmod(0o600)
    second = tmp_path / "b.tar.gz"
    assert run("adapters", "pack", str(moved), "-o", str(second)).exit_code == 0
    assert first.read_bytes() == second.read_bytes()


def test_pack_sorts_entries_and_fixes_times_owners_and_modes(adapter, tmp_path):
    out = tmp_path / "faq.tar.gz"
    run("adapters", "pack", str(adapter), "-o", str(out))
    with tarfile.open(out) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "faq-en" and names[1:] == sorted(names[1:]) and "faq-en/manifest.json" in names
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(946684800, 0, 0, "", "")}
    assert {m.mode for m in members if m.isfile()} == {0o644}
    assert gzip.open(out).read(1) and out.read_bytes()[4:8] == (946684800).to_bytes(4, "little")


def test_pack_refuses_an_adapter_whose_weights_changed(adapter, tmp_path):
    flip_byte(adapter / "adapter_model.safetensors")
    out = tmp_path / "faq.tar.gz"
    result = run("adapters", "pack", str(adapter), "-o", str(out))
    assert result.exit_code == 2
    assert "adapter_model.safetensors: sha256 differs from manifest.json" in one_error_line(result)
    assert not out.exists() and list(tmp_path.glob(".faq.tar.gz*")) == []


# ---------------------------------------------------------------- unpack


def test_pack_then_unpack_installs_the_same_adapter(adapter, tmp_path):
    archive = tmp_path / "faq.tar.gz"
    run("adapters", "pack", str(adapter), "-o", str(archive))
    result = run("adapters", "unpack", str(archive), "--to", str(tmp_path / "other-machine"))
    assert result.exit_code == 0, result.output
    installed = tmp_path / "other-machine" / "faq-en"
    assert run("adapters", "verify", str(installed)).exit_code == 0
    for file in adapter.iterdir():
        assert (installed / file.name).read_bytes() == file.read_bytes()
    assert [p.name for p in (tmp_path / "other-machine").iterdir()] == ["faq-en"]  # no staging left behind


def test_unpack_keeps_an_existing_adapter_unless_overwrite(adapter, tmp_path):
    archive = tmp_path / "faq.tar.gz"
    run("adapters", "pack", str(adapter), "-o", str(archive))
    target = tmp_path / "dest"
    run("adapters", "unpack", str(archive), "--to", str(target))
    (target / "faq-en" / "local-note.txt").write_text("mine\n")
    kept = run("adapters", "unpack", str(archive), "--to", str(target))
    assert kept.exit_code == 2 and "kept as it is (pass --overwrite" in one_error_line(kept)
    assert (target / "faq-en" / "local-note.txt").exists()
    assert run("adapters", "unpack", str(archive), "--to", str(target), "--overwrite").exit_code == 0
    assert not (target / "faq-en" / "local-note.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == ["faq-en"]


def test_unpack_refuses_a_truncated_archive(adapter, tmp_path):
    archive = tmp_path / "faq.tar.gz"
    run("adapters", "pack", str(adapter), "-o", str(archive))
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    result = run("adapters", "unpack", str(archive), "--to", str(tmp_path / "dest"))
    assert result.exit_code == 2
    assert "not a readable adapter archive (truncated)" in one_error_line(result)
    assert nothing_installed(tmp_path / "dest")


def test_unpack_refuses_a_changed_byte_in_the_weights(adapter, tmp_path):
    weights = bytearray((adapter / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    archive = build_archive(tmp_path / "evil.tar.gz",
                            adapter_entries(adapter, {"adapter_model.safetensors": bytes(weights)}))
    result = run("adapters", "unpack", str(archive), "--to", str(tmp_path / "dest"))
    assert result.exit_code == 2
    assert "adapter_model.safetensors: sha256 differs from manifest.json" in one_error_line(result)
    assert nothing_installed(tmp_path / "dest")


@pytest.mark.parametrize("story, entry, reason", [
    ("path traversal", file_entry("../../x", b"owned\n"), "outside the destination"),
    ("absolute path", file_entry("/tmp/lorachat-absolute-x", b"owned\n"), "absolute path"),
    ("symlink", special_entry("faq-en/link", tarfile.SYMTYPE, "adapter_config.json"), "links are not allowed"),
    ("symlink out", special_entry("faq-en/link", tarfile.SYMTYPE, "/etc/passwd"), "AbsoluteLinkError"),
    ("hard link", special_entry("faq-en/hard", tarfile.LNKTYPE, "faq-en/adapter_config.json"),
     "links are not allowed"),
    ("device", special_entry("faq-en/null", tarfile.CHRTYPE), "SpecialFileError"),
    ("fifo", special_entry("faq-en/pipe", tarfile.FIFOTYPE), "SpecialFileError"),
    ("pickle weights", file_entry("faq-en/adapter_model.bin", b"\x80\x04K\x01."), "pickle weights"),
    ("second top folder", file_entry("other/x.json", b"{}"), "outside the archive's one top folder"),
])
def test_unpack_refuses_a_hostile_entry_and_installs_nothing(adapter, tmp_path, story, entry, reason):
    entries = adapter_entries(adapter)
    archive = build_archive(tmp_path / "evil.tar.gz", [*entries[:3], entry, *entries[3:]])
    dest = tmp_path / "deep" / "er" / "dest"
    result = run("adapters", "unpack", str(archive), "--to", str(dest))
    assert result.exit_code == 2, story
    line = one_error_line(result)
    assert reason in line and "nothing was installed" in line, line
    assert nothing_installed(dest)
    assert not (tmp_path / "deep" / "x").exists() and not Path("/tmp/lorachat-absolute-x").exists()


def test_unpack_refuses_a_file_the_manifest_does_not_list(adapter, tmp_path):
    archive = build_archive(tmp_path / "extra.tar.gz",
                            [*adapter_entries(adapter), file_entry("faq-en/.hidden/run.sh", b"rm -rf ~\n")])
    result = run("adapters", "unpack", str(archive), "--to", str(tmp_path / "dest"))
    assert result.exit_code == 2
    assert ".hidden/run.sh: not listed in manifest.json" in one_error_line(result)
    assert nothing_installed(tmp_path / "dest")


def test_unpack_refuses_an_archive_missing_a_listed_file(adapter, tmp_path):
    archive = build_archive(tmp_path / "short.tar.gz", adapter_entries(adapter, {"tokenizer.json": None}))
    result = run("adapters", "unpack", str(archive), "--to", str(tmp_path / "dest"))
    assert result.exit_code == 2
    assert "tokenizer.json: missing" in one_error_line(result)
    assert nothing_installed(tmp_path / "dest")


def test_unpack_stops_a_decompression_bomb_by_counting_bytes(adapter, tmp_path):
    """The file entries are small; a 4 MB PAX header (zeros, compressing to a few KB) is what expands."""
    info, data = file_entry("faq-en/README.md", b"hi\n")
    info.pax_headers = {"comment": "0" * (4 << 20)}
    archive = build_archive(tmp_path / "bomb.tar.gz", [(info, data)])
    assert archive.stat().st_size < 64 << 10
    result = run("adapters", "unpack", str(archive), "--to", str(tmp_path / "dest"), "--max-size", "1M")
    assert result.exit_code == 2
    assert "expands past 1.0 MiB" in one_error_line(result)
    assert nothing_installed(tmp_path / "dest")


# ---------------------------------------------------------------- list and show


def test_list_shows_each_adapter_with_base_domain_variant_and_eval_loss(adapter):
    metrics = json.loads((adapter / "metrics.json").read_text())
    result = run("adapters", "list", str(adapter.parent), "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (row["name"], row["domain"], row["language"], row["variant"], row["rank"]) == \
        ("faq-en", "construction", "en", "lora", 16)
    assert row["eval_loss"] == metrics["eval"]["loss"] and row["size_bytes"] > 60_000 and row["has_manifest"]
    table = run("adapters", "list", str(adapter.parent))
    assert "faq-en" in table.stdout and "lora r16" in table.stdout


def test_list_skips_staging_folders_and_marks_adapters_without_manifest(adapter):
    plain = Path(shutil.copytree(adapter, adapter.parent / "plain-peft"))
    (plain / "manifest.json").unlink()
    (adapter.parent / ".faq-en.tmp-123").mkdir()
    rows = json.loads(run("adapters", "list", str(adapter.parent), "--json").stdout)
    assert [(r["name"], r["has_manifest"]) for r in rows] == [("faq-en", True), ("plain-peft", False)]


def test_show_prints_base_data_results_and_runtimes(adapter, tiny_base):
    result = run("adapters", "show", str(adapter))
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert str(tiny_base) in text and "LlamaForCausalLM" in text and "train.jsonl" in text
    for runtime in ("PEFT yes", "vLLM yes", "llama.cpp yes"):
        assert runtime in text
    facts = json.loads(run("adapters", "show", str(adapter), "--json").stdout)
    assert facts["data"][0]["sha256"] and facts["files"]["adapter_model.safetensors"]


def test_runtimes_say_why_dora_and_modules_to_save_do_not_load_in_vllm_or_llama_cpp(adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(use_dora=True, modules_to_save=["lm_head"], trainable_token_indices=[5])
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    found = {r.name: r for r in runtimes(adapter)}
    assert found["PEFT"].loads
    assert not found["vLLM"].loads and "DoRA" in found["vLLM"].reason and "trainable token" in found["vLLM"].reason
    assert not found["llama.cpp"].loads and "modules_to_save ['lm_head']" in found["llama.cpp"].reason
