# Helpers shared by the rules: paths, per-stage params (settings key + source hash), checks.
#
# Caching users can trust: Snakemake reruns a job when its params change, but it cannot see edits
# inside the imported `pipeline` package. So every rule's params carry exactly the config values that
# can change its output (`cfg`, the key of the stage's settings object, pipeline/settings/) and a
# hash of the pipeline source it runs (`code`).

import json
import os
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

# The source tree next to this workflow is hashed for params and put first on the jobs' PYTHONPATH
# (jobs inherit this environment, also on cluster nodes, which parse this file again), so the code
# whose hash decides reruns is the code the jobs run.
SOURCE_ROOT = str(Path(workflow.basedir).parent.resolve())
sys.path.insert(0, SOURCE_ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)


envvars:
    "PYTHONPATH",


from pipeline import PipelineError, layout, methods, sweeps
from pipeline.augment import parse_method
from pipeline.checkpoint import check_corpus_disjoint, is_local, model_files, verify_if_local
from pipeline.config import stable_json, validate_config
from pipeline.hashing import code_hash, value_hash
from pipeline.settings.caption import CaptionSettings
from pipeline.settings.dreambooth import DreamBoothSettings
from pipeline.settings.erase import EraseSettings
from pipeline.settings.fid import FidFeatureSettings, FidSettings, OracleScoreSettings
from pipeline.settings.generate import GenerateSettings
from pipeline.settings.invert import InvertSettings
from pipeline.settings.mix_samples import MixSampleSettings
from pipeline.settings.mvc import MVCSettings
from pipeline.settings.prepare import DemoDatasetSettings, FewshotSettings, PrepareSettings, TinyModelSettings
from pipeline.settings.report import ReportSettings
from pipeline.settings.token_samples import TokenSampleSettings
from pipeline.settings.train import TrainSettings
from pipeline.settings.zeroshot import ZeroShotSettings

try:
    validate_config(config)
except PipelineError as exc:
    raise WorkflowError(f"config error: {exc}") from None

R = config["results"]
PAIRS = layout.subsets_in(config)
SUBSET = layout.subset_name("{k}", "{seed}")  # job-name pattern of per-subset jobs
NUM_SHARDS = config["generate"]["num_shards"]
GENERATE_METHODS = config["generate"]["methods"]
TRAIN_METHODS = config["train"]["methods"]
# Run names: each method's base run and its sweep variants (pipeline.sweeps), e.g.
# dafusion@train.synthetic_probability=0.3; the {method} wildcard of generate, fid and train paths.
GENERATE_RUNS = sweeps.generate_runs(config)
TRAIN_RUNS = sweeps.train_runs(config)


wildcard_constraints:
    k=r"\d+",
    seed=r"\d+",
    shard=r"\d+",
    total=r"\d+",
    method=r"[a-z0-9-]+(\+[a-z0-9-]+)*(@[A-Za-z0-9_.+=,-]+)?",
    split=r"train|val|test",


def fail(message):
    raise WorkflowError(f"config error: {message}")


def check_config():
    """Checks the schema cannot express; all run before any job starts."""
    dataset, model = config["dataset"], config["model"]
    if dataset["name"] != "demo" and not dataset["download"] and not Path(dataset["root"]).is_dir():
        fail(f"dataset.root: folder {dataset['root']!r} does not exist (dataset.name is {dataset['name']!r}). Expected the dataset's root folder.")
    if not model["build_tiny"]:
        try:
            verify_if_local(model["id"])
        except PipelineError as exc:
            fail(f"{exc}. Expected a hub id such as CompVis/stable-diffusion-v1-4 or a folder saved with save_pretrained.")
    digits = Path(dataset["root"]) / layout.DEMO_DIGITS_FILE
    if dataset["name"] == "demo" and digits.is_file():
        try:
            check_corpus_disjoint(model["id"], json.loads(digits.read_text()), str(digits))
        except PipelineError as exc:
            fail(str(exc))
    if config["fid"]["oracle"] and dataset["name"] != "demo":
        fail(f"fid.oracle: the oracle classifies the demo's digit scenes only; dataset.name is {dataset['name']!r}. Expected fid.oracle: null")
    for name in TRAIN_METHODS:
        try:
            parse_method(name, set(GENERATE_METHODS))
        except PipelineError as exc:
            fail(f"train.methods: {exc}")
        try:
            TrainSettings.from_config(config, name)
        except PipelineError as exc:
            fail(str(exc))
    try:
        sweeps.check_sweeps(config)
    except PipelineError as exc:
        fail(str(exc))


