# generate: SDEdit synthetic images, one Parquet shard per job (generate.num_shards jobs per subset).


def tokens_arg(wildcards, input):
    return f"--tokens {input.tokens}" if input.get("tokens") else ""


rule generate:
    input:
        model_input(),
        subset=layout.subset(R, "{k}", "{seed}"),
        tokens=tokens_input,
    output:
        layout.shard(R, "{method}", "{k}", "{seed}", "{shard}", "{total}"),
    params:
        # batch_size is left out: images do not depend on it, so changing it reruns nothing.
        **stage_params(
            "pipeline.generate",
            "model",
            "generate",
            "seed",
            drop=["model.build_tiny", "generate.batch_size", "generate.methods", "generate.num_shards"],
        ),
        tokens=tokens_arg,
    log:
        log_path("generate", "{method}/" + layout.subset_name("{k}", "{seed}") + "/shard-{shard}-of-{total}"),
    benchmark:
        benchmark_path("generate", "{method}/" + layout.subset_name("{k}", "{seed}") + "/shard-{shard}-of-{total}")
    threads: 1
    resources:
        gpu=1,
    shell:
        RUN + " generate " + CONFIG_ARG + " --subset {input.subset} {params.tokens} --method {wildcards.method}"
        " --shard {wildcards.shard} --num-shards {wildcards.total} --out {output} > {log} 2>&1"
