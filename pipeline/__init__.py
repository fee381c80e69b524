"""Grow small labelled image datasets with diffusion models (DA-Fusion) and measure whether it helped.

Each stage is a plain function in its own module (prepare, invert, generate, fid, train, report),
callable from a notebook, from `python -m pipeline <stage>`, or from the Snakemake workflow.
"""

__version__ = "0.1.0"


class PipelineError(Exception):
    """Bad input or configuration: the message names the file, field or class and what was expected.

    The command line prints it as one line and exits with status 2, without a traceback.
    """
