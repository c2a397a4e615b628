"""Input guarantees (issue 14): serve never opens a reachable server without a key by accident, flag typos are
errors, validation rejects non-finite numbers, bad files get one-line errors, pkg:// paths import nothing.
Each test reproduces a case that 84acf48 got wrong."""

import json
import sys

import pytest
import yaml
from helpers import tiny_llama

from pipeline.cli import main as cli_main


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    d = tmp_path_factory.mktemp("merged")
    tiny_llama().save_pretrained(d)
    return d


def serve(merged, *extra):
    return cli_main(["serve", "--model", str(merged), "--dry-run", *extra])


def test_serve_refuses_an_open_server_on_a_reachable_host(merged, capsys):
    assert serve(merged, "--host", "0.0.0.0") == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "--insecure" in err
    assert serve(merged, "--host", "0.0.0.0", "--api-key", "K") == 0
    assert serve(merged, "--host", "0.0.0.0", "--insecure") == 0
    assert serve(merged, "--host", "127.0.0.1") == 0 and serve(merged, "--host", "::1") == 0


def test_a_mistyped_flag_is_an_error_not_an_open_server(merged, capsys):
    assert serve(merged, "--host", "0.0.0.0", "--api_key", "K") == 2
    assert "unrecognized arguments: --api_key (did you mean --api-key?)" in capsys.readouterr().err


def test_abbreviated_flags_are_errors(tmp_path, capsys):
    assert cli_main(["merge", "--adapter", str(tmp_path), "--overw"]) == 2
    assert "--overw (did you mean --overwrite?)" in capsys.readouterr().err
    assert cli_main(["train", str(tmp_path / "r.yaml"), "--resum"]) == 2
    assert "--resum (did you mean --resume?)" in capsys.readouterr().err


def write_recipe(tmp_path, data_file, **training):
    recipe = {"name": "t", "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": "org/model"},
              "data": {"source": str(data_file)}, "training": training}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def gsm8k_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    return path


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf"])
def test_validation_rejects_non_finite_numbers(tmp_path, capsys, value):
    path = write_recipe(tmp_path, gsm8k_file(tmp_path))
    assert cli_main(["validate", str(path), f"--training.learning_rate={value}"]) == 2
    err = capsys.readouterr().err
    assert "training.learning_rate" in err and "expected a finite number" in err


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_a_non_utf8_recipe_is_one_line(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert cli_main(["validate", str(path)]) == 2
    assert "not UTF-8" in one_line_error(capsys)


def test_non_utf8_data_is_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"question": "1+1?", "answer": "#### 2"}\n{"question": "caf\xe9", "answer": "#### 1"}\n')
    assert cli_main(["validate", str(write_recipe(tmp_path, data))]) == 2
    err = one_line_error(capsys)
    assert "not UTF-8" in err and "line 2" in err


def test_a_text_file_named_parquet_is_one_line(tmp_path, capsys):
    data = tmp_path / "d.parquet"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    assert cli_main(["validate", str(write_recipe(tmp_path, data))]) == 2
    err = one_line_error(capsys)
    assert "is not a Parquet file" in err and ".jsonl" in err


def test_pkg_path_to_a_subpackage_imports_nothing(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "site" / "boompkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported during validate')\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = write_recipe(tmp_path, gsm8k_file(tmp_path))
    assert cli_main(["validate", str(path), "--model.name_or_path=pkg://boompkg.sub/model.gguf", "--no-data"]) == 0
    assert "boompkg" not in sys.modules
    assert str(pkg / "sub" / "model.gguf") in capsys.readouterr().out
