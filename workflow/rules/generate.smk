# generate: SDEdit synthetic images, one Parquet shard per job (generate.num_shards jobs per subset).


rule generate:
    input:
        model_input(),
        subset=layout.subset(R, "{k}", "{seed}"),
        tokens=tokens_input,
        adapter=adapter_input,
        erased=erased_input,
        captions=captions_input,
    output:
        layout.shard(R, "{method}", "{k}", "{seed}", "{shard}", "{total}"),
    params:
        # The method's GenerateSettings: batch size, flush interval and device are not in its key.
        **settings_params(GenerateSettings, "pipeline.generate", "method"),
        folders=folder_args,  # "--tokens <quoted path>", "--adapter ...", "--erased ...", "--captions ...", or nothing
        method=job_method,
        overrides=override_args,  # a sweep variant's "--set key=value ...", or nothing
    log:
        log_path("generate", f"{{method}}/{SUBSET}/shard-{{shard}}-of-{{total}}"),
    benchmark:
        benchmark_path("generate", f"{{method}}/{SUBSET}/shard-{{shard}}-of-{{total}}")
    threads: config["cpu_threads"]
    resources:
        gpu=1,
    shell:
        "python -m pipeline generate --config {CONFIG_FILE} {params.overrides} --subset {input.subset:q} {params.folders}"
        " --method {params.method:q} --shard {wildcards.shard:q} --num-shards {wildcards.total:q} --out {output:q} > {log:q} 2>&1"


# export: with generate.export_dir set, each synthetic set also as plain PNG folders for other tools,
# <export_dir>/<method>/<subset>/<class name>/<synthetic_id>.png plus images.csv (the rule's output,
# written last). A separate rule, so that exporting never touches generation's caching.

if EXPORT_DIR is not None:

    rule export:
        input:
            lambda wildcards: layout.shards(R, wildcards.method, wildcards.k, wildcards.seed, NUM_SHARDS),
        output:
            f"{EXPORT_DIR}/{{method}}/{SUBSET}/images.csv",
        params:
            code=code_hash("pipeline.export"),
            out=out_dir,
        log:
            log_path("export", f"{{method}}/{SUBSET}"),
        threads: 1
        shell:
            "python -m pipeline export --config {CONFIG_FILE} --synthetic {input:q} --out {params.out:q} > {log:q} 2>&1"
