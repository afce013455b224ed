"""Analysis of embeddings: linear probes, longitudinal filling maths, simulated longitudinal data.

Pure functions, no CLI; the stages wire them in. Submodules:

* :mod:`.probe` - cross-validated linear probes with baselines, the saved :class:`~.probe.Probe`;
* :mod:`.metrics` - weighted metrics and the subject bootstrap;
* :mod:`.targets` - probe targets from participants.tsv / sessions.tsv;
* :mod:`.longitudinal` - session times, lerp/slerp, fill planning, evaluation baselines;
* :mod:`.simulate` - multi-session subjects with known atrophy from one real scan;
* :mod:`.figures` - ROC, predicted-vs-true and embedding-map figures.

Heavy imports (scikit-learn, scipy, matplotlib) happen inside those modules, not here.
"""
