# train: one classifier per (method, examples per class, trial seed); methods x k x seeds jobs.


rule train:
    input:
        subset=layout.subset(R, "{k}", "{seed}"),
        manifest=layout.manifest(R),
        shards=synthetic_shards_for,
    output:
        layout.metrics(R, "{method}", "{k}", "{seed}"),
    params:
        **stage_params("pipeline.train", "train", "dataset.name", "seed", drop=["train.methods"]),
    log:
        log_path("train", "{method}/" + layout.subset_name("{k}", "{seed}")),
    benchmark:
        benchmark_path("train", "{method}/" + layout.subset_name("{k}", "{seed}"))
    threads: workflow.cores
    resources:
        gpu=1,
    shell:
        RUN + " train " + CONFIG_ARG + " --subset {input.subset} --manifest {input.manifest}"
        " --synthetic {input.shards} --method {wildcards.method} --seed {wildcards.seed} --out {output} > {log} 2>&1"
