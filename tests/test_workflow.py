"""The workflow end to end: a real run of every stage on a tiny config, and caching users can trust."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, tiny_config
from pipeline.io import try_lock
from pipeline.manifest import read_shards

# A `results` folder whose name a shell would split at the space and run `touch PWNED` from.
HOSTILE_NAME = "res ults $(touch PWNED)"


@pytest.mark.parametrize(
    "key, value",
    [("guidance_scal", 3.0), ("num_shards", "two")],
    ids=["misspelt key", "wrong type"],
)
def test_config_error_names_the_key(project, key, value):
    config = tiny_config()
    config["generate"][key] = value
    project.write_config(config)
    proc = project.snakemake("-n", check=False)
    assert proc.returncode != 0
    # One line naming the key, as from the command line, not Snakemake's dump of the whole schema.
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("config error: ")]
    assert len(errors) == 1 and key in errors[0], proc.stderr
    assert len((proc.stdout + proc.stderr).splitlines()) < 10, proc.stderr


def test_missing_dataset_root_stops_before_any_job(project):
    config = tiny_config()
    config["dataset"].update(name="coco", root="/nonexistent/coco")
    project.write_config(config)
    proc = project.snakemake("-n", check=False)
    assert proc.returncode != 0
    assert "dataset.root" in proc.stdout + proc.stderr and "/nonexistent/coco" in proc.stdout + proc.stderr


def test_unknown_train_method_is_a_config_error(project):
    config = tiny_config()
    config["train"]["methods"] = ["baseline", "dafusoin"]
    project.write_config(config)
    proc = project.snakemake("-n", check=False)
    assert proc.returncode != 0
    assert "dafusoin" in proc.stdout + proc.stderr


def test_dry_run_plans_every_stage(project):
    project.write_config(tiny_config())
    jobs = project.planned_jobs()
    assert jobs["generate"] == 2  # num_shards shard jobs for the one subset and method
    assert jobs["train"] == 2  # baseline + dafusion
    for rule in ("build_tiny_model", "build_demo_dataset", "prepare", "fewshot", "invert", "fid_real_features", "fid", "report"):
        assert jobs.get(rule, 0) >= 1, rule


def test_dreambooth_adapters_are_planned_only_for_the_methods_that_need_them(project):
    config = tiny_config()
    project.write_config(config)
    assert "dreambooth" not in project.planned_jobs()
    config["generate"]["methods"] = ["dafusion", "dreambooth", "dreambooth-sdedit"]
    config["train"]["methods"] = ["baseline", "dreambooth"]
    project.write_config(config)
    jobs = project.planned_jobs()
    assert jobs["dreambooth"] == 1 and jobs["generate"] == 6  # one adapter job per subset; 2 shards x 3 methods
    commands = shell_commands(project.snakemake("-n", "-p"))
    adapted = [c for c in commands if "pipeline generate" in c and "--method dreambooth" in c]
    assert len(adapted) == 4 and all("--adapter results/dreambooth/k1_seed0" in c and "--tokens" not in c for c in adapted)
    assert all("--adapter" not in c for c in commands if "--method dafusion" in c)


def test_with_erase_enabled_one_erase_job_feeds_every_generation_job(project):
    config = tiny_config()
    config["erase"] = {"enabled": True}
    project.write_config(config)
    jobs = project.planned_jobs()
    assert jobs["erase"] == 1 and jobs["generate"] == 2
    commands = shell_commands(project.snakemake("-n", "-p"))
    generating = [c for c in commands if "pipeline generate" in c]
    assert generating and all("--erased results/erase" in c for c in generating)
    assert any("pipeline erase" in c and "--classes results/prepare/classes.json" in c for c in commands)


def test_a_zero_shot_clip_job_is_planned_only_with_a_model(project):
    config = tiny_config()
    project.write_config(config)
    assert "zeroshot" not in project.planned_jobs()
    config["zeroshot"] = {"model": "ViT-B-32", "pretrained": "openai"}
    project.write_config(config)
    assert project.planned_jobs()["zeroshot"] == 1
    commands = shell_commands(project.snakemake("-n", "-p"))
    assert any("pipeline zeroshot" in c and "--manifest results/prepare/manifest.parquet --out results/zeroshot/test.json" in c for c in commands)


def test_mvc_plans_captions_and_one_fine_tune_per_subset_and_starts_it_from_the_erased_model(project):
    config = tiny_config()
    config["generate"]["methods"] = ["dafusion", "mvc", "mvc-pretrained"]
    config["train"]["methods"] = ["baseline", "mvc"]
    project.write_config(config)
    jobs = project.planned_jobs()
    assert jobs["caption"] == 1 and jobs["mvc"] == 1 and jobs["mix_samples"] == 1 and jobs["generate"] == 6
    commands = shell_commands(project.snakemake("-n", "-p"))
    assert any("pipeline mix-samples" in c and "--model results/mvc/k1_seed0" in c for c in commands)
    mixing = [c for c in commands if "pipeline generate" in c and "--method mvc" in c]
    assert len(mixing) == 4 and all("--captions results/captions/k1_seed0.parquet" in c for c in mixing)
    assert sum("--adapter results/mvc/k1_seed0" in c for c in mixing) == 2, "mvc-pretrained uses the base model"
    assert all("--captions" not in c for c in commands if "--method dafusion" in c)
    config["erase"] = {"enabled": True}
    project.write_config(config)
    commands = shell_commands(project.snakemake("-n", "-p"))
    assert any("pipeline mvc" in c and "--erased results/erase" in c for c in commands)


@pytest.mark.parametrize(
    "presets",
    [["pascal.yaml"], ["coco.yaml"], ["pascal.yaml", "recipes/finetune.yaml"], ["coco.yaml", "recipes/dreambooth.yaml"]]
    + [[f"experiments/{path.name}"] for path in sorted((REPO / "config" / "experiments").glob("*.yaml"))],
    ids=lambda files: "+".join(Path(f).stem for f in files),
)
def test_every_shipped_preset_plans_a_run_over_the_embedded_default(project, tmp_path, presets):
    """As the README runs them: snakemake --configfile <preset> [<recipe>], merged over config.yaml."""
    import shutil

    shutil.copy(REPO / "config.yaml", project.root / "config.yaml")
    shutil.copytree(REPO / "config", project.root / "config")
    (tmp_path / "data").mkdir()
    (project.root / "root.yaml").write_text(f"dataset:\n  root: {tmp_path / 'data'}\n")  # where a user's data would be
    # An experiment preset names its own root and downloads into it.
    overlays = [f"config/{name}" for name in presets] + ([] if presets[0].startswith("experiments/") else ["root.yaml"])
    jobs = project.planned_jobs("--configfile", "config.yaml", *overlays)
    assert jobs["prepare"] == 1 and jobs["report"] == 1


def write_class_folders(root, per_class=6):
    for index, class_name in enumerate(["cat", "dog"]):
        (root / class_name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (40 * index, 10 * i, 0)).save(root / class_name / f"{i}.png")


@pytest.mark.slow
def test_dataset_contents_are_part_of_prepares_key(project):
    config = tiny_config()
    config["dataset"].update(name="folder", root="data", classes=None)
    project.write_config(config)
    data = project.root / "data"
    write_class_folders(data)
    subset = "results/subsets/k1_seed0.parquet"
    project.snakemake(subset)
    assert project.planned_jobs(subset) == {}
    rerun = {"prepare": 1, "fewshot": 1}

    # A file outside the dataset, and one the reader never looks at (hidden), change nothing.
    (project.root / "notes.txt").write_text("unrelated")
    (data / "cat" / ".thumbs").write_text("hidden")
    assert project.planned_jobs(subset) == {}

    added = data / "dog" / "new.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(added)
    assert project.planned_jobs(subset) == rerun
    added.unlink()
    assert project.planned_jobs(subset) == {}  # back to the listing prepare ran on

    (data / "cat" / "0.png").unlink()
    assert project.planned_jobs(subset) == rerun
    Image.new("RGB", (16, 16), (9, 9, 9)).save(data / "cat" / "0.png")  # replaced: same name, another file
    assert project.planned_jobs(subset) == rerun


@pytest.mark.slow
def test_end_to_end_run_and_cache(project):
    config = tiny_config()
    project.write_config(config)
    project.snakemake()
    results = project.root / "results"

    with open(results / "report" / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["method"] for r in rows) == ["baseline", "dafusion"]
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert row["split"] == "test"
        assert int(row["examples_per_class"]) == 1
    page = (results / "report" / "index.html").read_text()
    assert "data:image/png;base64," in page and "baseline" in page and "dafusion" in page
    fid = json.loads((results / "fid" / "dafusion" / "k1_seed0.json").read_text())
    assert fid["n_synthetic"] == 4 * 1 * 2  # classes x k x num_per_image
    assert fid["fid"] >= 0

    # A second run has nothing to do.
    assert project.planned_jobs() == {}

    # Snakemake's own report embeds our page.
    project.snakemake("--report", "snakemake-report.zip")
    with zipfile.ZipFile(project.root / "snakemake-report.zip") as archive:
        names = archive.namelist()
    assert any(n.endswith("/index.html") for n in names) and any(n.endswith("/summary.csv") for n in names), names

    # Changing a generation parameter reruns generation and what depends on it, not prepare or invert.
    config["generate"]["guidance_scale"] = 3.0
    project.write_config(config)
    jobs = project.planned_jobs()
    assert jobs.get("generate") == 2 and jobs.get("fid") == 1 and jobs.get("report") == 1
    assert jobs.get("train") == 1  # only the method that uses synthetic images
    for rule in ("prepare", "fewshot", "invert", "build_tiny_model", "build_demo_dataset"):
        assert rule not in jobs, jobs

    # Changing the batch size changes no image, so it reruns nothing.
    config["generate"]["guidance_scale"] = 7.5
    config["generate"]["batch_size"] = 1
    project.write_config(config)
    assert project.planned_jobs() == {}

    # A setting reruns only the methods that read it: neither baseline nor dafusion mixes up.
    config["train"]["mixup_alpha"] = 0.4
    project.write_config(config)
    assert project.planned_jobs() == {}
    # A new training method adds its jobs and reruns no existing one but the report.
    config["train"]["methods"] = ["baseline", "dafusion", "randaugment"]
    project.write_config(config)
    jobs = project.planned_jobs()
    assert (jobs.pop("train"), jobs.pop("report")) == (1, 1) and set(jobs) <= {"all"}, jobs
    config["train"]["methods"] = ["baseline", "dafusion"]
    config["train"]["mixup_alpha"] = 0.8
    project.write_config(config)

    # Jobs given more threads compute on the same pinned count (cpu_threads): nothing to redo.
    assert project.planned_jobs("--set-threads", "generate=2", "invert=2", "train=2") == {}
    # Another pinned count moves the last bits of what the pinned stages make, so they rerun.
    config["cpu_threads"] = 2
    project.write_config(config)
    jobs = project.planned_jobs()
    assert (jobs.get("invert"), jobs.get("token_samples"), jobs.get("generate"), jobs.get("train")) == (1, 1, 2, 2), jobs
    for rule in ("prepare", "fewshot", "fid_real_features", "build_tiny_model", "build_demo_dataset"):
        assert rule not in jobs, jobs
    config["cpu_threads"] = 1
    project.write_config(config)

    # A sweep's base value is the base run's jobs; each other value adds only its own.
    config["sweeps"] = {"alpha": {"train.synthetic_probability": [0.5, 0.25]}}
    project.write_config(config)
    jobs = project.planned_jobs()
    assert (jobs.pop("train"), jobs.pop("report")) == (1, 1) and set(jobs) <= {"all"}, jobs
    project.snakemake()
    variant = json.loads((results / "train" / "dafusion@train.synthetic_probability=0.25" / "k1_seed0.json").read_text())
    assert variant["overrides"] == {"train.synthetic_probability": 0.25} and variant["synthetic_probability"] == 0.25
    with open(results / "report" / "summary.csv") as handle:
        swept = {row["method"]: row["train.synthetic_probability"] for row in csv.DictReader(handle)}
    assert swept == {"baseline": "", "dafusion": "0.5", "dafusion@train.synthetic_probability=0.25": "0.25"}
    assert "Sweep alpha: train.synthetic_probability" in (results / "report" / "index.html").read_text()
    config["sweeps"]["alpha"]["train.synthetic_probability"].append(0.75)
    project.write_config(config)
    jobs = project.planned_jobs()
    assert (jobs.pop("train"), jobs.pop("report")) == (1, 1) and set(jobs) <= {"all"}, jobs
    # A generation setting's value makes its own shards, their FID and their classifier.
    config["sweeps"] = {"M": {"generate.num_per_image": [1]}}
    project.write_config(config)
    jobs = project.planned_jobs()
    assert (jobs.pop("generate"), jobs.pop("fid"), jobs.pop("train"), jobs.pop("report")) == (2, 1, 1, 1) and set(jobs) <= {"all"}, jobs
    commands = shell_commands(project.snakemake("-n", "-p"))
    assert sum("--set generate.num_per_image=1" in c and "--method dafusion " in c for c in commands) == 3  # 2 shards, 1 classifier
    del config["sweeps"]
    project.write_config(config)
    project.snakemake()  # the report without the sweep

    # Edits that change no output rerun nothing upstream of what they touch: a schema description
    # reruns nothing (its defaults are in the params as values), the report module only the report.
    schema = project.root / "pipeline" / "config.schema.yaml"
    schema.write_text(schema.read_text().replace("Global seed;", "The global seed;", 1))
    assert project.planned_jobs() == {}
    report_py = project.root / "pipeline" / "report.py"
    report_py.write_text(report_py.read_text() + "\n# an edit\n")
    jobs = project.planned_jobs()
    assert jobs.pop("report") == 1 and set(jobs) <= {"all"}, jobs

    # A stage's settings are its own module: editing the train settings reruns training alone.
    train_settings = project.root / "pipeline" / "settings" / "train.py"
    train_settings.write_text(train_settings.read_text() + "\n# an edit\n")
    jobs = project.planned_jobs()
    assert jobs.pop("train") == 2 and set(jobs) <= {"report", "all"}, jobs

    # Editing a pipeline module reruns the stages that import it.
    generate_py = project.root / "pipeline" / "generate.py"
    generate_py.write_text(generate_py.read_text() + "\n# an edit\n")
    jobs = project.planned_jobs()
    assert jobs.get("generate") == 2 and "invert" not in jobs and "prepare" not in jobs, jobs
    train_py = project.root / "pipeline" / "train.py"
    train_py.write_text(train_py.read_text() + "\n# an edit\n")
    assert project.planned_jobs().get("train") == 2


def shell_commands(proc: subprocess.CompletedProcess) -> list[str]:
    """The shell commands a `snakemake -n -p` run printed."""
    prefix = "Shell command: "
    lines = (line.removeprefix(prefix) for line in proc.stdout.splitlines() if line.startswith(prefix))
    return [line for line in lines if line != "None"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"generate": {"export_dir": "{results}/export"}},
        {"invert": {"mode": "per_class"}, "dataset": {"name": "voc", "root": "{results}/voc", "download": True}},
    ],
    ids=["demo, joint inversion, export", "download, per-class inversion"],
)
def test_every_shell_command_keeps_a_hostile_results_path_one_argument(project, tmp_path, overrides):
    results = str(tmp_path / HOSTILE_NAME)
    config = tiny_config(results)
    for section, values in overrides.items():
        config[section].update({key: value.format(results=results) if isinstance(value, str) else value for key, value in values.items()})
    project.write_config(config)
    commands = shell_commands(project.snakemake("-n", "-p"))
    assert len(commands) >= 9, commands
    for command in commands:
        words = shlex.split(command)
        hostile = [word for word in words if "PWNED" in word]
        assert hostile and all(word.startswith(results + "/") for word in hostile), command
        assert "--config" in words and words[words.index("--config") + 1].startswith(results + "/.config/"), command
    assert not list(tmp_path.rglob("PWNED"))


def files_under(root: Path) -> set[Path]:
    """Files under `root`, less Snakemake's own state and Python's bytecode caches."""
    return {path.relative_to(root) for path in root.rglob("*") if path.is_file()
            and not {".snakemake", "__pycache__"} & set(path.relative_to(root).parts)}  # fmt: skip


@pytest.mark.slow
def test_a_results_path_with_spaces_and_command_substitution_runs_and_executes_nothing(project, tmp_path):
    results = tmp_path / HOSTILE_NAME
    config = tiny_config(str(results))
    config["generate"]["export_dir"] = f"{results}/export"
    config["invert"]["mode"] = "per_class"  # the per-class jobs and merge_tokens, besides every other rule
    project.write_config(config)
    project_files = files_under(project.root)
    project.snakemake()
    assert (results / "report" / "index.html").is_file()
    assert (results / "export" / "dafusion" / "k1_seed0" / "images.csv").is_file()
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["project", HOSTILE_NAME])
    assert files_under(project.root) == project_files


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` until it returns something true; fail saying `what` did not happen in time."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:.0f} s")
        time.sleep(0.05)
    return value


def recorded_holder(lock: Path) -> int | None:
    """The pid a job wrote into `lock` once it took it (read only: probing with flock could take it)."""
    try:
        return json.loads(lock.read_text())["pid"]
    except (OSError, ValueError):
        return None


def is_free(lock: Path) -> bool:
    handle = try_lock(lock)
    if handle is not None:
        handle.close()
    return handle is not None


@pytest.mark.slow
def test_rerunning_after_killing_the_controller_while_its_jobs_live_gives_the_uninterrupted_shards(project, tmp_path):
    """kill -9 of the Snakemake process leaves its generate jobs running as orphans. `snakemake
    --unlock && snakemake` must not let a new job adopt a live orphan's flushed parts: it stops
    naming the orphan, and once the orphans are gone a rerun gives the bytes of an uninterrupted run."""
    project.write_config(tiny_config())
    synthetic = project.root / "results" / "synthetic" / "dafusion" / "k1_seed0"
    shards = [f"results/synthetic/dafusion/k1_seed0/shard-{i}-of-2.parquet" for i in range(2)]
    locks = [project.root / f"{shard}.lock" for shard in shards]
    project.snakemake("results/invert/k1_seed0")  # what the shards need, so that the run below is all generation

    with open(tmp_path / "controller.log", "w") as log:
        controller = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--cores", "2", *shards],
            cwd=project.root, env={**os.environ, "PYTHONPATH": str(project.root)}, stdout=log, stderr=log,
        )  # fmt: skip
    orphan = None
    try:
        orphan = wait_for(lambda: recorded_holder(locks[0]), 300, "no generate job took the lock of shard 0")
        os.kill(orphan, signal.SIGSTOP)  # alive and mid-job for as long as the test needs
        controller.kill()
        controller.wait(timeout=30)

        project.snakemake("--unlock")
        rerun = project.snakemake(*shards, check=False, timeout=600)
        assert rerun.returncode != 0, "a new job ran beside the live orphan of shard 0"
        job_log = project.root / "results" / "logs" / "generate" / "dafusion" / "k1_seed0" / "shard-0-of-2.log"
        message = f"shard-0-of-2.parquet.lock is held by pid {orphan} on host {socket.gethostname()}"
        assert message in job_log.read_text(errors="replace")
        assert not (project.root / shards[0]).exists()

        os.kill(orphan, signal.SIGCONT)
        for lock in locks:
            wait_for(lambda: not lock.exists() or is_free(lock), 300, f"the orphaned job holding {lock} did not end")
        orphan = None
        project.snakemake(*shards, timeout=600)
    finally:
        if orphan is not None:
            os.kill(orphan, signal.SIGKILL)
        controller.kill()
    recovered = [(project.root / shard).read_bytes() for shard in shards]
    assert len(read_shards([project.root / shard for shard in shards])) == 4 * 1 * 2  # classes x k x num_per_image
    assert project.planned_jobs(*shards) == {}
    assert not list(synthetic.glob("*.partial"))

    project.snakemake(*shards, "--forcerun", "generate", timeout=600)  # an uninterrupted run
    assert [(project.root / shard).read_bytes() for shard in shards] == recovered
