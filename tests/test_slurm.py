"""The workflow on a live SLURM cluster, through the shipped profile (workflow/profiles/slurm).

The cluster tests need a running cluster: `.ci/slurm/start.sh` starts a one-node SLURM on this host
and `.ci/run` sets DAFUSION_SLURM_TEST=1 after it. Every stage then runs as a real sbatch job (GPU
rules with --gpus=1 on placeholder GPUs), and its outputs must equal those of a local run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, Project, tiny_config
from pipeline.io import read_json, read_parquet

ENABLE_VARIABLE = "DAFUSION_SLURM_TEST"
SHIPPED_PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
RULES_DIR = REPO / "workflow" / "rules"
RUN_TIMEOUT = 600  # seconds for one workflow run: 2 to 6 min locally, 4 to 8 min on the cluster (load)
SLURM_COMMAND_TIMEOUT = 20
JOB_MEM_MB = 1500  # the tiny config's jobs peak near 1.3 GB (BENCHMARKS.md)


def gpu_rules() -> set[str]:
    """Rules whose resources ask for a GPU, read from the rule files."""
    rules = set()
    for path in RULES_DIR.glob("*.smk"):
        for name, body in re.findall(r"^\s*rule (\w+):\n(.*?)(?=^\s*rule \w+:|\Z)", path.read_text(), flags=re.MULTILINE | re.DOTALL):
            if re.search(r"^\s*gpu=1,", body, flags=re.MULTILINE):
                rules.add(name)
    return rules


def all_rules() -> set[str]:
    return {name for path in RULES_DIR.glob("*.smk") for name in re.findall(r"^\s*rule (\w+):", path.read_text(), flags=re.MULTILINE)}


def test_shipped_profile_asks_cpus_per_gpu_for_every_gpu_rule():
    profile = yaml.safe_load(SHIPPED_PROFILE.read_text())
    assert profile["executor"] == "slurm"
    defaults = profile["default-resources"]
    assert {"slurm_partition", "runtime", "mem_mb"} <= set(defaults), defaults
    # The plugin prefers cpus_per_task over cpus_per_gpu: a default would override every GPU rule's.
    assert "cpus_per_task" not in defaults
    per_rule = profile["set-resources"]
    assert set(per_rule) <= all_rules(), f"set-resources names rules that do not exist: {set(per_rule) - all_rules()}"
    gpu = gpu_rules()
    assert gpu == {"invert", "dreambooth", "erase", "mvc", "token_samples", "mix_samples", "generate", "fid_real_features", "fid", "train", "zeroshot"}, gpu
    for rule in gpu:
        assert per_rule[rule]["cpus_per_gpu"] == "threads", rule
        assert per_rule[rule]["runtime"] >= defaults["runtime"], rule


# --- the live cluster ------------------------------------------------------------------------


def slurm_command(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=SLURM_COMMAND_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def default_partition() -> tuple[str, int]:
    """(name, CPUs of its node) of the cluster's default partition, as sinfo reports them."""
    for line in slurm_command("sinfo", "--noheader", "--format=%P|%c|%a").splitlines():
        name, cpus, availability = line.strip().split("|")
        if name.endswith("*") and availability == "up":
            return name.rstrip("*"), int(cpus.rstrip("+"))
    raise RuntimeError("sinfo lists no default partition that is up")


@pytest.fixture(scope="module")
def cluster() -> tuple[str, int]:
    if os.environ.get(ENABLE_VARIABLE) != "1":
        pytest.skip(f"needs a live SLURM cluster: run .ci/slurm/start.sh and set {ENABLE_VARIABLE}=1")
    try:
        return default_partition()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"{ENABLE_VARIABLE}=1 but the SLURM cluster does not answer: {exc}")


