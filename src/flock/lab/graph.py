"""A picture of a running lab: router, nodes, pods, BGP sessions and anycast paths.

`to_dot` turns a `LabStatus` into Graphviz DOT (pure, tested without a lab);
`render` runs Graphviz's `dot` to write SVG, and PNG where a PNG converter is
present (`dot -Tpng` when Graphviz was built with cairo, else `rsvg-convert`).

Sessions are drawn router to node, coloured by state; each anycast address
the router learned is a diamond with one (orange) edge to every Ready replica
whose node is a current ECMP next hop, so a withdrawn replica visibly loses
its edge.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from flock.lab.view import LabStatus


def _q(s: str) -> str:
    """A DOT string; `\\n` in labels is Graphviz's line break, so backslashes pass through."""
    return '"' + s.replace('"', '\\"') + '"'


def _id(*parts: str) -> str:
    return _q("/".join(parts))


def to_dot(st: LabStatus) -> str:
    lines = [
        f"digraph {_q('flock lab ' + st.name)} {{",
        "  rankdir=TB; newrank=true;",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
        f"  label={_q(f'flock lab {st.name}')}; labelloc=t;",
    ]
    r_label = f"{st.router_name}\\nFRR AS{st.router_asn}\\n" + "\\n".join(st.router_addresses)
    r_color = "black" if st.router_alive else "red"
    lines.append(
        f'  {_id("router")} [shape=box, style="rounded,filled", fillcolor=lightblue, '
        f"color={r_color}, label={_q(r_label)}];"
    )
    # Anycast addresses sit above the router: traffic enters there and fans out.
    for r in st.anycast_routes():
        alabel = f"anycast {r.prefix}\\n{len(r.nexthops)} path(s)"
        lines.append(
            f"  {_id('anycast', r.prefix)} [shape=diamond, style=filled, fillcolor=gold, "
            f"label={_q(alabel)}];"
        )
        lines.append(
            f"  {_id('anycast', r.prefix)} -> {_id('router')} [style=dotted, arrowhead=none];"
        )
    states: dict[str, list[str]] = {}
    for s in st.sessions:
        states.setdefault(s.node, []).append(f"{s.family} {s.state}")
    for n in st.nodes:
        ok = all(n.processes.values()) if n.processes else False
        label = f"{n.name}\\nAS{n.asn}\\n" + "\\n".join(n.uplink + n.cidrs)
        lines.append(f"  subgraph {_q('cluster_' + n.name)} {{")
        lines.append(f"    label={_q('node ' + n.name)}; style=rounded; color=gray;")
        lines.append(
            f"    {_id('node', n.name)} [shape=box, style=filled, "
            f"fillcolor={'palegreen' if ok else 'lightpink'}, label={_q(label)}];"
        )
        for p in (p for p in st.pods if p.node == n.name):
            plabel = p.key + "\\n" + "\\n".join(p.addresses + [f"anycast {a}" for a in p.anycast])
            if not p.ready:
                plabel += "\\n(not Ready)"
            fill = "white" if p.ready else "lightgray"
            style = "filled" if p.ready else "filled,dashed"
            lines.append(
                f"    {_id('pod', p.key)} [shape=ellipse, style={_q(style)}, fillcolor={fill}, "
                f"label={_q(plabel)}];"
            )
            lines.append(f"    {_id('node', n.name)} -> {_id('pod', p.key)} [arrowhead=none];")
        lines.append("  }")
        sess = states.get(n.name, [])
        up = bool(sess) and all(x.endswith("Established") for x in sess)
        color = "darkgreen" if up else "red"
        lines.append(
            f"  {_id('router')} -> {_id('node', n.name)} [dir=both, color={color}, "
            f"label={_q('BGP ' + ', '.join(sess) if sess else 'no session')}];"
        )
    # Anycast paths: from the anycast address to every replica the router forwards to.
    for r in st.anycast_routes():
        via_nodes = {node for _, node in r.nexthops if node}
        ip = r.prefix.split("/")[0]
        for p in st.pods:
            if ip in p.anycast and p.node in via_nodes and p.ready:
                lines.append(
                    f"  {_id('anycast', r.prefix)} -> {_id('pod', p.key)} [color=orange, "
                    "penwidth=1.5, style=dashed, constraint=false];"
                )
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(st: LabStatus, out: Path) -> list[Path]:
    """Write `out` (SVG; or the format its suffix names) and a PNG beside it when possible.

    Returns the files written. Raises `RuntimeError` when Graphviz is missing.
    """
    dot = shutil.which("dot")
    if dot is None:
        raise RuntimeError("Graphviz `dot` is not installed (Debian package graphviz)")
    src = to_dot(st)
    out = out if out.suffix else out.with_suffix(".svg")
    written: list[Path] = []
    dot_file = out.with_suffix(".dot")
    dot_file.write_text(src)
    written.append(dot_file)
    fmt = out.suffix.lstrip(".") or "svg"
    subprocess.run([dot, f"-T{fmt}", "-o", str(out)], input=src, text=True, check=True)
    written.append(out)
    if fmt == "svg":
        png = out.with_suffix(".png")
        if _to_png(dot, src, out, png):
            written.append(png)
    return written


def _to_png(dot: str, src: str, svg: Path, png: Path) -> bool:
    r = subprocess.run(
        [dot, "-Tpng", "-o", str(png)], input=src, text=True, capture_output=True, check=False
    )
    if r.returncode == 0 and png.exists() and png.stat().st_size > 0:
        return True
    conv = shutil.which("rsvg-convert")
    if conv:
        c = subprocess.run([conv, "-o", str(png), str(svg)], capture_output=True, check=False)
        return c.returncode == 0
    return False
