# caption and mvc: MVC (pipeline/captions.py, pipeline/mvc.py), for the generation methods that mix
# captions (methods.py: captions=True); no job when none is configured. The caption stage needs a GPU
# only for BLIP-2. A resumed mvc run ends bitwise equal to an uninterrupted one. After mvc,
# mix_samples draws a few of the model's images unmixed, fine-mixed and coarse-mixed from the same
# noise, for the report (pipeline/mix_samples.py).


rule caption:
    input:
        subset=layout.subset(R, "{k}", "{seed}"),
        csv=[config["caption"]["csv"]] if config["caption"]["captioner"] == "csv" else [],
    output:
        layout.captions(R, "{k}", "{seed}"),
    params:
        **settings_params(CaptionSettings, "pipeline.captions"),
    log:
        log_path("caption", SUBSET),
    threads: config["cpu_threads"]
    resources:
        gpu=1 if config["caption"]["captioner"] == "blip2" else 0,
    shell:
        "python -m pipeline caption --config {CONFIG_FILE} --subset {input.subset:q} --out {output:q} > {log:q} 2>&1"


rule mvc:
    input:
        model_input(),
        subset=layout.subset(R, "{k}", "{seed}"),
        captions=layout.captions(R, "{k}", "{seed}"),
        erased=erased_input,
    output:
        directory(layout.adapter(R, "mvc", "{k}", "{seed}")),
    params:
        **settings_params(MVCSettings, "pipeline.mvc"),
        folders=folder_args,  # "--captions <quoted path>" and, with erase.enabled, "--erased ..."
    log:
        log_path("mvc", SUBSET),
    benchmark:
        benchmark_path("mvc", SUBSET)
    threads: config["cpu_threads"]
    resources:
        gpu=1,
    shell:
        "python -m pipeline mvc --config {CONFIG_FILE} --subset {input.subset:q} {params.folders} --out {output:q} > {log:q} 2>&1"


rule mix_samples:
    input:
        model=layout.adapter(R, "mvc", "{k}", "{seed}"),
        subset=layout.subset(R, "{k}", "{seed}"),
        captions=layout.captions(R, "{k}", "{seed}"),
    output:
        grid=layout.mix_samples(R, "{k}", "{seed}"),
        legend=layout.grid_legend(layout.mix_samples(R, "{k}", "{seed}")),
    params:
        **settings_params(MixSampleSettings, "pipeline.mix_samples"),
    log:
        log_path("mix_samples", SUBSET),
    benchmark:
        benchmark_path("mix_samples", SUBSET)
    threads: config["cpu_threads"]
    resources:
        gpu=1,
    shell:
        "python -m pipeline mix-samples --config {CONFIG_FILE} --model {input.model:q} --subset {input.subset:q} "
        "--captions {input.captions:q} --out {output.grid:q} > {log:q} 2>&1"
