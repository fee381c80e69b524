# fid: Inception features of real images (once per split), then FID/KID of each synthetic set.


rule fid_real_features:
    input:
        manifest=layout.manifest(R),
    output:
        layout.real_features(R, "{split}"),
    params:
        **settings_params(FidFeatureSettings, "pipeline.fid"),
    log:
        log_path("fid_real_features", "{split}"),
    benchmark:
        benchmark_path("fid_real_features", "{split}")
    threads: 4
    resources:
        gpu=1,
    shell:
        "python -m pipeline fid-features --config {CONFIG_FILE} --manifest {input.manifest:q}"
        " --split {wildcards.split:q} --out {output:q} > {log:q} 2>&1"


rule fid:
    input:
        real=layout.real_features(R, "train"),
        reference=layout.real_features(R, "val"),
        shards=lambda wc: layout.shards(R, wc.method, wc.k, wc.seed, NUM_SHARDS),
    output:
        layout.fid(R, "{method}", "{k}", "{seed}"),
    params:
        **settings_params(FidSettings, "pipeline.fid"),
    log:
        log_path("fid", f"{{method}}/{SUBSET}"),
    benchmark:
        benchmark_path("fid", f"{{method}}/{SUBSET}")
    threads: 4
    resources:
        gpu=1,
    shell:
        "python -m pipeline fid --config {CONFIG_FILE} --real {input.real:q} --reference {input.reference:q}"
        " --synthetic {input.shards:q} --out {output:q} > {log:q} 2>&1"


rule oracle_scores:
    input:
        manifest=layout.manifest(R),
        oracle=model_files(config["fid"]["oracle"]) if config["fid"]["oracle"] else [],
        shards=lambda wc: layout.shards(R, wc.method, wc.k, wc.seed, NUM_SHARDS),
    output:
        layout.oracle_scores(R, "{method}", "{k}", "{seed}"),
    params:
        **settings_params(OracleScoreSettings, "pipeline.oracle"),
    log:
        log_path("oracle_scores", f"{{method}}/{SUBSET}"),
    threads: 1
    shell:
        "python -m pipeline oracle-scores --config {CONFIG_FILE} --manifest {input.manifest:q}"
        " --synthetic {input.shards:q} --out {output:q} > {log:q} 2>&1"
