# zeroshot: with zeroshot.model, a pretrained CLIP's accuracy on the test split with no training
# image (pipeline/zeroshot.py), the reference row beside the trained classifiers. One job per task.


def zeroshot_files():
    """A local model config or weights file of zeroshot.* (its contents decide the scores)."""
    section = config["zeroshot"]
    return [path for path in (section["model"], section["pretrained"]) if path and Path(path).is_file()]


rule zeroshot:
    input:
        zeroshot_files(),
        manifest=layout.manifest(R),
    output:
        layout.zeroshot(R),
    params:
        **settings_params(ZeroShotSettings, "pipeline.zeroshot"),
    log:
        log_path("zeroshot", "test"),
    benchmark:
        benchmark_path("zeroshot", "test")
    threads: config["cpu_threads"]
    resources:
        gpu=1,
    shell:
        "python -m pipeline zeroshot --config {CONFIG_FILE} --manifest {input.manifest:q} --out {output:q} > {log:q} 2>&1"