def cluster_profile(project: Project, partition: str, cpus: int) -> str:
    """The shipped profile with this cluster's partition, small memory requests, and polling that
    suits a cluster without accounting (squeue instead of sacct) and jobs of seconds."""
    profile = yaml.safe_load(SHIPPED_PROFILE.read_text())
    profile["default-resources"].update(slurm_partition=partition, mem_mb=JOB_MEM_MB)
    for resources in profile["set-resources"].values():
        if "mem_mb" in resources:
            resources["mem_mb"] = JOB_MEM_MB
    profile.update(
        {
            "jobs": cpus,
            "latency-wait": 10,
            "slurm-status-command": "squeue",
            "slurm-init-seconds-before-status-checks": 3,
            "slurm-no-account": True,
        }
    )
    folder = project.root / "profiles" / "slurm-ci"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return str(folder)


def jobs_after(last_id: int) -> list[tuple[int, str, str]]:
    """(job id, comment, state) of the cluster's jobs newer than `last_id`; the plugin puts
    `rule_<name>[_wildcards_...]` in each job's comment."""
    out = slurm_command("squeue", "--noheader", "--states=all", "--format=%i|%k|%T")
    jobs = []
    for line in out.splitlines():
        job_id, comment, state = line.strip().split("|")
        if int(job_id) > last_id:
            jobs.append((int(job_id), comment, state))
    return sorted(jobs)


def latest_job_id() -> int:
    return max((job_id for job_id, _, _ in jobs_after(0)), default=0)


def submitted_rules(jobs: list[tuple[int, str, str]]) -> list[str]:
    return sorted(re.match(r"rule_(\w+?)(_wildcards_.*)?$", comment).group(1) for _, comment, _ in jobs)


def start_local_run(project: Project, log: Path) -> subprocess.Popen:
    """Project.snakemake's local run, in the background at low CPU priority: it fills the cluster
    run's idle time (job start-up, status polling) without slowing the cluster's jobs."""
    cmd = ["nice", "-n", "15", sys.executable, "-m", "snakemake", "--cores", "2"]
    env = {**os.environ, "PYTHONPATH": str(project.root)}
    with open(log, "w") as output:
        return subprocess.Popen(cmd, cwd=project.root, env=env, stdout=output, stderr=subprocess.STDOUT)


def wait_for_local_run(run: subprocess.Popen, log: Path) -> None:
    try:
        run.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        run.kill()
        run.wait()
        pytest.fail(f"the local run did not finish within {RUN_TIMEOUT} s; last output:\n{log.read_text()[-3000:]}")
    if run.returncode != 0:
        pytest.fail(f"the local run exited {run.returncode}:\n{log.read_text()[-4000:]}")