check_config()


_RUN_CONFIGS = {}


def run_config(run):
    """The config of a run name: the base config with the run's sweep overrides (pipeline.sweeps)."""
    if run not in _RUN_CONFIGS:
        _RUN_CONFIGS[run] = sweeps.with_overrides(config, sweeps.split_run_name(run)[1])
    return _RUN_CONFIGS[run]


def job_method(wildcards):
    """The method of a job's run name (its {method} wildcard without the sweep overrides)."""
    return sweeps.split_run_name(wildcards.method)[0]


def override_args(wildcards):
    """A run's sweep overrides as the job's "--set key=value" arguments, quoted (use without :q)."""
    overrides = sweeps.split_run_name(wildcards.method)[1]
    return " ".join(f"--set {shlex.quote(f'{key}={sweeps.format_value(value)}')}" for key, value in sorted(overrides.items()))


def settings_params(settings_class, module, *job_wildcards):
    """A rule's params: the key of its job's settings (pipeline.settings), which is every config value
    that can change the job's output, and the hash of the code the job runs (`module`'s closure).

    `job_wildcards` name the wildcards the settings take from the job (e.g. "method"); without any,
    every job of the rule has the same settings. A "method" wildcard is a run name: its settings
    are read from the run's config, for its method.
    """
    if not job_wildcards:
        return {"cfg": stable_json(settings_class.from_config(config).key()), "code": code_hash(module)}

    def key(wildcards):
        job = {name: wildcards[name] for name in job_wildcards}
        run = config
        if "method" in job:
            run = run_config(job["method"])
            job["method"] = job_method(wildcards)
        return stable_json(settings_class.from_config(run, **job).key())

    return {"cfg": key, "code": code_hash(module)}


def resolved_config_file():
    """The validated config with defaults, written once under a content hash.

    Jobs read it with `--config`, so a stage sees exactly the configuration of this Snakemake run
    (including --config/--configfile overrides). It is not an input: rerun decisions come from params.
    """
    path = Path(R) / ".config" / f"config-{value_hash(config)}.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=True))
        os.replace(tmp, path)
    return str(path)


# Every job runs `python -m pipeline <stage> --config {CONFIG_FILE} ...`; Snakemake sets
# OMP_NUM_THREADS and friends to the job's threads. Quoted once here for the shells, as every other
# path in a rule's command is with `:q`: `results` may hold spaces or `$(...)`.
CONFIG_FILE = shlex.quote(resolved_config_file())


def model_input():
    """The checkpoint folder when this workflow builds it; the files of a local checkpoint folder that
    a load reads (checkpoint.model_files); nothing for hub ids."""
    model = config["model"]
    if model["build_tiny"]:
        return [model["id"]]
    return model_files(model["id"]) if is_local(model["id"]) else []


def tokens_input(wildcards):
    if "tokens" in methods.get(job_method(wildcards)).needs:
        return layout.tokens(R, wildcards.k, wildcards.seed)
    return []


def adapter_input(wildcards):
    adapter = methods.get(job_method(wildcards)).adapter
    return layout.adapter(R, adapter, wildcards.k, wildcards.seed) if adapter else []


def captions_input(wildcards):
    if "captions" in methods.get(job_method(wildcards)).needs:
        return layout.captions(R, wildcards.k, wildcards.seed)
    return []


