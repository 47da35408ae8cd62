import subprocess
import sys


def test_help_lists_the_verbs(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for verb in ("train", "merge", "sample", "inspect", "demo"):
        assert verb in out


def test_cli_import_does_not_load_torch():
    # --help must be instant: heavy libraries are imported inside commands only.
    probe = "import sys, loratool.cli; print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("loratool ")


def test_demo_bad_concept_is_one_line(cli, tmp_path):
    code, _, err = cli("demo", "--concept", "shape", "-o", tmp_path / "d")
    assert code == 1 and "--concept" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
    code, _, err = cli("demo", "--lora-start", "1.5", "-o", tmp_path / "d")
    assert code == 1 and "--lora-start" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_debug_env_shows_traceback(monkeypatch):
    from typer.testing import CliRunner

    from loratool.cli import app
    from loratool.errors import LoraFileError

    monkeypatch.setenv("LORATOOL_DEBUG", "1")
    result = CliRunner().invoke(app, ["inspect", "missing.safetensors"])
    assert isinstance(result.exception, LoraFileError)