def run_on_cluster(project: Project, profile: str, *, check: bool = True) -> tuple[subprocess.CompletedProcess, list]:
    """Run the workflow through `profile`; returns Snakemake's result and the SLURM jobs it submitted.
    A run that fails or times out leaves no job of its own behind on the cluster."""
    before = latest_job_id()
    try:
        proc = project.snakemake("--workflow-profile", profile, timeout=RUN_TIMEOUT, check=check)
    finally:
        leftover = [str(job_id) for job_id, _, state in jobs_after(before) if state in ("PENDING", "RUNNING")]
        if leftover:
            slurm_command("scancel", *leftover)
    return proc, jobs_after(before)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The tiny config on the cluster and, meanwhile, locally: (local, cluster, profile, jobs)."""
    partition, cpus = cluster
    config = tiny_config()
    local = Project(tmp_path_factory.mktemp("local"))
    local.write_config(config)
    on_cluster = Project(tmp_path_factory.mktemp("slurm"))
    on_cluster.write_config(config)
    profile = cluster_profile(on_cluster, partition, cpus)

    local_log = local.root / "local-run.log"
    local_run = start_local_run(local, local_log)
    try:
        _, jobs = run_on_cluster(on_cluster, profile)
    finally:
        wait_for_local_run(local_run, local_log)
    return local, on_cluster, profile, jobs


def shard_rows(path: Path) -> list[dict]:
    columns = ["synthetic_id", "image_id", "label", "strength", "seed", "prompt", "image"]
    return sorted(read_parquet(path, columns=columns).to_pylist(), key=lambda row: row["synthetic_id"])


@pytest.mark.slurm
@pytest.mark.slow
def test_every_stage_runs_as_a_slurm_job_and_matches_a_local_run(runs):
    local, on_cluster, _, jobs = runs
    planned = local.planned_jobs("--forceall")
    planned.pop("all")  # a target rule with no command: Snakemake finishes it itself
    assert submitted_rules(jobs) == sorted(rule for rule, count in planned.items() for _ in range(count)), jobs
    assert all(state == "COMPLETED" for _, _, state in jobs), jobs

    # Each job is a fresh process with the same seeds, threads and batch plan as locally, and CPU
    # kernels are deterministic at a fixed thread count: every output is bitwise equal.
    a, b = local.root / "results", on_cluster.root / "results"
    for table in ("prepare/manifest.parquet", "subsets/k1_seed0.parquet"):  # paths in them are relative
        assert read_parquet(a / table).to_pylist() == read_parquet(b / table).to_pylist(), table
    tokens_a = load_file(a / "invert" / "k1_seed0" / "learned_embeds.safetensors")
    tokens_b = load_file(b / "invert" / "k1_seed0" / "learned_embeds.safetensors")
    assert tokens_a.keys() == tokens_b.keys() and all(torch.equal(tokens_a[t], tokens_b[t]) for t in tokens_a)
    for shard in ("shard-0-of-2.parquet", "shard-1-of-2.parquet"):
        path = Path("synthetic") / "dafusion" / "k1_seed0" / shard
        assert shard_rows(a / path) == shard_rows(b / path), path
    for method in ("baseline", "dafusion"):
        metrics_a = read_json(a / "train" / method / "k1_seed0.json")
        metrics_b = read_json(b / "train" / method / "k1_seed0.json")
        for key in ("accuracy", "mean_class_accuracy", "per_class_accuracy", "best_step", "n_synthetic", "curve"):
            assert metrics_a[key] == metrics_b[key], (method, key)
    fid_a = read_json(a / "fid" / "dafusion" / "k1_seed0.json")
    fid_b = read_json(b / "fid" / "dafusion" / "k1_seed0.json")
    assert (fid_a["fid"], fid_a["kid"]) == (fid_b["fid"], fid_b["kid"])
    assert "dafusion" in (b / "report" / "index.html").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_failed_job_names_its_logs_and_rerun_resubmits_only_what_is_missing(runs):
    _, on_cluster, profile, _ = runs
    results = on_cluster.root / "results"
    (results / "fid" / "dafusion" / "k1_seed0.json").unlink()
    # The report job fails (its code now raises); fid, which it waits for, still completes.
    report_py = on_cluster.root / "pipeline" / "report.py"
    original = report_py.read_text()
    report_py.write_text(original + '\nraise RuntimeError("injected failure for the SLURM test")\n')
    proc, jobs = run_on_cluster(on_cluster, profile, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert submitted_rules(jobs) == ["fid", "report"], jobs
    ((report_job, _, report_state),) = [job for job in jobs if job[1] == "rule_report"]
    assert report_state == "FAILED", jobs
    assert "Error in rule report" in output, output[-3000:]
    # The failure names both logs: the rule's own log and the SLURM job's log, which is kept.
    assert "results/logs/report/report.log" in output, output[-3000:]
    slurm_log = re.search(r"\S*slurm_logs/rule_report/\S*" + str(report_job) + r"\.log", output)
    assert slurm_log, f"no SLURM log path of job {report_job} in the output:\n{output[-3000:]}"
    assert (on_cluster.root / slurm_log.group(0)).is_file()
    assert "injected failure for the SLURM test" in (results / "logs" / "report" / "report.log").read_text()
    assert (results / "fid" / "dafusion" / "k1_seed0.json").is_file()

    # Fixed: the rerun submits the one job that is still missing.
    report_py.write_text(original)
    planned = on_cluster.planned_jobs("--workflow-profile", profile)
    planned.pop("all")
    assert planned == {"report": 1}
    _, jobs = run_on_cluster(on_cluster, profile)
    assert submitted_rules(jobs) == ["report"] and jobs[0][2] == "COMPLETED", jobs
