import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.hashing import code_hash, module_closure, value_hash

REPO = Path(__file__).resolve().parents[1]


def names(module):
    """The closure's files relative to the package: "report.py", "settings/generate.py"."""
    return {p.relative_to(REPO / "pipeline").as_posix() for p in module_closure(module)}


def test_closure_follows_imports_transitively():
    closure = names("pipeline.report")
    # report imports layout, io and manifest; manifest imports io; the package __init__ always counts.
    assert {"report.py", "layout.py", "io.py", "manifest.py", "__init__.py"} <= closure
    # the settings of generate and train name the runs of a sweep; the stages themselves do not count
    assert "generate.py" not in closure and "train.py" not in closure and "tiny_sd.py" not in closure


def test_only_the_python_a_stage_runs_counts_as_its_code():
    assert not any(name.endswith(".yaml") for name in names("pipeline.generate"))  # defaults reach params as values
    assert "export.py" not in names("pipeline.generate") and "generate.py" not in names("pipeline.export")
    assert "report.py" not in names("pipeline.generate") | names("pipeline.train") | names("pipeline.fid")


def test_value_hash_ignores_key_order():
    assert value_hash({"a": 1, "b": [1, 2]}) == value_hash({"b": [1, 2], "a": 1})
    assert value_hash({"a": 1}) != value_hash({"a": 2})


def test_editing_an_imported_module_changes_the_hash(tmp_path):
    """In a copy of the package: editing io.py changes the hash of report (report -> manifest -> io)
    but not of layout, which imports nothing that imports io."""
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    script = "from pipeline.hashing import code_hash; print(code_hash('pipeline.report'), code_hash('pipeline.layout'))"

    def hashes():
        out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
        return out.stdout.split()

    before = hashes()
    assert before == [code_hash("pipeline.report"), code_hash("pipeline.layout")]
    io_py = tmp_path / "pipeline" / "io.py"
    io_py.write_text(io_py.read_text() + "\n# edited\n")
    after = hashes()
    assert after[0] != before[0]  # report -> manifest -> io
    assert after[1] == before[1]  # layout imports no io


def test_a_stage_hashes_its_own_settings_and_the_packages_it_imports_from():
    closure = {p.relative_to(REPO / "pipeline").as_posix() for p in module_closure("pipeline.generate")}
    # importing pipeline.settings.generate runs pipeline/settings/__init__.py first
    assert {"settings/__init__.py", "settings/generate.py"} <= closure
    assert "settings/train.py" not in closure and "settings/invert.py" not in closure
    train = {p.relative_to(REPO / "pipeline").as_posix() for p in module_closure("pipeline.train")}
    assert "settings/train.py" in train and "settings/generate.py" not in train
