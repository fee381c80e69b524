# dreambooth: one DreamBooth-LoRA adapter per few-shot subset (pipeline/dreambooth.py), for the
# generation methods that need it (methods.py: adapter "dreambooth"); no job when none is configured.
# A resumed run ends bitwise equal to an uninterrupted one: checkpointing changes no result.


rule dreambooth:
    input:
        model_input(),
        subset=layout.subset(R, "{k}", "{seed}"),
    output:
        directory(layout.adapter(R, "dreambooth", "{k}", "{seed}")),
    params:
        **settings_params(DreamBoothSettings, "pipeline.dreambooth"),
    log:
        log_path("dreambooth", SUBSET),
    benchmark:
        benchmark_path("dreambooth", SUBSET)
    threads: config["cpu_threads"]
    resources:
        gpu=1,
    shell:
        "python -m pipeline dreambooth --config {CONFIG_FILE} --subset {input.subset:q} --out {output:q} > {log:q} 2>&1"
