# prepare: dataset -> manifest.parquet (+ classes.json, stats.json, masks/) -> few-shot subsets.


if config["model"]["build_tiny"]:

    rule build_tiny_model:
        output:
            directory(config["model"]["id"]),
        params:
            **stage_params("pipeline.tiny_sd", "model.resolution", "seed"),
        log:
            log_path("build_tiny_model", "model"),
        benchmark:
            benchmark_path("build_tiny_model", "model")
        threads: 1
        shell:
            "python -m pipeline build-model --config {CONFIG_FILE} --out {output:q} > {log:q} 2>&1"


if config["dataset"]["name"] == "demo":

    rule build_demo_dataset:
        output:
            directory(config["dataset"]["root"]),
        params:
            **stage_params("pipeline.demo", "dataset.demo", "seed"),
        log:
            log_path("build_demo_dataset", "demo"),
        benchmark:
            benchmark_path("build_demo_dataset", "demo")
        threads: 1
        shell:
            "python -m pipeline build-demo --config {CONFIG_FILE} --out {output:q} > {log:q} 2>&1"


checkpoint prepare:
    input:
        [config["dataset"]["root"]] if config["dataset"]["name"] == "demo" else download_marker(),
    output:
        manifest=layout.manifest(R),
        classes=f"{R}/prepare/classes.json",
        stats=f"{R}/prepare/stats.json",
        masks=directory(f"{R}/prepare/masks"),
    params:
        **stage_params(
            "pipeline.prepare",
            "dataset",
            "seed",
            drop=["dataset.examples_per_class", "dataset.trial_seeds", "dataset.allow_fewer", "dataset.demo", "dataset.download"],
        ),
        out=out_dir,
        listing=dataset_listing,
    log:
        log_path("prepare", "prepare"),
    benchmark:
        benchmark_path("prepare", "prepare")
    threads: 8
    shell:
        "python -m pipeline prepare --config {CONFIG_FILE} --out {params.out:q} --threads {threads} > {log:q} 2>&1"


rule fewshot:
    input:
        manifest=layout.manifest(R),
    output:
        layout.subset(R, "{k}", "{seed}"),
    params:
        **stage_params("pipeline.fewshot", "dataset.allow_fewer", "seed"),
    log:
        log_path("fewshot", SUBSET),
    threads: 1
    shell:
        "python -m pipeline fewshot --config {CONFIG_FILE} --manifest {input.manifest:q}"
        " --examples-per-class {wildcards.k:q} --trial-seed {wildcards.seed:q} --out {output:q} > {log:q} 2>&1"
