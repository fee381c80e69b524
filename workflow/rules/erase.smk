# erase: with erase.enabled, the task's class names erased from the UNet once (pipeline/erase.py,
# ESD-x), and every generation job loads the erased model (model-centric leakage prevention).
# A resumed run ends bitwise equal to an uninterrupted one: checkpointing changes no result.


rule erase:
    input:
        model_input(),
        classes=layout.prepared(R, layout.CLASSES_FILE),
    output:
        directory(layout.erased(R)),
    params:
        **settings_params(EraseSettings, "pipeline.erase"),
    log:
        log_path("erase", "erase"),
    benchmark:
        benchmark_path("erase", "erase")
    threads: config["cpu_threads"]
    resources:
        gpu=1,
    shell:
        "python -m pipeline erase --config {CONFIG_FILE} --classes {input.classes:q} --out {output:q} > {log:q} 2>&1"
