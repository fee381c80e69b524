# download: fetch the dataset into dataset.root (dataset.download: true, on a machine with network).
#
# Its output is the completion marker pipeline.download writes last, which prepare takes as input.
# params carry the dataset's name and root only, not a code hash: an edit to the download code must
# not fetch 20 GB again. The marker records the archives and digests that were fetched.

from pipeline.download import ARCHIVES, MARKER, TORCHVISION_DATASETS

DOWNLOADABLE = sorted([*ARCHIVES, *TORCHVISION_DATASETS])
DOWNLOADING = config["dataset"]["download"]

if DOWNLOADING and config["dataset"]["name"] not in DOWNLOADABLE:
    fail(f"dataset.download: true needs dataset.name to be one of {DOWNLOADABLE}. Got {config['dataset']['name']!r}")


def download_marker():
    """The completion marker when this workflow downloads the dataset; nothing otherwise."""
    return [f"{config['dataset']['root']}/{MARKER}"] if DOWNLOADING else []


if DOWNLOADING:

    rule download_dataset:
        output:
            download_marker(),
        params:
            name=config["dataset"]["name"],
            root=config["dataset"]["root"],
        log:
            log_path("download_dataset", config["dataset"]["name"]),
        benchmark:
            benchmark_path("download_dataset", config["dataset"]["name"])
        threads: 1
        shell:
            "python -m pipeline download --config {CONFIG_FILE} > {log} 2>&1"
