# download: fetch the dataset into dataset.root (dataset.download: true, on a machine with network).
#
# Its output is the completion marker pipeline.download writes last, which prepare takes as input.
# params carry the dataset's name and root only, not a code hash: an edit to the download code must
# not fetch 20 GB again. The marker records the archives and digests that were fetched.

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
            "python -m pipeline download --config {CONFIG_FILE} > {log:q} 2>&1"
