# report: summary.csv and a self-contained HTML page (tables, curves, FID, real vs synthetic grids).


rule report:
    input:
        manifest=layout.manifest(R),
        subsets=[layout.subset(R, k, s) for k, s in PAIRS],
        **layout.expected_outputs(config, GENERATE_RUNS, TRAIN_RUNS),
    output:
        summary=report(report_outputs()[0], caption="../report/summary.rst", category="Results"),
        page=report(report_outputs()[1], caption="../report/page.rst", category="Results"),
    params:
        **settings_params(ReportSettings, "pipeline.report"),
        out=out_dir,
    log:
        log_path("report", "report"),
    threads: 1
    shell:
        "python -m pipeline report --config {CONFIG_FILE} --out {params.out:q} > {log:q} 2>&1"
