# report: summary.csv and a self-contained HTML page (tables, curves, FID, real vs synthetic grids).


rule report:
    input:
        manifest=layout.manifest(R),
        subsets=[layout.subset(R, k, s) for k, s in PAIRS],
        **layout.expected_outputs(config),
    output:
        report_outputs(),
    params:
        **stage_params("pipeline.report", "report", "train.methods", "generate.methods", "dataset"),
        out=out_dir,
    log:
        log_path("report", "report"),
    threads: 1
    shell:
        "python -m pipeline report --config {CONFIG_FILE} --out {params.out} > {log} 2>&1"
