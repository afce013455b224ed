"""HTML reports: ``sub-<label>.html`` per subject and ``group.html``.

Stages put figures under ``sub-<label>/figures/`` (``group/`` for the group) with a
``desc`` that says what they show; the reports gather them with the numbers found in
the sidecars. Plain HTML with the SVG figures linked, readable offline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ldae_bids import __version__
from ldae_bids.bids.io import atomic_write_text

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #446}h2{margin-top:1.6em;color:#335}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
.meta{color:#666;font-size:.85em}
"""

CAPTIONS = {
    "qc": "Preprocessing QC: the model-ready image with the brain-mask outline (red) and the template brain "
          "outline (blue). The outlines should follow each other.",
    "reconstruction": "Input (model grid), LDAE reconstruction and absolute difference.",
    "manipulation": "Counterfactuals: the image moved along a probe direction at several strengths.",
    "synthetic": "Synthetic sessions filled between real visits.",
    "groupqc": "QC figures of every session (collect-qc): flagged sessions in red, the most deviant labelled.",
}


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
            f"<p class='meta'>ldae-bids {html.escape(__version__)}</p></body></html>\n")


def _caption(fig: Path) -> str:
    desc = next((p[5:] for p in fig.stem.split("_") if p.startswith("desc-")), "")
    for key, text in CAPTIONS.items():
        if desc.startswith(key):
            return text
    return desc


def _figures(folder: Path, root: Path) -> str:
    out = []
    for fig in sorted(folder.glob("*.svg")) + sorted(folder.glob("*.png")):
        rel = fig.relative_to(root).as_posix()
        out.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(fig.stem)}'>"
                   f"<figcaption><b>{html.escape(fig.stem)}</b>: {html.escape(_caption(fig))}</figcaption></figure>")
    return "\n".join(out)


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _metrics(root: Path, subject: str) -> list[dict]:
    """Numbers worth showing from the subject's image sidecars (QC, reconstruction)."""
    rows = []
    for side in sorted((root / f"sub-{subject}").rglob("*.json")):
        try:
            data = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        metrics = data.get("QC") or data.get("Metrics")
        if isinstance(metrics, dict):
            rows.append({"file": side.stem, **{k: v for k, v in metrics.items() if not isinstance(v, dict | list)}})
    return rows


def write_subject_report(settings, subject) -> Path:
    root = settings.output_dir
    folder = root / f"sub-{subject.label}" / "figures"
    sessions = ", ".join(s.key for s in subject.sessions)
    body = [f"<p>Sessions: {html.escape(sessions)}</p>"]
    metrics = _metrics(root, subject.label)
    if metrics:
        body.append("<h2>Metrics</h2>" + _table(metrics))
    figs = _figures(folder, root) if folder.is_dir() else ""
    body.append("<h2>Figures</h2>" + (figs or "<p>No figures (no stage made any yet).</p>"))
    crashes = sorted((root / "logs").glob(f"crash-*-sub-{subject.label}-*.txt"))
    if crashes:
        body.append("<h2>Errors</h2><ul>" + "".join(
            f"<li><a href='{html.escape(c.relative_to(root).as_posix())}'>{html.escape(c.name)}</a></li>"
            for c in crashes[-5:]) + "</ul>")
    return atomic_write_text(root / f"sub-{subject.label}.html", _page(f"ldae-bids: sub-{subject.label}",
                                                                        "\n".join(body)))


def write_group_report(settings) -> Path:
    root = settings.output_dir
    group = root / "group"
    body = []
    qc = group / "desc-qc_metrics.tsv"
    if qc.is_file():
        body.append(_qc_section(qc, root))
    metrics = group / "desc-probes_metrics.tsv"
    if metrics.is_file():
        import pandas as pd

        df = pd.read_csv(metrics, sep="\t")
        body.append("<h2>Linear probes (subject-grouped cross-validation, 95% bootstrap intervals)</h2>"
                    + _table(df.to_dict(orient="records")))
    figs = _figures(group, root) if group.is_dir() else ""
    body.append("<h2>Figures</h2>" + (figs or "<p>No group figures yet.</p>"))
    return atomic_write_text(root / "group.html", _page("ldae-bids: group report", "\n".join(body)))


def _qc_section(path: Path, root: Path) -> str:
    """Summary of the collect-qc table: how many sessions were flagged, and which, with links to their reports."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    flagged = df[df["qc_flagged"] == "True"] if "qc_flagged" in df.columns else df.iloc[:0]
    rel = html.escape(path.relative_to(root).as_posix())
    text = (f"<h2>Quality control</h2><p>{len(df)} session(s); <b>{len(flagged)}</b> flagged for a look "
            f"(failed registration check, or a value far from the others). All values: <a href='{rel}'>{rel}</a>.</p>")
    from ldae_bids.stages.qc import MIN_FOR_OUTLIERS

    if len(df) < MIN_FOR_OUTLIERS:
        text += (f"<p>Outliers are judged only with at least {MIN_FOR_OUTLIERS} sessions: here only failed "
                 "registration checks are flagged.</p>")
    if not len(flagged):
        return text
    rows = []
    for _, r in flagged.iterrows():
        pid = str(r["participant_id"])
        link = f"<a href='{html.escape(pid)}.html'>{html.escape(pid)}</a>"
        ses = str(r.get("session_id", "n/a"))
        rows.append(f"<tr><td>{link}</td><td>{html.escape(ses)}</td><td>{html.escape(str(r['qc_flags']))}</td></tr>")
    return text + ("<table><tr><th>participant</th><th>session</th><th>why</th></tr>" + "".join(rows) + "</table>")
