"""The pages (``/``, ``/ui/…``): server-rendered HTML and SVG, drawn from records.

No front-end build, no script: each page is one HTML document. Every text a client
chose (a teacher's name) is escaped. The routes (``app.api.routes.ui``) load the
records, for the caller's tenant only; everything here is a pure function of them.
"""

from __future__ import annotations

import datetime
import html
import math

from fastapi.responses import HTMLResponse

from planner.ops import Psi, Tracked
from planner.plan import op_from_json

from .compute import structure_from_json
from .store import PlanRecord, PriorRecord, TeacherRecord

__all__ = ["HTML_RESPONSES", "index_page", "page", "plan_page", "teacher_page"]

#: Neurons drawn one by one up to this width; wider positions are drawn as bands.
MAX_CELLS = 48
#: Ops listed on the page at most (the JSON has them all).
MAX_OPS_LISTED = 200
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f")  # fmt: skip

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
table{border-collapse:collapse} td,th{padding:3px 10px;border-bottom:1px solid #ddd;
text-align:left} th{background:#f4f4f4} .num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777} code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
svg text{font:12px system-ui,sans-serif} .legend span{display:inline-block;width:12px;
height:12px;margin:0 4px -2px 12px}
"""

HTML_RESPONSES = {200: {"content": {"text/html": {}}, "description": "an HTML page"}}


def page(title: str, body: str) -> HTMLResponse:
    doc = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    return HTMLResponse(doc)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _widths(s: dict) -> str:
    """A structure in a few words: an MLP's widths, a network's stages."""
    if s.get("kind") == "network":
        return structure_from_json(s).describe()
    return "(" + ", ".join(str(w) for w in s["widths"]) + ")"


def _op_label(op: dict) -> str:
    if "space" in op:
        return f"φ(space {op['space']}, channel {op['channel']})"
    if "block" in op:
        return f"ψ(block {op['block']})"
    if op["op"] == "phi":
        return f"φ({op['layer']}, {op['neuron']})"
    if op.get("pairing") is None:
        return f"ψ({op['layer']})"
    return f"ψ({op['layer']}, π = {_short(op['pairing'])})"


def _short(xs: list, n: int = 12) -> str:
    head = ", ".join(str(x) for x in xs[:n])
    return f"[{head}{', …' if len(xs) > n else ''}]"


# -- the provenance drawing --------------------------------------------------------------------


def _cells(width: int) -> tuple[int, int]:
    """(cells drawn, neurons per cell) for a position of ``width`` neurons."""
    per = max(1, math.ceil(width / MAX_CELLS))
    return math.ceil(width / per), per


def _column(
    x: float,
    y0: float,
    h: float,
    width: int,
    kept: dict[int, int],
    label: str,
    merged: frozenset[int] = frozenset(),
) -> str:
    """A position as a column of cells: coloured by the student position keeping each
    neuron (a band's opacity is the fraction of its neurons kept), hollow when removed,
    ringed in purple when it lived until a ψ merged its position away (``merged``)."""
    n, per = _cells(width)
    step = h / n
    r = max(1.5, min(7.0, step * 0.42))
    out = []
    for c in range(n):
        lo, hi = c * per, min(width, (c + 1) * per)
        keepers = [kept[i] for i in range(lo, hi) if i in kept]
        cy = y0 + (c + 0.5) * step
        title = f"neurons {lo}–{hi - 1}" if per > 1 else f"neuron {lo}"
        if keepers:
            colour = PALETTE[keepers[0] % len(PALETTE)]
            alpha = len(keepers) / (hi - lo)
            title += f": kept by student position {keepers[0]} ({len(keepers)}/{hi - lo})"
            fill = f"fill='{colour}' fill-opacity='{0.25 + 0.75 * alpha:.2f}'"
        elif any(i in merged for i in range(lo, hi)):
            title += ": merged by ψ into the previous position"
            fill = "fill='#fff' stroke='#9467bd' stroke-width='2'"
        else:
            title += ": removed"
            fill = "fill='#fff' stroke='#bbb'"
        if per > 1:
            out.append(
                f"<rect class='band' x='{x - 9}' y='{cy - step / 2 + 0.5:.1f}' width='18' "
                f"height='{max(step - 1, 0.5):.1f}' {fill}><title>{title}</title></rect>"
            )
        else:
            out.append(
                f"<circle class='neuron' cx='{x}' cy='{cy:.1f}' r='{r:.1f}' {fill}>"
                f"<title>{title}</title></circle>"
            )
    out.append(f"<text x='{x}' y='{y0 + h + 16}' text-anchor='middle'>{html.escape(label)}</text>")
    return "".join(out)


def _y(y0: float, h: float, width: int, neuron: int) -> float:
    n, per = _cells(width)
    return y0 + (neuron // per + 0.5) * h / n


def _merges(teacher: TeacherRecord, ops: list[dict]) -> list[tuple[int, int, list]]:
    """Per ψ: (surviving teacher position, merged teacher position, pairs of teacher
    neurons (kept, merged) joined by π), from the core's own replay of the ops
    (:class:`planner.ops.Tracked`: which teacher neuron each current one is)."""
    tr = Tracked.start(structure_from_json(teacher.structure))
    out = []
    for d in ops:
        op = op_from_json(d)
        if isinstance(op, Psi):
            t = op.layer
            prev_ids, ids = tr.neurons[t - 2], tr.neurons[t - 1]
            pi = op.pairing or range(len(prev_ids))
            pairs = [(int(prev_ids[k]), int(ids[pi[k]])) for k in range(len(pi))]
            out.append((tr.positions[t - 2], tr.positions[t - 1], pairs))
        tr.apply(op)
    return out


def _drawing(plan: PlanRecord, teacher: TeacherRecord, merges: list) -> str:
    tw, sw = teacher.structure["widths"], plan.student["widths"]
    prov = {p["teacher_position"]: p for p in plan.info["provenance"]}
    merged = set(range(1, len(tw) + 1)) - set(prov)  # only ψ removes a position
    W, H, top, gap = 1120, 250, 34, 120
    xs_t = [60 + i * (W - 120) / max(len(tw) - 1, 1) for i in range(len(tw))]
    parts = [
        f"<svg id='network' xmlns='http://www.w3.org/2000/svg' width='{W}' "
        f"height='{2 * H + gap + 70}' role='img' aria-label='teacher and student'>",
        f"<text x='8' y='20' font-weight='bold'>teacher {_widths(teacher.structure)}</text>",
        f"<text x='8' y='{top + H + gap - 6}' font-weight='bold'>student {_widths(plan.student)}"
        "</text>",
    ]
    merged_neurons = {t: frozenset(m for _, m in pairs) for _, t, pairs in merges}
    for prev, t, pairs in merges:  # π: which neuron each merged one is joined to
        if _cells(tw[prev - 1])[1] == 1 and _cells(tw[t - 1])[1] == 1:
            for a, b in pairs:
                parts.append(
                    f"<line class='pairing' x1='{xs_t[prev - 1]}' "
                    f"y1='{_y(top, H, tw[prev - 1], a):.1f}' x2='{xs_t[t - 1]}' "
                    f"y2='{_y(top, H, tw[t - 1], b):.1f}' stroke='#9467bd' stroke-width='1.2'>"
                    f"<title>π: teacher neuron {a} of position {prev} ↔ {b} of position {t}"
                    "</title></line>"
                )
    for t, (x, w) in enumerate(zip(xs_t, tw, strict=True), start=1):
        p = prov.get(t)
        kept = {n: p["position"] for n in p["teacher_neurons"]} if p else {}
        label = f"{t}: {w}" + (" (ψ)" if t in merged else "")
        parts.append(f"<g class='teacher-position' data-position='{t}'>")
        parts.append(_column(x, top, H, w, kept, label, merged_neurons.get(t, frozenset())))
        parts.append("</g>")
    y_s = top + H + gap
    for j, w in enumerate(sw, start=1):
        p = next(q for q in plan.info["provenance"] if q["position"] == j)
        x = xs_t[p["teacher_position"] - 1]
        colour = PALETTE[j % len(PALETTE)]
        parts.append(
            f"<line x1='{x}' y1='{top + H + 22}' x2='{x}' y2='{y_s - 4}' stroke='{colour}' "
            f"stroke-dasharray='4 3'/>"
        )
        kept = {i: j for i in range(w)}
        parts.append(f"<g class='student-position' data-position='{j}'>")
        parts.append(_column(x, y_s, H, w, kept, f"{j}: {w} ← {p['teacher_position']}"))
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _cost_chart(steps: list[dict], T: int) -> str:
    per = [0.0] * (T + 1)
    for s in steps:
        per[s["teacher_position"]] += s["cost"]
    top = max(per) or 1.0
    W, H = 640, 180
    bw = (W - 60) / T
    bars = []
    for t in range(1, T + 1):
        h = (H - 30) * per[t] / top
        x = 50 + (t - 1) * bw
        bars.append(
            f"<rect class='cost-bar' data-position='{t}' x='{x + 2:.1f}' y='{H - 20 - h:.1f}' "
            f"width='{bw - 4:.1f}' height='{h:.1f}' fill='#1f77b4'><title>position {t}: "
            f"{per[t]:.6g}</title></rect><text x='{x + bw / 2:.1f}' y='{H - 5}' "
            f"text-anchor='middle'>{t}</text>"
        )
    return (
        f"<svg id='cost-chart' width='{W}' height='{H}' role='img' aria-label='cost by "
        f"position'><text x='4' y='14'>max {top:.4g}</text>{''.join(bars)}</svg>"
    )


def _prior_links(prior: PriorRecord | None, plan: PlanRecord) -> str:
    if prior is None:
        return (
            "<p id='prior'>No prior yet: <code>curl -X POST …/v1/plans/"
            f"{plan.id}/prior</code> computes it.</p>"
        )
    if prior.status != "done":
        return f"<p id='prior'>Prior <code>{prior.id}</code> is {prior.status}.</p>"
    base = f"/v1/priors/{prior.id}"
    arrays = " ".join(f"<a href='{base}/arrays/{n}'>{n}.npy</a>" for n in sorted(prior.arrays))
    return (
        f"<p id='prior'>Prior <code>{prior.id}</code> (cost {prior.cost:.6g}): "
        f"<a href='{base}/archive?format=npz'>npz</a> · "
        f"<a href='{base}/archive?format=safetensors'>safetensors</a> · {arrays}</p>"
    )


def plan_page(
    plan: PlanRecord,
    teacher: TeacherRecord,
    prior: PriorRecord | None,
    steps: list[dict] | None,
) -> HTMLResponse:
    """A plan as a picture: which teacher neurons each student position keeps, which
    layers ψ merged and how π pairs their neurons, the cost each run of steps added and
    the cost by teacher position, with links to the prior."""
    if teacher.structure.get("kind") == "network":
        return _network_plan_page(plan, teacher, prior, steps)
    search = plan.info.get("search") or {}
    rows = []
    total = 0.0
    for s in steps or []:
        total += s["cost"]
        first = plan.ops[s["first"]]
        what = (
            f"φ × {s['count']} at layer {s['layer']}"
            if s["op"] == "phi"
            else f"ψ at layer {first['layer']}"
            + (f", π = {_short(first['pairing'])}" if first.get("pairing") else "")
        )
        rows.append(
            f"<tr class='step'><td class='num'>{s['first']}</td><td>{html.escape(what)}</td>"
            f"<td class='num'>{s['teacher_position']}</td><td class='num'>{s['cost']:.6g}</td>"
            f"<td class='num'>{total:.6g}</td></tr>"
        )
    steps_html = (
        "<table id='steps'><tr><th>first op</th><th>run</th><th>teacher position</th>"
        "<th>cost added</th><th>cumulative</th></tr>" + "".join(rows) + "</table>"
        if steps is not None
        else "<p>The plan has too many runs of steps to cost each one; its total is above.</p>"
    )
    merges = _merges(teacher, plan.ops) if len(plan.ops) <= 200_000 else []
    psi_html = (
        "<ul id='psi'>"
        + "".join(
            f"<li>{html.escape(_op_label(op))}: teacher position {t} is merged into position "
            f"{prev}; "
            + (
                "neuron k of each joins neuron k of the other (the identity)"
                if op.get("pairing") is None
                else "π pairs the neurons of one with those of the other:"
                + _pairs_table(prev, t, pairs)
            )
            + "</li>"
            for op, (prev, t, pairs) in zip(
                [o for o in plan.ops if o["op"] == "psi"], merges, strict=False
            )
        )
        + "</ul>"
        if merges
        else "<p>No layer is removed.</p>"
    )
    body = f"""
{_plan_head(plan, teacher, prior, search)}
<h2>Teacher and student</h2>
<p class='muted'>Each student position comes from the teacher position above it; a coloured
neuron is kept (by the student position of its colour), a hollow one removed. (ψ) marks a
position a layer removal merged away: its neurons that lived until then are ringed in purple,
and purple lines show π, the neuron of the previous position each one was joined to.
Positions wider than {MAX_CELLS} are drawn as bands, shaded by the fraction kept.</p>
{_drawing(plan, teacher, merges)}
<h2>Layers removed (ψ)</h2>{psi_html}
<h2>Cost by step</h2>{steps_html}
<h2>Cost by teacher position</h2>
{_cost_chart(steps, len(teacher.structure["widths"])) if steps else ""}
{_operations(plan)}
"""
    return page(f"plan {plan.id}", body)


def _plan_head(plan: PlanRecord, teacher: TeacherRecord, prior, search: dict) -> str:
    """A plan page's head: teacher → student, the cost and what it means, the prior."""
    return f"""<h1>Plan <code>{plan.id}</code></h1>
<p>Teacher <a href='/ui/teachers/{teacher.id}'>{html.escape(teacher.name)}</a>
{html.escape(_widths(teacher.structure))}, <code>{teacher.format}</code> → student
{html.escape(_widths(plan.student))};
criterion <code>{html.escape(str(plan.criterion))}</code>; created {_when(plan.created)}.</p>
<p><b>cost <span id='cost'>{plan.cost:.6g}</span></b> · {len(plan.ops)} operations ·
|B| = {plan.info["conditioned"]} conditioned parameters
{_cut(search)}
· <a href='/v1/plans/{plan.id}'>JSON</a></p>
<p id='cost-words' class='muted'>{_cost_words(plan)}</p>
{_prior_links(prior, plan)}"""


def _operations(plan: PlanRecord) -> str:
    listed = "".join(f"<li>{html.escape(_op_label(op))}</li>" for op in plan.ops[:MAX_OPS_LISTED])
    more = len(plan.ops) - MAX_OPS_LISTED
    return f"""<h2>Operations</h2>
<details><summary>{len(plan.ops)} operations{f" (the first {MAX_OPS_LISTED})" if more > 0 else ""}
</summary><ol start='0'>{listed}</ol></details>"""


def teacher_page(t: TeacherRecord, plans: list[tuple[PlanRecord, PriorRecord | None]]):
    """A teacher: its structure, arrays, and its plans with their priors."""
    arrays = "".join(
        f"<tr><td>{n}</td><td>{tuple(a['shape'])}</td><td class='num'>{a['bytes']:,}</td>"
        f"<td class='num'>{a['asymmetry']:.2g}</td></tr>"
        if a.get("asymmetry") is not None
        else f"<tr><td>{n}</td><td>{tuple(a['shape'])}</td><td class='num'>{a['bytes']:,}</td>"
        "<td></td></tr>"
        for n, a in sorted(t.arrays.items())
        if not a.get("derived")
    )
    rows = []
    for p, prior in plans:
        status = "" if prior is None else f"{prior.status} ({_prior_link(prior)})"
        rows.append(
            f"<tr class='plan'><td><a href='/ui/plans/{p.id}'>{p.id}</a></td>"
            f"<td>{_widths(p.student)}</td><td>{html.escape(str(p.criterion))}</td>"
            f"<td class='num'>{p.cost:.6g}</td><td>{status}</td><td>{_when(p.created)}</td></tr>"
        )
    body = f"""
<h1>Teacher {html.escape(t.name)}</h1>
<p><code>{t.id}</code> · {_widths(t.structure)} · {t.structure.get("kind", "mlp")} ·
<code>{t.format}</code> posterior · uploaded {_when(t.created)} ·
<a href='/v1/teachers/{t.id}'>JSON</a></p>
<h2>Arrays</h2><table><tr><th>name</th><th>shape</th><th>bytes</th>
<th>asymmetry as uploaded</th></tr>{arrays}</table>
<h2>Plans</h2>
<table id='plans'><tr><th>plan</th><th>student</th><th>criterion</th><th>cost</th>
<th>prior</th><th>created</th></tr>{"".join(rows)}</table>
"""
    return page(f"teacher {t.name}", body)


def _cut(search: dict) -> str:
    if not search.get("cut"):
        return ""
    return f"· search cut by its {html.escape(str(search.get('cut_by') or 'deadline'))}"


def _cost_words(plan: PlanRecord) -> str:
    """What the cost is, in words."""
    return (
        f"The cost, {plan.cost:.6g} nats, is how much the teacher's posterior must be bent "
        f"to hold this plan: ½ (v − m)ᵀ Σ⁻¹ (v − m) over the {plan.info['conditioned']} "
        "parameters the plan conditions (the removed neurons' outgoing weights set to 0, "
        "merged layers set to their pairing), that is minus the log-density of those "
        "values relative to the teacher's mean. Zero means the teacher already computes "
        "the student; each nat is a factor e less probable under the teacher's posterior. "
        "Plans to the same student are comparable by it; the search returns the least it found."
    )


#: π pairs listed per ψ at most (the JSON has them all).
MAX_PAIRS_LISTED = 64


def _pairs_table(prev: int, t: int, pairs: list[tuple[int, int]]) -> str:
    rows = "".join(
        f"<tr><td class='num'>{a}</td><td class='num'>{b}</td></tr>"
        for a, b in pairs[:MAX_PAIRS_LISTED]
    )
    more = len(pairs) - MAX_PAIRS_LISTED
    tail = f"<tr><td colspan='2' class='muted'>… {more} more</td></tr>" if more > 0 else ""
    return (
        f"<table class='pairing-table'><tr><th>position {prev} neuron</th>"
        f"<th>position {t} neuron</th></tr>{rows}{tail}</table>"
    )


def _prior_link(prior: PriorRecord) -> str:
    return f"<a href='/v1/priors/{prior.id}'><code>{prior.id}</code></a>"


def index_page(
    teachers: list[TeacherRecord], plans: dict[str, list[tuple[PlanRecord, PriorRecord | None]]]
) -> HTMLResponse:
    """Every teacher of the caller with its plans and their priors."""
    rows = []
    for t in teachers:
        rows.append(
            f"<tr class='teacher'><td><a href='/ui/teachers/{t.id}'>{html.escape(t.name)}</a>"
            f"</td><td>{_widths(t.structure)}</td><td><code>{t.format}</code></td>"
            f"<td class='num'>{len(plans.get(t.id, []))}</td><td>{_when(t.created)}</td></tr>"
        )
        for p, prior in plans.get(t.id, []):
            status = "" if prior is None else f"{prior.status} {_prior_link(prior)}"
            rows.append(
                f"<tr class='plan'><td>↳ <a href='/ui/plans/{p.id}'>{p.id}</a></td>"
                f"<td>{_widths(p.student)}</td><td class='num'>{p.cost:.6g}</td>"
                f"<td>{status}</td><td>{_when(p.created)}</td></tr>"
            )
    table = (
        "<table id='teachers'><tr><th>teacher / plan</th><th>structure</th><th>format / cost"
        "</th><th>plans / prior</th><th>created</th></tr>" + "".join(rows) + "</table>"
        if teachers
        else "<p>No teacher yet: upload one with <code>POST /v1/teachers</code> (see the "
        "<a href='/docs'>API documentation</a>).</p>"
    )
    body = f"""
<h1>alignment-planner</h1>
<p>Structure alignment of teacher posteriors for Bayesian distillation.
<a href='/docs'>API documentation</a> · <a href='/redoc'>reference</a> ·
<a href='/openapi.json'>OpenAPI</a></p>
<h2>Teachers, plans and priors</h2>{table}
"""
    return page("alignment-planner", body)


# -- networks (docs/theory.md §13) ------------------------------------------------------------
def _stage_boxes(net, surviving: dict) -> str:
    """The teacher's stages in a row, a removed block or layer struck through."""
    units = iter(net.graph.units)
    blocks = iter(net.graph.blocks)
    kept_layers, kept_blocks = set(surviving["layers"]), set(surviving["blocks"])
    boxes = []
    for k, st in enumerate(net.stages):
        d = st.to_json()
        kind = d["type"]
        gone = False
        if kind in ("conv", "linear"):
            u = next(units)
            label, gone = f"{kind} {d['out']} (layer {u.layer})", u.layer not in kept_layers
        elif kind == "residual":
            b = next(blocks)
            for _ in range(len(d["branch"]) + (d["shortcut"] is not None)):
                next(units)
            inner = "·".join(str(x["out"]) for x in d["branch"])
            proj = " + projection" if d["shortcut"] else ""
            label, gone = f"block {b.number}: {inner}{proj}", b.number not in kept_blocks
        elif kind == "pool":
            label = "global avg pool" if d.get("global") else f"{d['mode']} pool"
        else:
            label = "flatten"
        cls = "stage removed" if gone else "stage"
        style = "text-decoration:line-through;color:#999" if gone else ""
        boxes.append(
            f"<li class='{cls}' data-stage='{k}' style='{style}'>{html.escape(label)}"
            + (" (ψ)" if gone else "")
            + "</li>"
        )
    return "<ol id='stages' class='stages'>" + "".join(boxes) + "</ol>"


def _network_drawing(plan: PlanRecord, net) -> str:
    """Every teacher space as a column of channels (bands when wide): coloured by the
    student space keeping each channel, hollow when removed; a space removed with its
    block, or merged by ψ on the layer writing it, is labelled so."""
    widths = net.graph.widths
    prov = {p["teacher_space"]: p for p in plan.info["provenance"]}
    gone = {s: f"block {b.number}" for b in net.graph.blocks for s in b.inner}
    kept_layers = set((plan.info.get("surviving") or {}).get("layers", []))
    for u in net.graph.units:
        if u.layer not in kept_layers and u.out not in gone:
            gone[u.out] = f"layer {u.layer}"
    W, H, top = 1120, 250, 30
    xs = [60 + i * (W - 120) / max(len(widths) - 1, 1) for i in range(len(widths))]
    parts = [
        f"<svg id='network' xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H + 80}' "
        "role='img' aria-label='teacher spaces and the channels the student keeps'>"
    ]
    for s, (x, w) in enumerate(zip(xs, widths, strict=True), start=1):
        p = prov.get(s)
        kept = {c: p["space"] for c in p["teacher_channels"]} if p else {}
        label = f"{s}: {len(kept)}/{w}" if p else f"{s}: {gone.get(s, '?')} (ψ)"
        parts.append(f"<g class='teacher-space' data-space='{s}'>")
        parts.append(_column(x, top, H, w, kept, label))
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _space_chart(steps: list[dict], n_spaces: int) -> str:
    """The cost each teacher space's φ added, and each removed block's ψ."""
    per: dict[str, float] = {}
    for s in steps:
        key = f"space {s['space']}" if s.get("space") else f"block {s.get('block')}"
        if s.get("layer") and not s.get("space"):
            key = f"layer {s['layer']}"
        per[key] = per.get(key, 0.0) + s["cost"]
    if not per:
        return ""
    top = max(per.values()) or 1.0
    W, H = 640, 180
    bw = (W - 60) / len(per)
    bars = []
    for k, (name, c) in enumerate(per.items()):
        h = (H - 30) * c / top
        x = 50 + k * bw
        bars.append(
            f"<rect class='cost-bar' data-what='{name}' x='{x + 2:.1f}' y='{H - 20 - h:.1f}' "
            f"width='{bw - 4:.1f}' height='{h:.1f}' fill='#1f77b4'><title>{name}: {c:.6g}"
            f"</title></rect><text x='{x + bw / 2:.1f}' y='{H - 5}' text-anchor='middle'>"
            f"{name}</text>"
        )
    return (
        f"<svg id='cost-chart' width='{W}' height='{H}' role='img' aria-label='cost by "
        f"space and block'><text x='4' y='14'>max {top:.4g}</text>{''.join(bars)}</svg>"
    )


def _network_plan_page(plan, teacher, prior, steps) -> HTMLResponse:
    net = structure_from_json(teacher.structure)
    search = plan.info.get("search") or {}
    surviving = plan.info.get("surviving") or {"layers": [], "blocks": []}
    rows, total = [], 0.0
    for s in steps or []:
        total += s["cost"]
        first = plan.ops[s["first"]]
        what = f"φ × {s['count']} on space {s['space']}" if s.get("space") else _op_label(first)
        rows.append(
            f"<tr class='step'><td class='num'>{s['first']}</td><td>{html.escape(what)}</td>"
            f"<td class='num'>{s['cost']:.6g}</td><td class='num'>{total:.6g}</td></tr>"
        )
    steps_html = (
        "<table id='steps'><tr><th>first op</th><th>run</th><th>cost added</th>"
        "<th>cumulative</th></tr>" + "".join(rows) + "</table>"
        if steps is not None
        else "<p>The plan has too many runs of steps to cost each one; its total is above.</p>"
    )
    body = f"""
{_plan_head(plan, teacher, prior, search)}
<h2>Stages</h2>
<p class='muted'>The teacher's stages; a residual block or layer the plan removes (ψ) is struck
through.</p>
{_stage_boxes(net, surviving)}
<h2>Spaces and channels</h2>
<p class='muted'>Each teacher space (the channels between layers: a residual stream is one space)
as a column; a coloured channel is kept by the student space of its colour, a hollow one
removed. Spaces wider than {MAX_CELLS} are drawn as bands, shaded by the fraction kept.</p>
{_network_drawing(plan, net)}
<h2>Cost by step</h2>{steps_html}
<h2>Cost by space and block</h2>
{_space_chart(steps, len(net.graph.widths)) if steps else ""}
{_operations(plan)}
"""
    return page(f"plan {plan.id}", body)
