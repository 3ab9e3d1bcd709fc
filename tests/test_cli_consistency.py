"""What one command writes or promises, the others read alike (from a user trial of convert,
verify, lora and synth)."""

from __future__ import annotations

import json

from longcat_tools.cli import main
from longcat_tools.convert import ENV_FREE_BYTES


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_convert_counts_every_file_its_manifest_lists(capsys, tiny_native, tmp_path):
    """lora/adapters.json was listed in checksums.sha256 but not counted."""
    out = tmp_path / "c"
    rc, stdout, err = run(capsys, "convert", "--src", str(tiny_native), "--dst", str(out),
                          "--json")
    assert rc == 0, err
    doc = json.loads(stdout)
    listed = (out / "checksums.sha256").read_text().splitlines()
    assert doc["checksummed_files"] == doc["files_written"] == len(listed)
    assert any(line.endswith("lora/adapters.json") for line in listed)


def test_a_comfy_folder_is_a_checkpoint_to_the_other_commands(capsys, tiny_native, tmp_path):
    """convert wrote a whole checkpoint inside the folder --to comfy made, and verify still
    passed it; given as --src, the folder was 'not a checkpoint' without naming its file."""
    comfy = tmp_path / "comfy"
    assert run(capsys, "convert", "--src", str(tiny_native), "--dst", str(comfy), "--to",
               "comfy", "--dtype", "bf16", "-q")[0] == 0
    rc, _, err = run(capsys, "convert", "--src", str(comfy / "diffusion_model.safetensors"),
                     "--dst", str(comfy / "out"), "-q")
    assert rc == 2 and f"inside the checkpoint {comfy}" in err
    assert not (comfy / "out").exists()
    rc, _, err = run(capsys, "convert", "--src", str(comfy), "--dst", str(tmp_path / "x"), "-q")
    assert rc == 1 and f"pass {comfy / 'diffusion_model.safetensors'}" in err


def test_lora_list_flags_the_rank_verify_fails(capsys, tiny_native, tmp_path):
    """A registry entry whose rank is not the file's: verify failed it, list said ok."""
    out = tmp_path / "c"
    assert run(capsys, "convert", "--src", str(tiny_native), "--dst", str(out), "-q")[0] == 0
    reg = out / "lora" / "adapters.json"
    doc = json.loads(reg.read_text())
    doc["adapters"][0]["rank"] = 99
    reg.write_text(json.dumps(doc))
    rc, _, err = run(capsys, "lora", "list", "-m", str(out), "-q")
    assert rc == 1 and "registry says rank 99, the file has [" in err
    assert run(capsys, "verify", str(out), "-q")[0] == 1


def test_synth_records_the_text_encoders_stored_dtype(capsys, tmp_path):
    assert run(capsys, "synth", str(tmp_path / "b"), "--dtype", "bf16", "-q")[0] == 0
    cfg = json.loads((tmp_path / "b" / "text_encoder" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"  # said float32 over bf16 weights


def test_a_bad_free_bytes_variable_is_one_line(capsys, tiny_native, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_FREE_BYTES, "abc")  # was an internal error
    rc, _, err = run(capsys, "convert", "--src", str(tiny_native), "--dst", str(tmp_path / "c"))
    assert rc == 2 and f"${ENV_FREE_BYTES}='abc': a whole number of bytes" in err
