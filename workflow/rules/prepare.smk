# prepare: dataset -> manifest.parquet (+ classes.json, stats.json, masks/) -> few-shot subsets.


if config["model"]["build_tiny"]:

    rule build_tiny_model:
        output:
            directory(config["model"]["id"]),
        params:
            **settings_params(TinyModelSettings, "pipeline.tiny_sd"),
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
            **settings_params(DemoDatasetSettings, "pipeline.demo"),
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
        classes=layout.prepared(R, layout.CLASSES_FILE),
        stats=layout.prepared(R, layout.STATS_FILE),
        masks=directory(layout.prepared(R, layout.MASKS_DIR)),
    params:
        **settings_params(PrepareSettings, "pipeline.prepare"),
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
        **settings_params(FewshotSettings, "pipeline.fewshot"),
    log:
        log_path("fewshot", SUBSET),
    threads: 1
    shell:
        "python -m pipeline fewshot --config {CONFIG_FILE} --manifest {input.manifest:q}"
        " --examples-per-class {wildcards.k:q} --trial-seed {wildcards.seed:q} --out {output:q} > {log:q} 2>&1"
