# generate: SDEdit synthetic images, one Parquet shard per job (generate.num_shards jobs per subset).


rule generate:
    input:
        model_input(),
        subset=layout.subset(R, "{k}", "{seed}"),
        tokens=tokens_input,
    output:
        layout.shard(R, "{method}", "{k}", "{seed}", "{shard}", "{total}"),
    params:
        # batch_size is left out: seeds, strengths and prompts do not depend on it (pixels may move by
        # a level or two: CPU/GPU kernels are not batch-invariant), so changing it reruns nothing.
        **stage_params(
            "pipeline.generate",
            "model",
            "generate",
            "seed",
            drop=["model.build_tiny", "generate.batch_size", "generate.flush_every", "generate.methods", "generate.num_shards"],
        ),
        tokens=tokens_arg,
    log:
        log_path("generate", f"{{method}}/{SUBSET}/shard-{{shard}}-of-{{total}}"),
    benchmark:
        benchmark_path("generate", f"{{method}}/{SUBSET}/shard-{{shard}}-of-{{total}}")
    threads: 1
    resources:
        gpu=1,
    shell:
        "python -m pipeline generate --config {CONFIG_FILE} --subset {input.subset} {params.tokens}"
        " --method {wildcards.method} --shard {wildcards.shard} --num-shards {wildcards.total} --out {output} > {log} 2>&1"