def erased_input(wildcards):
    """The erased model for a job of a run with erase.enabled (a generate job; mvc has no run: the base config's)."""
    run = run_config(wildcards.method) if "method" in wildcards.keys() else config
    return layout.erased(R) if run["erase"]["enabled"] else []


def synthetic_shards_for(wildcards):
    """Shards of the train run's synthetic part (none for augmentation-only methods): those of the
    generation run with the overrides its images depend on."""
    run = sweeps.synthetic_run(config, wildcards.method)
    return [] if run is None else layout.shards(R, run, wildcards.k, wildcards.seed, NUM_SHARDS)


def report_outputs():
    return [f"{layout.report_dir(R)}/summary.csv", f"{layout.report_dir(R)}/index.html"]


def folder_args(wildcards, input):
    """generate's and mvc's "--tokens <path>", "--adapter <path>", "--erased <path>" and "--captions
    <path>" for the inputs the job has, quoted, so used as {params.folders} without :q."""
    return " ".join(f"--{name} {shlex.quote(input[name])}" for name in ("tokens", "adapter", "erased", "captions") if input.get(name))


def out_dir(wildcards, output):
    """The folder a multi-file stage writes into: that of its first output."""
    return str(Path(output[0]).parent)


def log_path(rule_name, job_name):
    return f"{R}/logs/{rule_name}/{job_name}.log"


def benchmark_path(rule_name, job_name):
    return f"{R}/benchmarks/{rule_name}/{job_name}.tsv"


# download ----------------------------------------------------------------------------------------

from pipeline.download import ARCHIVES, MARKER, TORCHVISION_DATASETS

DOWNLOADABLE = sorted([*ARCHIVES, *TORCHVISION_DATASETS])
DOWNLOADING = config["dataset"]["download"]

if DOWNLOADING and config["dataset"]["name"] not in DOWNLOADABLE:
    fail(f"dataset.download: true needs dataset.name to be one of {DOWNLOADABLE}. Got {config['dataset']['name']!r}")


def download_marker():
    """The completion marker when this workflow downloads the dataset; nothing otherwise."""
    return [f"{config['dataset']['root']}/{MARKER}"] if DOWNLOADING else []


def dataset_listing(wildcards):
    """prepare's param for the dataset's contents: a fingerprint of (path, size, mtime) of the files
    its reader reads, so adding, removing or replacing one reruns prepare and what depends on it.

    A dataset this workflow writes itself (demo, dataset.download) is an input of prepare instead: its
    files do not exist yet when the DAG is built, and listing them then would rerun prepare once later.
    """
    if config["dataset"]["name"] == "demo" or DOWNLOADING:
        return "written by the workflow"
    from pipeline.datasets.listing import listing_fingerprint

    return listing_fingerprint(config["dataset"])


# invert ------------------------------------------------------------------------------------------


def class_tokens_dir(results, k, trial_seed, class_index):
    """The tokens folder of one class of one subset (per_class mode)."""
    return f"{results}/invert/classes/{layout.subset_name(k, trial_seed)}/class-{class_index}"


def read_classes(path):
    with open(path) as handle:
        return json.load(handle)


def class_name_of(wildcards, input):
    return read_classes(input.classes)[int(wildcards.class_index)]


def per_class_tokens(wildcards):
    """One tokens folder per class of classes.json, in its order (the order of a single job's output).

    Asks the `prepare` checkpoint, so only per_class mode's DAG waits on prepare."""
    classes = read_classes(checkpoints.prepare.get().output.classes)
    return [class_tokens_dir(R, wildcards.k, wildcards.seed, i) for i in range(len(classes))]


# export ------------------------------------------------------------------------------------------

# With generate.export_dir set, each synthetic set is also written as plain PNG folders.
EXPORT_DIR = config["generate"]["export_dir"]


def export_outputs():
    """The export index of every synthetic set the config asks for; none without generate.export_dir."""
    if EXPORT_DIR is None:
        return []
    return [f"{EXPORT_DIR}/{m}/{layout.subset_name(k, s)}/images.csv" for m in GENERATE_RUNS for k, s in PAIRS]
