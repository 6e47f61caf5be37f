"""The static HTML page: every number escaped or formatted, each cell keyed to report.json."""


from __future__ import annotations

import json
import math
from typing import Any

from supersub.report.sources import ERROR_MODELS

FORMAT_VERSION = 1
# ----------------------------------------------------------------------------- HTML
CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:2px 8px}
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
img.fig{max-width:100%;display:block;margin:.5em 0}.notes{background:#fff6d5;padding:.4em 1em .4em 2em}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.grid img{max-width:600px}
figure.g{margin:0;width:168px;font-size:12px}figure.g img{width:160px;image-rendering:pixelated}
.cross{color:#b00}h3{margin-top:1.6em}section{border-top:3px solid #888;margin-top:2em}"""


def fmt(value: Any, spec: str) -> str:
    """How the page prints a number: ``format(value, spec)``, a dash when there is none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _e(text: Any) -> str:
    import html

    return html.escape(str(text), quote=True)


def _td(key: str, value: Any, spec: str) -> str:
    # data-key / data-fmt: where the number is in report.json and how it was printed (the test reads them).
    if value is None:
        return '<td class="n">–</td>'
    return f'<td class="n" data-key="{_e(key)}" data-fmt="{_e(spec)}">{fmt(value, spec)}</td>'


def _table(head: list[str], rows: list[str]) -> str:
    return "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + "".join(
        f"<tr>{r}</tr>" for r in rows) + "</table>"


def _img(sec: dict[str, Any], key: str, alt: str) -> str:
    # A link to the PNG itself: a browser then shows it at full size (big confusion matrices).
    path = sec["figures"].get(key)
    return f'<a href="{_e(path)}"><img class="fig" src="{_e(path)}" alt="{_e(alt)}"></a>' if path else ""


def _section_html(sec: dict[str, Any], i: int) -> str:
    """One run (or study variant): the parts in the order the issue lists them, figures beside tables."""
    from supersub.plots import LABELS

    k, models, label = f"sections.{i}", sec["models"], lambda m: _e(LABELS.get(m, m))
    r, hier = sec["routing"], sec["hierarchy"]
    out = [f'<section id="{_e(sec["slug"] or "run")}"><h2>{_e(sec["name"])}</h2><p>Test split '
           f'<b>{_e(sec["test_split"])}</b>, hierarchy <b>{_e(hier["name"])}</b> ({len(hier["superclasses"])} '
           f'superclasses, {sum(hier["sizes"])} classes), resident network: <b>{_e(sec["resident"])}</b>. Routing '
           f'calibrated on val: hard (resident weight {_e(r.get("hard", {}).get("resident_weight"))}), soft (k '
           f'{_e(r.get("soft", {}).get("k"))}, threshold {_e(r.get("soft", {}).get("threshold"))}, resident weight '
           f'{_e(r.get("soft", {}).get("resident_weight"))}). Confusions and gallery: <b>{label(sec["model"])}</b>.</p>']
    if sec["notes"]:
        out.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in sec["notes"]) + "</ul>")
    cols = [("top1", ".2f"), ("top5", ".2f"), ("superclass_acc", ".2f"), ("stage1_superclass_acc", ".2f"),
            ("crossing_error_share", ".1f"), ("mistake_severity", ".3f"), ("specialist_passes_per_image", ".2f")]
    rows = [f"<td>{label(m)}</td>" + "".join(_td(f"{k}.models.{m}.{c}", v.get(c), f) for c, f in cols)
            for m, v in models.items()]
    out += ["<h3>Vanilla vs two-stage (hard, soft) vs oracle routing</h3>",
            _table(["model", "top-1 %", "top-5 %", "superclass %", "stage-one superclass %", "errors crossing %",
                    "mistake severity", "specialist passes / image"], rows), _img(sec, "models", "accuracy per model")]
    out += [_errors_html(sec, k), _gallery_html(sec)]
    cols = [("classes", "d"), ("vanilla", ".2f"), ("vanilla_within", ".2f"), ("specialist", ".2f"), ("gain", "+.2f"),
            ("two_stage", ".2f"), ("specialist_val_acc", ".2f"), ("delta_ratio", ".4f")]
    rows = [f"<td>{_e(p['name'])}</td>" + "".join(_td(f"{k}.per_superclass.{j}.{c}", p[c], f) for c, f in cols)
            for j, p in enumerate(sec["per_superclass"])]
    out += ["<h3>Per superclass: specialist vs vanilla</h3><p>Top-1 on the superclass's test images. "
            "“Vanilla within” keeps the vanilla network's answer inside the true superclass (perfect routing), "
            "the fair match for a specialist under oracle routing.</p>",
            _table(["superclass", "classes", "vanilla %", "vanilla within %", "specialist (oracle) %", "gain",
                    f"{LABELS[sec['model']]} %", "specialist val %", "delta / network"], rows),
            _img(sec, "per_superclass", "per-superclass accuracy")]
    out.append(_storage_html(sec, k))
    rows = [f"<td>{label(m)}</td>" + _td(f"{k}.severity.{m}.mistake_severity", v["mistake_severity"], ".3f")
            + _td(f"{k}.severity.{m}.mean_lca_height", v["mean_lca_height"], ".3f") for m, v in sec["severity"].items()]
    out += ["<h3>Mistake severity</h3><p>Height of the lowest common ancestor of the true and predicted class "
            "(0: correct; higher: a worse mistake), over errors and over all images.</p>",
            _table(["model", "mean over errors", "mean over all images"], rows), _img(sec, "severity", "mistake severity")]
    return "\n".join(out) + "</section>"


def _errors_html(sec: dict[str, Any], k: str) -> str:
    """Crossing shares, error counts, confusion matrices and the most confused pairs."""
    from supersub.plots import LABELS

    models, label = sec["models"], lambda m: _e(LABELS.get(m, m))
    out = ["<h3>Errors within and across superclasses</h3>"]
    if "errors" not in sec:  # no predictions.parquet: the shares metrics.json has
        rows = [f"<td>{label(m)}</td>" + _td(f"{k}.models.{m}.crossing_error_share", models[m]["crossing_error_share"], ".1f")
                for m in ERROR_MODELS if "crossing_error_share" in models.get(m, {})]
        return "\n".join([*out, _table(["model", "crossing share %"], rows)])
    rows = [f"<td>{label(m)}</td>" + _td(f"{k}.errors.{m}.errors", e["errors"], "d")
            + _td(f"{k}.errors.{m}.within", e["within"], "d") + _td(f"{k}.errors.{m}.crossing", e["crossing"], "d")
            + _td(f"{k}.models.{m}.crossing_error_share", models[m].get("crossing_error_share"), ".1f")
            for m, e in sec["errors"].items()]
    out += [_table(["model", "errors", "within the superclass", "crossing", "crossing share %"], rows),
            _img(sec, "errors", "errors within and across superclasses"),
            _img(sec, "confusion_superclass", "superclass confusion"),
            "<details><summary>Within each superclass (the extra column: errors that left it)</summary>"
            '<div class="grid">' + "".join(_img(sec, f"confusion_{w['superclass']:03d}", "within-superclass confusion")
                                           for w in sec["confusion"]["within"]) + "</div></details>"]
    rows = [f"<td>{_e(p['true_name'])} ({_e(p['true_super'])})</td><td>{_e(p['pred_name'])} "
            f"({_e(p['pred_super'])})</td>" + _td(f"{k}.pairs.{j}.count", p["count"], "d")
            + f"<td>{'crossing' if p['crossing'] else 'within'}</td>" + _td(f"{k}.pairs.{j}.lca_height", p["lca_height"], "d")
            for j, p in enumerate(sec["pairs"])]
    out += [f"<h3>Most confused pairs ({label(sec['model'])})</h3>",
            _table(["true class (superclass)", "predicted as", "images", "superclasses", "LCA height"], rows)]
    return "\n".join(out)


def _gallery_html(sec: dict[str, Any]) -> str:
    """One row of captioned thumbnails per confused pair, the most confused first."""
    from supersub.plots import LABELS

    if not sec.get("gallery"):
        return ""
    out = [f"<h3>Misclassified images ({_e(LABELS[sec['model']])}), the most confused pairs first</h3>"]
    for g in sec["gallery"]:
        true, pred = f"{_e(g['true_name'])} ({_e(g['true_super'])})", f"{_e(g['pred_name'])} ({_e(g['pred_super'])})"
        cross = ' <span class="cross">across superclasses</span>' if g["crossing"] else ""
        out.append(f'<h4>{true} → {pred}: {g["count"]} images{cross}</h4><div class="gallery grid">')
        out += [f'<figure class="g"><img src="{_e(im["file"])}" alt="{_e(im["uri"])}"><figcaption>'
                f"true: {true}, p={fmt(im['true_prob'], '.2f')}<br>predicted: {pred}, p={fmt(im['prob'], '.2f')}"
                "</figcaption></figure>" for im in g["images"]]
        out.append("</div>")
    return "\n".join(out)


def _storage_html(sec: dict[str, Any], k: str) -> str:
    from supersub.plots import LABELS

    st = sec.get("storage")
    if not st:
        return ""
    rows = [f"<td>{_e(p['name'])}</td>" + _td(f"{k}.storage.per_specialist.{j}.bytes", p["bytes"], ",d")
            + _td(f"{k}.storage.per_specialist.{j}.ratio", p["ratio"], ".4f") for j, p in enumerate(st["per_specialist"])]
    rows.append("<td><b>all specialists</b></td>" + _td(f"{k}.storage.specialists_total", st["specialists_total"], ",d")
                + _td(f"{k}.storage.mean_ratio", st["mean_ratio"], ".4f"))
    n = st["specialists"]
    out = ["<h3>Stored bytes</h3>",
           f"<p>One network: <b>{fmt(st['network'], ',d')}</b> bytes. {n} specialists + the resident network would be "
           f"{n}+1 networks; stored as deltas they take {fmt(st['mean_ratio'], '.3f')}·{n}+1 = "
           f'<b data-key="{k}.storage.total_networks" data-fmt=".3f">{fmt(st["total_networks"], ".3f")}</b> networks '
           "(the paper: N+1 in 0.2N+1).</p>",
           _table(["specialist", "delta bytes", "fraction of a network (mean in the last row)"], rows),
           _img(sec, "bytes", "bytes per specialist")]
    rows = [f"<td>{_e(LABELS.get(p['model'], p['model']))}</td>" + _td(f"{k}.storage.points.{j}.networks", p["networks"], ".3f")
            + _td(f"{k}.storage.points.{j}.top1", p["top1"], ".2f") for j, p in enumerate(st["points"])]
    out += ["<h4>Accuracy at equal total bytes</h4>"]
    if "vanilla_scaled" not in st["baselines"]:
        out.append("<p>No scaled-up vanilla network in this run (<code>baselines.scaled=true</code> trains one).</p>")
    out += [_table(["model", "stored bytes (networks)", "top-1 %"], rows), _img(sec, "accuracy_vs_bytes", "accuracy vs bytes")]
    tune = sec.get("pareto")
    if tune:
        front = [t for t in tune["trials"] if t["trial_id"] in tune["front"]]
        rows = [f"<td>{_e(t['trial_id'])}</td><td>{_e(json.dumps(t['params']))}</td>"
                + _td(f"{k}.pareto.trials.{tune['trials'].index(t)}.delta_ratio", t["delta_ratio"], ".4f")
                + _td(f"{k}.pareto.trials.{tune['trials'].index(t)}.val_acc", t["val_acc"], ".2f") for t in front]
        out += [f"<h4>Accuracy vs bytes: tune run <code>{_e(tune['file'])}</code></h4><p>Each trial's mean "
                "specialist val accuracy over the superclasses it tuned; “this run” is the mean over all of this "
                "run's specialists (comparable when the tune run covered every superclass).</p>",
                _table(["Pareto trial", "settings", "delta / network", "mean specialist val %"], rows),
                _img(sec, "pareto", "Pareto front")]
    return "\n".join(out)


def _study_html(sections: list[dict[str, Any]]) -> str:
    cols = [("vanilla", "top1"), ("vanilla_scaled", "top1"), ("two_stage_hard", "top1"), ("two_stage_soft", "top1"),
            ("two_stage_oracle", "top1"), ("vanilla", "crossing_error_share"), ("two_stage_soft", "crossing_error_share")]
    rows = []
    for i, s in enumerate(sections):
        cells = "".join(_td(f"sections.{i}.models.{m}.{c}", s["models"].get(m, {}).get(c), ".2f") for m, c in cols)
        st = s.get("storage") or {}
        rows.append(f'<td><a href="#{_e(s["slug"])}">{_e(s["name"])}</a></td>' + cells
                    + _td(f"sections.{i}.storage.mean_ratio", st.get("mean_ratio"), ".4f")
                    + _td(f"sections.{i}.storage.total_networks", st.get("total_networks"), ".3f"))
    return "<h2>Variants</h2>" + _table(
        ["variant", "vanilla", "vanilla scaled", "hard", "soft", "oracle", "vanilla cross %", "soft cross %",
         "delta / network", "stored (networks)"], rows)


def render_html(report: dict[str, Any]) -> str:
    """The page: static, no scripts, every string from the data escaped; images are the PNGs beside it."""
    sections = report["sections"]
    body = [f"<h1>supersub report: {_e(report['title'])}</h1><p>Source: <code>{_e(report['run'])}</code> "
            f"({_e(report['kind'])}). Every number here is in <code>report.json</code>.</p>"]
    if report["kind"] == "study" and len(sections) > 1:
        body.append(_study_html(sections))
    body += [_section_html(s, i) for i, s in enumerate(sections)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>supersub report: '
            f"{_e(report['title'])}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


