"""Argument-vector fixes that click cannot express.

BIDS Apps take options with several space-separated values
(``--participant-label 01 02``) and the underscore spellings of fMRIPrep
(``--participant_label``). Click takes neither, so the argument vector is rewritten
to repeated options (``--participant-label 01 --participant-label 02``) first.
"""

from __future__ import annotations

import re

MULTI = {
    "--participant-label", "--session-label", "--stages", "--skip-stages", "--targets", "--strengths",
    "--fill-months", "--derivatives", "--probe", "--stage-option",
}
ALIASES = {
    "--participant_label": "--participant-label",
    "--session_label": "--session-label",
    "--bids-filter_file": "--bids-filter-file",
    "--bids_filter_file": "--bids-filter-file",
    "--work_dir": "--work-dir",
    "--bids_database_dir": "--bids-database-dir",
    "--skip_bids_validation": "--skip-bids-validation",
    "--omp_nthreads": "--omp-nthreads",
    "--random_seed": "--random-seed",
    "--stop_on_first_crash": "--stop-on-first-crash",
    "--config_file": "--config-file",
    "--reports_only": "--reports-only",
    "--n_cpus": "--nprocs",
    "--n-cpus": "--nprocs",
    "--nthreads": "--nprocs",
}
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def expand_argv(argv: list[str]) -> list[str]:
    """Rewrite multi-value options into repeated single-value ones.

    Values run until the next token that starts with ``-`` (negative numbers are
    values). Put the three positional arguments before such options.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok.partition("=")
        name = ALIASES.get(name, name)
        if name in MULTI:
            if eq:
                out += [name, value]
            i += 1
            start = len(out)
            while i < len(argv) and (not argv[i].startswith("-") or _NUMBER.match(argv[i])):
                out += [name, argv[i]]
                i += 1
            if not eq and len(out) == start:
                out.append(name)  # no value: let click report it
            continue
        out.append(name + eq + value if name != tok.partition("=")[0] else tok)
        i += 1
    return out
