"""The page's number tables: a run's models (accuracy beside cost) and a study's rows.

Every number is printed by :func:`fmt` inside an element carrying ``data-key`` (its path in
report.json) and ``data-fmt`` (the format spec), so a test can check each printed number against
report.json; a missing number is a dash with no key.
"""

from __future__ import annotations

import html
import math
from typing import Any

from supersub.report.inputs import ordered

# A models table's numeric columns: (metrics key, format, header).
MODEL_COLS = (("top5", ".2f", "top-5 %"), ("superclass_acc", ".2f", "superclass %"))
COST_COLS = (("bytes_in_networks", ".3f", "stored bytes (networks)"), ("train_images", ",.0f", "train images"),
             ("flops_ratio", ".2f", "FLOPs / image (networks)"), ("latency_ratio", ".2f", "latency ratio"),
             ("specialist_passes_per_image", ".2f", "specialist passes / image"))


def fmt(value: Any, spec: str) -> str:
    """How the page prints a number: ``format(value, spec)``, a dash when there is none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(key: str, value: Any, spec: str, tag: str = "span", cls: str = "") -> str:
    """``<tag data-key data-fmt>number</tag>``; a bare dash when there is no number."""
    attr = f' class="{cls}"' if cls else ""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"<{tag}{attr}>–</{tag}>"
    return f'<{tag}{attr} data-key="{_e(key)}" data-fmt="{_e(spec)}">{fmt(value, spec)}</{tag}>'


def _td(key: str, value: Any, spec: str) -> str:
    return _num(key, value, spec, "td", "n")


def _table(head: list[str], rows: list[str], classes: list[str] | None = None) -> str:
    classes = classes or [""] * len(rows)
    return "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + "".join(
        f'<tr{f" class={c!r}" if c else ""}>{r}</tr>' for r, c in zip(rows, classes)) + "</table>"


def _code(text: Any) -> str:
    return f"<td><code>{_e(text)}</code></td>" if text else "<td>–</td>"


def ci_td(key: str, d: dict[str, Any] | None) -> str:
    """A difference with its 95 % interval, ``+1.23 [-0.50, +2.90]``, each number keyed."""
    if not d or d.get("delta") is None:
        return '<td class="n">–</td>'
    return (f'<td class="n">{_num(f"{key}.delta", d["delta"], "+.2f")} [{_num(f"{key}.low", d.get("low"), "+.2f")}, '
            f'{_num(f"{key}.high", d.get("high"), "+.2f")}]</td>')


def _share_td(key: str, m: dict[str, Any]) -> str:
    """The crossing share beside its chance level: ``4.5 (75.0)``."""
    return (f'<td class="n">{_num(f"{key}.crossing_error_share", m.get("crossing_error_share"), ".1f")} '
            f'({_num(f"{key}.crossing_error_chance", m.get("crossing_error_chance"), ".1f")})</td>')


def models_html(sec: dict[str, Any], k: str) -> str:
    """Per model: top-1, Δ vs vanilla [95 % CI], top-5, superclass accuracy, crossing share
    (chance), routing and the costs; the served model's row set off."""
    from supersub.plots import label

    models, served = sec["models"], (sec.get("serves") or {}).get("model")
    rows, classes = [], []
    for m in ordered(models):
        v, key = models[m], f"{k}.models.{m}"
        if "top1" not in v:  # stage one, an own generalist: superclass accuracy only
            rows.append(f"<td>{_e(label(m))}</td>" + '<td class="n">–</td>' * 3
                        + _td(f"{key}.superclass_acc", v.get("superclass_acc"), ".2f")
                        + '<td class="n">–</td><td>–</td>' + '<td class="n">–</td>' * len(COST_COLS))
            classes.append("")
            continue
        name = _e(label(m)) + (" <b>(served)</b>" if m == served else "")
        rows.append(f"<td>{name}</td>" + _td(f"{key}.top1", v["top1"], ".2f")
                    + ci_td(f"{key}.delta_vs_vanilla", v.get("delta_vs_vanilla"))
                    + "".join(_td(f"{key}.{c}", v.get(c), f) for c, f, _ in MODEL_COLS) + _share_td(key, v)
                    + _code(v.get("routing"))
                    + "".join(_td(f"{key}.{c}", v.get(c), f) for c, f, _ in COST_COLS))
        classes.append("served" if m == served else "")
    head = ["model", "top-1 %", "Δ vs vanilla [95 % CI]", *(h for _, _, h in MODEL_COLS), "errors crossing % (chance)",
            "routing", *(h for _, _, h in COST_COLS)]
    return (_table(head, rows, classes) + "<p>Δ: top-1 difference to the vanilla network in points, with a paired "
            "bootstrap 95 % interval over the test images. Bytes and FLOPs in units of the vanilla network; "
            "latency: one test batch against the vanilla network's forward.</p>")


def study_html(study: dict[str, Any], sections: list[dict[str, Any]]) -> str:
    """The study table (``study.json``'s rows): every variant × model over all seeds."""
    from supersub.plots import label

    slugs = {s["name"]: s["slug"] or "run" for s in sections}
    rows, stage1 = [], []
    for j, r in enumerate(study["rows"]):
        key, v = f"study.rows.{j}", r["variant"]
        link = f'<a href="#{_e(slugs[v])}">{_e(v)}</a>' if v in slugs else _e(v)
        if r.get("model") == "stage1":
            stage1.append(f'{link} {_num(f"{key}.superclass_acc", r.get("superclass_acc"), ".2f")} %')
            continue
        rows.append(f"<td>{link}</td><td>{_e(label(r['model']))}</td><td>{_e(', '.join(map(str, r.get('seeds', []))))}"
                    f'</td><td class="n">{_num(f"{key}.top1", r.get("top1"), ".2f")} ± '
                    f'{_num(f"{key}.top1_sd", r.get("top1_sd"), ".2f")}</td>'
                    + ci_td(f"{key}.delta_vs_vanilla", r.get("delta_vs_vanilla"))
                    + "".join(_td(f"{key}.{c}", r.get(c), f) for c, f, _ in COST_COLS[:4])
                    + _code(r.get("routing")) + _share_td(key, r))
    head = ["variant", "model", "seeds", "top-1 % (mean ± sd)", "Δ vs vanilla [95 % CI]",
            *(h for _, _, h in COST_COLS[:4]), "routing", "errors crossing % (chance)"]
    out = [f"<h2>Study</h2><p>From <code>{_e(study['file'])}</code>: each variant over the seeds that finished; "
           "Δ pools the seeds per test image before the paired bootstrap. Each section below shows one seed's "
           "run.</p>", _table(head, rows)]
    if stage1:
        out.append("<p>Stage-one superclass accuracy: " + "; ".join(stage1) + ".</p>")
    return "\n".join(out)
