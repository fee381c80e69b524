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
        out=layout.report_dir(R),
    log:
        log_path("report", "report"),
    threads: 1
    shell:
        RUN + " report " + CONFIG_ARG + " --out {params.out} > {log} 2>&1"
