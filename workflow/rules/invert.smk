# invert: textual inversion, one learned token per class, trained on each few-shot subset.


rule invert:
    input:
        model_input(),
        subset=layout.subset(R, "{k}", "{seed}"),
    output:
        directory(layout.tokens(R, "{k}", "{seed}")),
    params:
        # A resumed run ends bitwise equal to an uninterrupted one: checkpointing changes no result.
        **stage_params("pipeline.invert", "model", "invert", "seed", drop=["model.build_tiny", "invert.checkpoint_every"]),
    log:
        log_path("invert", SUBSET),
    benchmark:
        benchmark_path("invert", SUBSET)
    threads: 1
    resources:
        gpu=1,
    shell:
        "python -m pipeline invert --config {CONFIG_FILE} --subset {input.subset} --out {output} > {log} 2>&1"
