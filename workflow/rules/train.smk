# train: one classifier per (run, examples per class, trial seed); runs x k x seeds jobs, where the
# runs are the methods and their sweep variants (pipeline.sweeps).


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
        method=job_method,
        overrides=override_args,  # a sweep variant's "--set key=value ...", or nothing
    log:
        log_path("train", f"{{method}}/{SUBSET}"),
    benchmark:
        benchmark_path("train", f"{{method}}/{SUBSET}")
    threads: config["cpu_threads"]
    resources:
        gpu=1,
    shell:
        "python -m pipeline train --config {CONFIG_FILE} {params.overrides} --subset {input.subset:q} --manifest {input.manifest:q}"
        " --synthetic {input.shards:q} --method {params.method:q} --seed {wildcards.seed:q} --out {output:q} > {log:q} 2>&1"
