"""The static HTML page: ONE self-contained file, every number formatted and keyed to report.json.

Every figure and gallery thumbnail is inlined as a ``data:image/png;base64,...`` URI, so the page
renders whole where only the file itself is shown (MLflow's artifact preview, a mail attachment);
the PNGs written beside it are never referenced. No scripts; every string from the data escaped.
Each printed number sits in an element with ``data-key`` (its path in report.json) and
``data-fmt`` (the ``format`` spec it was printed with).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from supersub.report.inputs import error_models
from supersub.report.tables import _e, _num, _table, _td, fmt, models_html, study_html

CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:2px 8px}
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img.fig{max-width:100%;display:block;margin:.5em 0}.notes{background:#fff6d5;padding:.4em 1em .4em 2em}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.grid img{max-width:600px}
figure.g{margin:0;width:168px;font-size:12px}figure.g img{width:160px;image-rendering:pixelated}
tr.served td{background:#eef6ee}.cross{color:#b00}h3{margin-top:1.6em}section{border-top:3px solid #888;margin-top:2em}"""
__all__ = ["CSS", "fmt", "render_html"]


class _Page:
    """Renders report.json's data; ``root`` is the folder its PNG paths are relative to."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def src(self, rel: str) -> str:
        """A PNG under ``root`` as a data URI: the page needs no file beside it."""
        return "data:image/png;base64," + base64.b64encode((self.root / rel).read_bytes()).decode("ascii")

    def img(self, sec: dict[str, Any], key: str, alt: str) -> str:
        path = sec["figures"].get(key)
        return f'<img class="fig" src="{self.src(path)}" alt="{_e(alt)}">' if path else ""

    # ------------------------------------------------------------------ one section
    def section(self, sec: dict[str, Any], i: int) -> str:
        """One run (or study variant): models, errors, gallery, per superclass, bytes, severity."""
        from supersub.plots import label

        k, hier = f"sections.{i}", sec["hierarchy"]
        seed = (f" Seed <b>{_e(sec['seed'])}</b> of the study's seeds {_e(', '.join(sec['seeds']))}."
                if sec.get("seed") is not None else "")
        out = [f'<section id="{_e(sec["slug"] or "run")}"><h2>{_e(sec["name"])}</h2><p>Test split '
               f'<b>{_e(sec["test_split"])}</b>, hierarchy <b>{_e(hier["name"])}</b> ({len(hier["superclasses"])} '
               f'superclasses, {sum(hier["sizes"])} classes), resident network: <b>{_e(sec["resident"])}</b>.{seed} '
               f'{_routing_sentence(sec)} Confusions and gallery: <b>{_e(label(sec["model"]))}</b>.</p>']
        if sec["notes"]:
            out.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in sec["notes"]) + "</ul>")
        out += ["<h3>Models: accuracy beside cost</h3>", models_html(sec, k), self.img(sec, "models", "accuracy per model")]
        out += [self.errors(sec, k), self.gallery(sec)]
        cols = [("classes", "d"), ("vanilla", ".2f"), ("vanilla_within", ".2f"), ("specialist", ".2f"),
                ("gain", "+.2f"), ("two_stage", ".2f"), ("specialist_val_acc", ".2f"), ("delta_ratio", ".4f")]
        rows = [f"<td>{_e(p['name'])}</td>" + "".join(_td(f"{k}.per_superclass.{j}.{c}", p[c], f) for c, f in cols)
                for j, p in enumerate(sec["per_superclass"])]
        out += ["<h3>Per superclass: specialist vs vanilla</h3><p>Top-1 on the superclass's test images. "
                "“Vanilla within” keeps the vanilla network's answer inside the true superclass (perfect routing), "
                "the fair match for a specialist under oracle routing.</p>",
                _table(["superclass", "classes", "vanilla %", "vanilla within %", "specialist (oracle) %", "gain",
                        f"{label(sec['model'])} %", "specialist val %", "delta / network"], rows),
                self.img(sec, "per_superclass", "per-superclass accuracy")]
        out.append(self.storage(sec, k))
        rows = [f"<td>{_e(label(m))}</td>" + _td(f"{k}.severity.{m}.mistake_severity", v["mistake_severity"], ".3f")
                + _td(f"{k}.severity.{m}.mean_lca_height", v["mean_lca_height"], ".3f")
                for m, v in sec["severity"].items()]
        out += ["<h3>Mistake severity</h3><p>Height of the lowest common ancestor of the true and predicted class "
                "(0: correct; higher: a worse mistake), over errors and over all images.</p>",
                _table(["model", "mean over errors", "mean over all images"], rows),
                self.img(sec, "severity", "mistake severity")]
        return "\n".join(out) + "</section>"

    def errors(self, sec: dict[str, Any], k: str) -> str:
        """Crossing shares, error counts, confusion matrices and the most confused pairs."""
        from supersub.plots import label

        models = sec["models"]
        out = ["<h3>Errors within and across superclasses</h3><p>The crossing share's chance level is the share "
               "errors would have if they fell uniformly on the wrong classes.</p>"]
        if "errors" not in sec:  # no predictions.parquet: the shares metrics.json has
            rows = [f"<td>{_e(label(m))}</td>" + _td(f"{k}.models.{m}.crossing_error_share",
                                                    models[m].get("crossing_error_share"), ".1f")
                    + _td(f"{k}.models.{m}.crossing_error_chance", models[m].get("crossing_error_chance"), ".1f")
                    for m in error_models(models)]
            return "\n".join([*out, _table(["model", "crossing share %", "chance %"], rows)])
        rows = [f"<td>{_e(label(m))}</td>" + _td(f"{k}.errors.{m}.errors", e["errors"], "d")
                + _td(f"{k}.errors.{m}.within", e["within"], "d") + _td(f"{k}.errors.{m}.crossing", e["crossing"], "d")
                + _td(f"{k}.models.{m}.crossing_error_share", models[m].get("crossing_error_share"), ".1f")
                + _td(f"{k}.models.{m}.crossing_error_chance", models[m].get("crossing_error_chance"), ".1f")
                for m, e in sec["errors"].items()]
        out += [_table(["model", "errors", "within the superclass", "crossing", "crossing share %", "chance %"], rows),
                self.img(sec, "errors", "errors within and across superclasses"),
                self.img(sec, "confusion_superclass", "superclass confusion"),
                "<details><summary>Within each superclass (the extra column: errors that left it)</summary>"
                '<div class="grid">' + "".join(self.img(sec, f"confusion_{w['superclass']:03d}", "within-superclass "
                                                        "confusion") for w in sec["confusion"]["within"])
                + "</div></details>"]
        rows = [f"<td>{_e(p['true_name'])} ({_e(p['true_super'])})</td><td>{_e(p['pred_name'])} "
                f"({_e(p['pred_super'])})</td>" + _td(f"{k}.pairs.{j}.count", p["count"], "d")
                + f"<td>{'crossing' if p['crossing'] else 'within'}</td>"
                + _td(f"{k}.pairs.{j}.lca_height", p["lca_height"], "d") for j, p in enumerate(sec["pairs"])]
        out += [f"<h3>Most confused pairs ({_e(label(sec['model']))})</h3>",
                _table(["true class (superclass)", "predicted as", "images", "superclasses", "LCA height"], rows)]
        return "\n".join(out)

    def gallery(self, sec: dict[str, Any]) -> str:
        """One row of captioned thumbnails per confused pair, the most confused first."""
        from supersub.plots import label

        if not sec.get("gallery"):
            return ""
        out = [f"<h3>Misclassified images ({_e(label(sec['model']))}), the most confused pairs first</h3>"]
        for g in sec["gallery"]:
            true, pred = f"{_e(g['true_name'])} ({_e(g['true_super'])})", f"{_e(g['pred_name'])} ({_e(g['pred_super'])})"
            cross = ' <span class="cross">across superclasses</span>' if g["crossing"] else ""
            out.append(f'<h4>{true} → {pred}: {g["count"]} images{cross}</h4><div class="gallery grid">')
            out += [f'<figure class="g"><img src="{self.src(im["file"])}" alt="{_e(im["uri"])}"><figcaption>'
                    f"true: {true}, p={fmt(im['true_prob'], '.2f')}<br>predicted: {pred}, p={fmt(im['prob'], '.2f')}"
                    "</figcaption></figure>" for im in g["images"]]
            out.append("</div>")
        return "\n".join(out)

    def storage(self, sec: dict[str, Any], k: str) -> str:
        """Per-specialist delta bytes, then every model's top-1 at its stored bytes, then a tune run's front."""
        from supersub.plots import label

        st = sec.get("storage")
        if not st:
            return ""
        rows = [f"<td>{_e(p['name'])}</td>" + _td(f"{k}.storage.per_specialist.{j}.bytes", p["bytes"], ",d")
                + _td(f"{k}.storage.per_specialist.{j}.ratio", p["ratio"], ".4f")
                for j, p in enumerate(st["per_specialist"])]
        rows.append("<td><b>all specialists</b></td>" + _td(f"{k}.storage.specialists_total", st["specialists_total"],
                                                            ",d") + _td(f"{k}.storage.mean_ratio", st["mean_ratio"], ".4f"))
        n = st["specialists"]
        out = ["<h3>Stored bytes</h3>",
               f"<p>One network: {_num(f'{k}.storage.network', st['network'], ',d', 'b')} bytes. {n} specialists + "
               f"the resident network would be {n}+1 networks; stored as deltas they take "
               f"{fmt(st['mean_ratio'], '.3f')}·{n}+1 = {_num(f'{k}.storage.total_networks', st['total_networks'], '.3f', 'b')}"
               " networks (the paper: N+1 in 0.2N+1).</p>",
               _table(["specialist", "delta bytes", "fraction of a network (mean in the last row)"], rows),
               self.img(sec, "bytes", "bytes per specialist")]
        rows = [f"<td>{_e(label(p['model']))}</td>" + _td(f"{k}.storage.points.{j}.networks", p["networks"], ".3f")
                + _td(f"{k}.storage.points.{j}.top1", p["top1"], ".2f") for j, p in enumerate(st["points"])]
        out += ["<h4>Accuracy at equal total bytes</h4><p>Each model's stored bytes (its networks and deltas) in "
                "units of the vanilla network.</p>"]
        if "vanilla_scaled" not in sec["models"]:
            out.append("<p>No scaled-up vanilla network in this run (<code>baselines.scaled=true</code> trains one).</p>")
        out += [_table(["model", "stored bytes (networks)", "top-1 %"], rows),
                self.img(sec, "accuracy_vs_bytes", "accuracy vs bytes")]
        tune = sec.get("pareto")
        if tune:
            index = {t["trial_id"]: j for j, t in enumerate(tune["trials"])}
            rows = [f"<td>{_e(t)}</td><td>{_e(_params(tune['trials'][index[t]]['params']))}</td>"
                    + _td(f"{k}.pareto.trials.{index[t]}.delta_ratio", tune["trials"][index[t]]["delta_ratio"], ".4f")
                    + _td(f"{k}.pareto.trials.{index[t]}.val_acc", tune["trials"][index[t]]["val_acc"], ".2f")
                    for t in tune["front"] if t in index]
            out += [f"<h4>Accuracy vs bytes: tune run <code>{_e(tune['file'])}</code></h4><p>Each trial's mean "
                    "specialist val accuracy over the superclasses it tuned; “this run” is the mean over all of this "
                    "run's specialists (comparable when the tune run covered every superclass).</p>",
                    _table(["Pareto trial", "settings", "delta / network", "mean specialist val %"], rows),
                    self.img(sec, "pareto", "Pareto front")]
        return "\n".join(out)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _routing_sentence(sec: dict[str, Any]) -> str:
    """The routings calibrated on val (compact strings, as the bundle spells them) and the one served."""
    from supersub.plots import label

    routings = sec.get("routing") or {}
    text = ", ".join(f"{_e(f)} <code>{_e(r if isinstance(r, str) else _params(r))}</code>"
                     for f, r in routings.items())
    out = f"Routings calibrated on val: {text}." if text else ""
    serves = sec.get("serves") or {}
    if serves.get("model"):
        out += (f" The bundle serves <b>{_e(label(serves['model']))}</b> (routing "
                f"<code>{_e(serves.get('routing'))}</code>).")
    return out + (" (<code>hard</code>: the top superclass's specialist; <code>soft:K@T</code>: the top-K "
                  "superclasses' specialists mixed, unless the top one has probability ≥ T; <code>+α</code>: "
                  "pooled with the resident network's answer, weight α.)" if text else "")


def render_html(report: dict[str, Any], root: str | Path) -> str:
    """The page for ``report`` (report.json's data); its PNGs, under ``root``, are inlined."""
    page, sections = _Page(Path(root)), report["sections"]
    body = [f"<h1>supersub report: {_e(report['title'])}</h1><p>Source: <code>{_e(report['run'])}</code> "
            f"({_e(report['kind'])}). Every number here is in <code>report.json</code>.</p>"]
    if report.get("study"):
        body.append(study_html(report["study"], sections))
    body += [page.section(s, i) for i, s in enumerate(sections)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>supersub report: '
            f"{_e(report['title'])}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

