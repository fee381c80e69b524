# train: one classifier per (method, examples per class, trial seed); methods x k x seeds jobs.


rule train:
    input:
        subset=layout.subset(R, "{k}", "{seed}"),
        manifest=layout.manifest(R),
        shards=synthetic_shards_for,
    output:
        layout.metrics(R, "{method}", "{k}", "{seed}"),
    params:
        # The method's TrainSettings: num_workers, inference_batch_size and device are not in its key.
        **settings_params(TrainSettings, "pipeline.train", "method"),
    log:
        log_path("train", f"{{method}}/{SUBSET}"),
    benchmark:
        benchmark_path("train", f"{{method}}/{SUBSET}")
    threads: config["cpu_threads"]
    resources:
        gpu=1,
    shell:
        "python -m pipeline train --config {CONFIG_FILE} --subset {input.subset:q} --manifest {input.manifest:q}"
        " --synthetic {input.shards:q} --method {wildcards.method:q} --seed {wildcards.seed:q} --out {output:q} > {log:q} 2>&1"
