"""The conventions every command follows: exit codes, --json, one-line errors, --model."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from longcat_tools.checkpoint.layouts import ENV_MODEL, resolve_model
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError, UsageError


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "longcat_tools", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, **(env or {})})


def test_version_and_help():
    p = run_cli("--version")
    assert p.returncode == 0 and p.stdout.startswith("longcat-tools ")
    p = run_cli("--help")
    assert p.returncode == 0
    for cmd in ("synth", "demo"):
        assert cmd in p.stdout


def test_the_command_line_starts_without_torch():
    """Parsing and help import no torch (1.5 s here): torch loads with the command that needs
    it. A module-level import of ``kernels`` from the CLI's modules once broke this."""
    code = "import sys, longcat_tools.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("args", [["nope"], ["synth"], ["synth", "x", "--preset", "huge"],
                                  ["synth", "x", "--depth", "0"]])
def test_usage_errors_exit_2(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "rror" in err and "Traceback" not in err  # click's "Error:" or our "error:"


def test_bad_input_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "taken").mkdir()
    p = run_cli("synth", str(tmp_path / "taken"))
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--force" in lines[0]
    assert str(tmp_path / "taken") in lines[0]


def main_in_a_fresh_python(argvs: list[list[str]], modules: list[str]):
    """Each argv through ``main`` in one new interpreter: (exit codes, whether each of
    ``modules`` was imported by then, stderr)."""
    code = ("import sys; from longcat_tools.cli import main; "
            f"codes = [main(a) for a in {argvs!r}]; "
            f"print(*codes, *[m in sys.modules for m in {modules!r}])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    out = p.stdout.split()
    assert len(out) == len(argvs) + len(modules), p.stderr
    return [int(c) for c in out[:len(argvs)]], out[len(argvs):], p.stderr


def test_a_bad_run_option_fails_before_the_runner_imports(tiny_native, tmp_path):
    """Options are checked before diffusers and the pipeline load (seconds of imports)."""
    codes, loaded, err = main_in_a_fresh_python(
        [["run", "-m", str(tiny_native), "--frames", "3", "--out", str(tmp_path / "x.mp4")]],
        ["diffusers", "longcat_tools.runner.pipeline"])
    assert codes == [2] and loaded == ["False", "False"], err
    assert err.strip().startswith("error: --frames 3: must be 4k+1")
    assert not (tmp_path / "x.mp4").exists()


def test_header_level_verify_does_not_import_torch(tiny_native, tmp_path):
    """The CI gate answers without torch's seconds of import, for a pass and a bad path."""
    codes, loaded, err = main_in_a_fresh_python(
        [["verify", str(tiny_native), "-q"], ["verify", str(tmp_path / "missing")]], ["torch"])
    assert codes == [0, 2] and loaded == ["False"], err
    assert "no such file or folder" in err


def test_verbose_adds_the_traceback(tmp_path):
    (tmp_path / "taken").mkdir()
    p = run_cli("synth", str(tmp_path / "taken"), "-v")
    assert p.returncode == 1 and "Traceback" in p.stderr


def test_json_output_is_one_document_on_stdout(tmp_path):
    p = run_cli("synth", str(tmp_path / "c"), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["layout"] == "native" and doc["preset"] == "tiny"


@pytest.mark.parametrize("argv,says", [
    (["run", "--ckpt", "x"], "No such option: --ckpt (Possible options: --cp) (see "
                             "'longcat-tools run --help')"),
    (["convert", "--src", "x"], "Missing option '--dst' (see 'longcat-tools convert --help')"),
    (["run", "--steps", "x"], "Invalid value for '--steps'"),
    (["dance"], "No such command 'dance' (see 'longcat-tools --help')"),
])
def test_a_usage_error_is_one_line_and_exit_2(capsys, argv, says):
    """Click printed usage, a hint and the message over four lines."""
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and says in line, line


@pytest.mark.parametrize("argv,says", [
    (["lora", "attach", "{missing}.safetensors", "--name", "x", "-m", "{ckpt}"],
     "no such LoRA file"),
    (["compare", "{file}"], "not a folder"),
    (["bsa", "status", "-m", "{file}"], "not a folder"),
    (["synth", "{missing}/a", "--model", "avatar-1.5", "-q"], "parent folder does not exist"),
    (["run", "-m", "{ckpt}", "--frames", "9", "--task", "i2v", "--image", "{missing}.png"],
     "no such file"),
    (["verify", "{ckpt}", "--manifest", "{missing}.json"], "no such hub manifest"),  # was 1
    (["verify", "{ckpt}", "--checksums", "{missing}.sha256"], "no such checksum file"),
    (["verify", "{ckpt}", "--checksums", "{ckpt}"], "a folder; give the checksum file itself"),
    (["verify", "{ckpt}", "--manifest", "{ckpt}"], "a folder; give the hub manifest itself"),
])
def test_a_path_that_names_nothing_is_exit_2_in_every_command(tiny_native, tmp_path, capsys,
                                                               argv, says):
    """The same mistake gave exit 1 in some commands and 2 in others."""
    (tmp_path / "f.txt").write_text("x")
    names = {"missing": tmp_path / "missing", "file": tmp_path / "f.txt", "ckpt": tiny_native}
    assert main([a.format(**names) for a in argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert says in line, line


EMPTY_PATH_CASES = [
    ["compare", ""], ["compare", "{tmp}", "-o", ""], ["lora", "attach", "", "--name", "x"],
    ["lora", "attach", "{tmp}/a.safetensors", "--name", "x", "--adapter-config", ""],
    ["lora", "export", "distilled", "--format", "peft", "--out", ""],
    ["lora", "fuse", "distilled", "--dst", ""], ["verify", ""], ["verify", "--checksums", ""],
    ["verify", "--manifest", ""], ["verify", "--forward", "--against", ""],
    ["convert", "--src", "", "--dst", "{tmp}/x"], ["convert", "--src", "{ckpt}", "--dst", ""],
    ["synth", ""], ["demo", "--out", ""], ["download", "org/name", "--dst", ""],
    ["hub-manifest", "org/name", "--out", ""], ["bsa", "status", "-m", ""],
    ["run", "-m", "", "--prompt", "a"], ["run", "--prompts", ""], ["run", "--out-dir", "",
                                                                   "--prompts", "p.txt"],
    ["run", "--task", "at2v", "--prompt", "a", "--audio", ""],
    ["run", "--task", "i2v", "--prompt", "a", "--image", ""],
    ["run", "--task", "vc", "--prompt", "a", "--video", ""], ["run", "--prompt", "a", "-o", ""],
    ["run", "--prompt", "a", "--save-latents", ""], ["run", "--prompt", "a", "--latents-in", ""],
]


@pytest.mark.parametrize("argv", EMPTY_PATH_CASES, ids=lambda a: " ".join(a[:3]))
def test_an_empty_path_is_refused_in_every_command(tiny_native, tmp_path, monkeypatch, capsys,
                                                    argv):
    """'' became '.' (typer's Path, or Path('') in the library): `compare ''` read the current
    folder, `run --image ''` ran t2v, `-m ''` took $LONGCAT_TOOLS_MODEL without a word."""
    monkeypatch.setenv(ENV_MODEL, str(tiny_native))
    monkeypatch.chdir(tmp_path)
    names = {"tmp": tmp_path, "ckpt": tiny_native}
    assert main([a.format(**names) for a in argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "an empty path" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_empty_path_in_a_prompt_line_or_the_api_is_refused(tiny_native, tmp_path,
                                                              monkeypatch):
    from longcat_tools.runner import load_pipeline, matrix, settings
    from longcat_tools.runner.avatar_pipeline import LongCatVideoAvatarPipeline
    from longcat_tools.verify import verify

    prompts = tmp_path / "p.jsonl"
    for key in ("image", "video", "out"):
        prompts.write_text(json.dumps({"prompt": "a", key: ""}) + "\n")
        with pytest.raises(LongcatError, match=f"line 1: '{key}': an empty path"):
            matrix.read_prompts(prompts)
    for field, value in (("image", ""), ("video", ""), ("out", ""), ("save_latents", ""),
                         ("latents_in", ""), ("audio", ["a.wav", ""])):
        s = settings.RunSettings(task="i2v", prompt="a", model=str(tiny_native), **{field: value})
        with pytest.raises(UsageError, match="an empty path"):
            settings.validate(s)
    monkeypatch.chdir(tiny_native)  # '' read the checkpoint in the current folder
    for call, what in ((lambda: resolve_model(""), "--model"), (lambda: verify(""), "verify"),
                       (lambda: load_pipeline(""), "checkpoint"),
                       (lambda: LongCatVideoAvatarPipeline.from_pretrained(""), "checkpoint")):
        with pytest.raises(UsageError, match=f"^{what}: an empty path"):
            call()


def test_under_json_a_failure_is_one_document_on_stdout_too(tiny_native, tmp_path, capsys):
    """A program reading stdout as JSON gets the error as JSON; a check that failed after
    printing its result (verify) adds no second document."""
    for argv, code in ((["synth", str(tmp_path / "taken")], 1), (["verify", "--bogus"], 2),
                       (["verify", str(tmp_path / "missing")], 2)):
        (tmp_path / "taken").mkdir(exist_ok=True)
        assert main([*argv, "--json"]) == code
        out = capsys.readouterr()
        doc = json.loads(out.out)
        assert doc["exit_code"] == code and doc["error"], out
        assert out.err.strip()  # the line for people is still there
        assert main(argv) == code and capsys.readouterr().out == ""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_native, broken)
    (broken / "scheduler" / "scheduler_config.json").unlink()
    assert main(["verify", str(broken), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and "error" not in doc


def test_a_rank_that_a_launcher_speaks_for_prints_no_error_document(tiny_native, tmp_path,
                                                                     monkeypatch, capsys):
    """`run --gpus N` starts N copies of the command line: only rank 0 may answer in JSON."""
    argv = ["run", "-m", str(tiny_native), "--frames", "3", "--out", str(tmp_path / "x.mp4"),
            "--json"]
    for rank, documents in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 2
        out = capsys.readouterr().out
        if documents:
            assert json.loads(out)["error"].startswith("--frames 3: must be 4k+1")
        else:
            assert out == ""


def test_an_error_under_a_progress_bar_starts_its_own_line(tiny_native, monkeypatch, capsys):
    """An exception that leaves a bar open (a step loop) printed its line after the bar's."""
    import tqdm

    import longcat_tools.verify

    def fails_midway(*_a, **_k):
        bar = tqdm.tqdm(total=10, desc="steps", file=sys.stderr, leave=False)
        bar.update(3)
        raise LongcatError("the step failed")

    monkeypatch.setattr(longcat_tools.verify, "verify", fails_midway)
    assert main(["verify", str(tiny_native)]) == 1
    err = capsys.readouterr().err
    assert err.split("\r")[-1].lstrip() == "error: the step failed\n", repr(err)
    assert not tqdm.tqdm._instances


def test_an_error_document_into_a_closed_stdout_is_no_traceback(tmp_path, monkeypatch, capsys):
    class Closed:
        def write(self, _):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    (tmp_path / "taken").mkdir()
    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["synth", str(tmp_path / "taken"), "--json"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("args, option", [
    (["run", "--guidance", "1_0"], "--guidance"),
    (["run", "--seed", "1_000"], "--seed"),
    (["lora", "fuse", "distilled", "--dst", "x", "--scale", "1_0"], "--scale"),
    (["lora", "attach", "f.safetensors", "--name", "s", "--scale", "1_0"], "--scale"),
])
def test_numbers_with_underscores_are_refused(capsys, args, option):
    """Python reads '1_0' as 10: a scale or a guidance typed so ran ten times too strong."""
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"Invalid value for '{option}'" in line and "not a plain number" in line, line


def test_ctrl_c_in_a_command_is_one_line_exit_130(tmp_path, monkeypatch, capsys):
    import longcat_tools.synth

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(longcat_tools.synth, "synth", interrupted)
    assert main(["synth", str(tmp_path / "c"), "--json"]) == 130
    out = capsys.readouterr()
    assert json.loads(out.out) == {"error": "interrupted", "exit_code": 130}
    assert out.err.strip() == "interrupted"
    assert main(["synth", str(tmp_path / "c")]) == 130 and capsys.readouterr().out == ""


def test_quiet_prints_nothing(tmp_path):
    p = run_cli("synth", str(tmp_path / "c"), "-q")
    assert p.returncode == 0 and p.stdout == ""


def test_model_resolution(tmp_path, monkeypatch, tiny_native):
    assert resolve_model("somewhere") == tmp_path.__class__("somewhere")
    monkeypatch.setenv(ENV_MODEL, str(tiny_native))
    assert resolve_model(None) == tiny_native
    monkeypatch.delenv(ENV_MODEL)
    monkeypatch.chdir(tiny_native)
    assert resolve_model(None) == tiny_native
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="--model"):
        resolve_model(None)
    monkeypatch.chdir(tiny_native)  # set but empty: it took the current folder's checkpoint
    monkeypatch.setenv(ENV_MODEL, "")
    with pytest.raises(UsageError, match=f"{ENV_MODEL}: an empty path"):
        resolve_model(None)


def test_demo_runs_the_chain(tmp_path):
    stale = tmp_path / "demo" / "videos" / "t2v.mp4.json"  # a sidecar of another t2v.mp4
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    p = run_cli("demo", "--out", str(tmp_path / "demo"), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    names = [s["name"] for s in doc["steps"]]
    assert names[:2] == ["synth", "inspect"]
    assert (tmp_path / "demo" / "tiny-native" / "dit" / "config.json").is_file()
    assert (tmp_path / "demo" / "videos" / "t2v.mp4").is_file() and not stale.exists()


def test_demo_refuses_a_file_or_a_checkpoint_for_its_folder(tiny_native, tmp_path, capsys):
    (tmp_path / "f.png").write_bytes(b"x")
    for out, says in ((tmp_path / "f.png", "is not a folder"),
                      (tiny_native / "d", "inside the checkpoint"),
                      (tmp_path / "no" / "d", "parent folder does not exist"),
                      ("", "an empty path"), (".", "name the output itself"),
                      ("/proc/demo", "cannot make the folder")):
        assert main(["demo", "--out", str(out), "-q"]) == 2
        err = capsys.readouterr().err
        assert says in err and "internal error" not in err
    assert not (tiny_native / "d").exists()


@pytest.mark.parametrize("code, says, exit_code", [
    ("ENOSPC", "the disk (or quota) filled while writing", 1),
    ("EDQUOT", "the disk (or quota) filled while writing", 1),
    ("EROFS", "on a read-only file system", 2)])
def test_a_full_disk_or_read_only_file_system_is_one_line(tiny_native, tmp_path, monkeypatch,
                                                          capsys, code, says, exit_code):
    """A full disk was "internal error: OSError: [Errno 28] No space left on device"."""
    import errno

    from longcat_tools import convert as conv

    def full(*_a, **_k):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)),
                      str(tmp_path / "out.partial" / "transformer"))

    monkeypatch.setattr(conv, "execute", full)
    assert main(["convert", "--src", str(tiny_native), "--dst", str(tmp_path / "out"),
                 "-q"]) == exit_code
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {tmp_path / 'out.partial' / 'transformer'}: {says}"), line
