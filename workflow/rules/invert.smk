# invert: textual inversion, one learned token per class, trained on each few-shot subset.
#
# invert.mode decides the jobs; both end in the same tokens folder, layout.tokens(R, k, seed),
# which is all that generate, train and report read:
#
#   joint      one `invert` job per subset trains every class's token together (batches mix classes).
#   per_class  one `invert` job per (subset, class), each on its own GPU or SLURM job, then one
#              cheap `merge_tokens` job per subset. The class list is only known once `prepare` has
#              run, so the merge job asks the `prepare` checkpoint for classes.json; joint mode never
#              does, and its DAG stays fully known up front.
#
# A per-class folder is named by the class's index in classes.json (class-0, class-1, ...), not by
# its name: names such as "traffic light" or "hot/cold" make poor paths and wildcards. A per-class
# job equals, bit for bit, that class's run inside a single per_class job: a run's random draws are
# keyed by (seed, trial, class name) only.
#
# After either, `token_samples` renders a few text-to-image samples of every learned token (the
# quality signal of the report); it is a separate job so the tokens folder stays invert's alone.

# Changing the sample settings re-renders samples, never re-learns tokens.
# A resumed run ends bitwise equal to an uninterrupted one: checkpointing changes no result either.
INVERT_PARAMS = settings_params(InvertSettings, "pipeline.invert")


if config["invert"]["mode"] == "joint":

    rule invert:
        input:
            model_input(),
            subset=layout.subset(R, "{k}", "{seed}"),
        output:
            directory(layout.tokens(R, "{k}", "{seed}")),
        params:
            **INVERT_PARAMS,
        log:
            log_path("invert", SUBSET),
        benchmark:
            benchmark_path("invert", SUBSET)
        threads: config["cpu_threads"]
        resources:
            gpu=1,
        shell:
            "python -m pipeline invert --config {CONFIG_FILE} --subset {input.subset:q} --out {output:q} > {log:q} 2>&1"

else:

    rule invert:
        input:
            model_input(),
            subset=layout.subset(R, "{k}", "{seed}"),
            classes=layout.prepared(R, layout.CLASSES_FILE),
        output:
            directory(class_tokens_dir(R, "{k}", "{seed}", "{class_index}")),
        wildcard_constraints:
            class_index=r"\d+",
        params:
            **INVERT_PARAMS,
            class_name=class_name_of,
        log:
            log_path("invert", f"{SUBSET}/class-{{class_index}}"),
        benchmark:
            benchmark_path("invert", f"{SUBSET}/class-{{class_index}}")
        threads: config["cpu_threads"]
        resources:
            gpu=1,
        shell:
            "python -m pipeline invert --config {CONFIG_FILE} --subset {input.subset:q} --class {params.class_name:q}"
            " --out {output:q} > {log:q} 2>&1"

    rule merge_tokens:
        input:
            per_class_tokens,
        output:
            directory(layout.tokens(R, "{k}", "{seed}")),
        params:
            code=code_hash("pipeline.invert"),
        log:
            log_path("merge_tokens", SUBSET),
        threads: 1
        shell:
            "python -m pipeline merge-tokens --config {CONFIG_FILE} --tokens {input:q} --out {output:q} > {log:q} 2>&1"


rule token_samples:
    input:
        model_input(),
        tokens=layout.tokens(R, "{k}", "{seed}"),
    output:
        grid=layout.token_samples(R, "{k}", "{seed}"),
        legend=layout.grid_legend(layout.token_samples(R, "{k}", "{seed}")),
    params:
        **settings_params(TokenSampleSettings, "pipeline.token_samples"),
    log:
        log_path("token_samples", SUBSET),
    benchmark:
        benchmark_path("token_samples", SUBSET)
    threads: config["cpu_threads"]
    resources:
        gpu=1,
    shell:
        "python -m pipeline token-samples --config {CONFIG_FILE} --tokens {input.tokens:q} --out {output.grid:q} > {log:q} 2>&1"
