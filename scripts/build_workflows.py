"""Write the example workflows in workflows/ (ComfyUI's UI format) from short specs.

Hand-editing LiteGraph JSON (node ids, link tables, positional widget values) is
error-prone, so each example is declared in workflow_specs.py as nodes with named widget values and
named links; widget order and slot types come from the live /object_info of a
headless ComfyUI with this extension loaded. Run after changing a node's inputs:

    python scripts/build_workflows.py
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for devtools/ (test tooling shared with tests/ and benchmarks/)
sys.path.insert(0, str(ROOT / "scripts"))

from headless import start_comfy  # noqa: E402
from workflow_specs import CHECKPOINT, WORKFLOWS  # noqa: E402

NOTE = "Note"  # the frontend's own note node: text only, never sent to the server
NOTE_WIDTH = 420
NOTE_COLOR = {"color": "#432", "bgcolor": "#653"}  # the frontend's yellow


def note_text(spec: dict, info: dict) -> str:
    """What the workflow does, that it runs as shipped on a CPU, and what to raise on a GPU."""
    by_id = {n["id"]: n for n in spec["nodes"]}
    lines = [spec["about"]]
    if any(n["type"] == "CheckpointLoaderSimple" for n in spec["nodes"]):
        lines += [
            "",
            f"As shipped it runs in a few minutes on a CPU with the world model ({CHECKPOINT}: a small SD1.5-layout model "
            "trained on pictures of coloured shapes, 64x64) and its trained demo files. Put them in place once: template "
            "'SVDiff - Start here', or python scripts/install_demo.py.",
        ]
    if spec["gpu"]:
        lines += ["", "For a real model on a GPU: choose your checkpoint in Load Checkpoint, then set"]
        for nid, widget, value in spec["gpu"]:
            n = by_id[nid]
            lines.append(f"- {node_title(n, info)} > {widget}: {n['widgets'][widget]} -> {value}")
        if any(widget in ("width", "height", "resolution") for _, widget, _ in spec["gpu"]):
            lines.append("(SD1.x/SD2.x: 512 px as above; SDXL: 1024 px.)")
    return "\n".join(lines)


def node_title(n: dict, info: dict) -> str:
    """The title the frontend draws: the spec's, else the node's display name, else its type."""
    return n["title"] or info[n["type"]].get("display_name") or n["type"]


def note_node(nid: int, text: str) -> dict:
    """The note as the spec's first node: column 0, above the rest."""
    return {"id": nid, "type": NOTE, "pos": [20, -1000], "widgets": {}, "links": {}, "title": "About this workflow", "text": text}


def _wrapped_lines(text: str, width_chars: int = 58) -> int:
    return sum(max(1, -(-len(line) // width_chars)) for line in text.split("\n"))


def build(workflow_id: str, spec: dict, info: dict) -> dict:
    from devtools.workflow_widgets import widget_slots

    spec = {**spec, "nodes": [note_node(max(n["id"] for n in spec["nodes"]) + 1, note_text(spec, info)), *spec["nodes"]]}
    nodes, links = [], []
    by_id = {n["id"]: n for n in spec["nodes"]}
    outputs: dict[tuple[int, int], list[int]] = {}
    link_id = 0
    pending = []
    for n in spec["nodes"]:
        if n["type"] == NOTE:
            pending.append((n, None, [], [n["text"]]))
            continue
        definition = info[n["type"]]
        inputs = []
        for slot, (name, (source, source_slot)) in enumerate(n["links"].items()):
            link_id += 1
            kind = info[by_id[source]["type"]]["output"][source_slot]
            links.append([link_id, source, source_slot, n["id"], slot, kind])
            outputs.setdefault((source, source_slot), []).append(link_id)
            inputs.append({"name": name, "type": _input_type(definition, name), "link": link_id})
        values = []
        for name, kind in widget_slots(definition):
            if name in n["links"]:
                continue
            if kind == "value":
                if name not in n["widgets"]:
                    raise SystemExit(f"{n['type']} #{n['id']}: no value for widget '{name}'")
                values.append(n["widgets"][name])
            elif kind == "control":
                values.append(n["widgets"].get("control_after_generate", "fixed"))
            elif kind == "upload":
                values.append("image")  # the upload button's value, as frontend 1.35.9 saves it
            else:
                raise SystemExit(f"{n['type']} #{n['id']}: widget kind '{kind}' of '{name}' is not supported by this builder")
        pending.append((n, definition, inputs, values))
    positions, sizes = layout(spec, info)
    for order, (n, definition, inputs, values) in enumerate(pending):
        if definition is None:  # the note
            entry = {"id": n["id"], "type": NOTE, "pos": positions[n["id"]], "size": sizes[n["id"]], "flags": {}, "order": order}
            entry.update(mode=0, inputs=[], outputs=[], properties={"text": ""}, widgets_values=values, title=n["title"], **NOTE_COLOR)
            nodes.append(entry)
            continue
        outs = [
            {"name": definition["output_name"][i], "type": t, "links": outputs.get((n["id"], i), []), "slot_index": i}
            for i, t in enumerate(definition["output"])
        ]
        entry = {
            "id": n["id"],
            "type": n["type"],
            "pos": positions[n["id"]],
            "size": sizes[n["id"]],
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": inputs,
            "outputs": outs,
            "properties": {"Node name for S&R": n["type"]},
            "widgets_values": values,
        }
        if n["title"]:
            entry["title"] = n["title"]
        nodes.append(entry)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-svdiff/workflows/" + spec["title"])),  # the frontend's schema wants a UUID
        "revision": 0,
        "last_node_id": max(n["id"] for n in spec["nodes"]),
        "last_link_id": link_id,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": SCALE, "offset": framed(positions)}, "svdiff_id": workflow_id, "svdiff_title": spec["title"]},
        "version": 0.4,
    }


SCALE = 0.8
FRAME_LEFT, FRAME_TOP = (
    90,
    110,
)  # screen px kept free for the sidebar and the tab bar + graph toolbar (frontend 1.4x draws them over the canvas)
TITLE_HEIGHT = 30  # LiteGraph draws a node's title above its position


def framed(positions: dict[int, list[int]]) -> list[float]:
    """The canvas offset that opens the workflow with its first column right of the sidebar
    and its top row below the menu bar (screen = (pos + offset) · scale)."""
    left = min(x for x, _ in positions.values())
    top = min(y for _, y in positions.values()) - TITLE_HEIGHT
    return [round(FRAME_LEFT / SCALE - left, 1), round(FRAME_TOP / SCALE - top, 1)]


# Extra height of what a node draws below its widgets (frontend 1.35.9): a multiline
# text box, this extension's panels (web/svdiff.js), an image preview.
PANEL_HEIGHT = {"SVDiffTrain": 190, "SVDiffTrainCustomDiffusion": 190, "SVDiffLoader": 170, "SVDiffLoadShift": 170}
PREVIEW_HEIGHT = {"SaveImage": 260, "PreviewImage": 260, "LoadImage": 260, "SVDiffInspect": 220, "SVDiffCutMixUnmix": 200}
MULTILINE_HEIGHT = 110
NODE_WIDTH = {"SVDiffTrainCustomDiffusion": 520, "SVDiffMergeConcepts": 460}  # long combo values
COLUMN_GAP, ROW_GAP = 70, 40


def _multiline(definition: dict, name: str) -> bool:
    for section in ("required", "optional"):
        spec = (definition["input"].get(section) or {}).get(name)
        if spec is not None and len(spec) > 1 and isinstance(spec[1], dict):
            return bool(spec[1].get("multiline"))
    return False


def node_size(n: dict, definition: dict) -> list[int]:
    """A size at least as large as the frontend computes for the node (checked in the browser test)."""
    from devtools.workflow_widgets import widget_slots

    all_widgets = {name for name, _ in widget_slots(definition)}
    widgets = [(name, kind) for name, kind in widget_slots(definition) if name not in n["links"]]
    sockets = [name for section in ("required", "optional") for name in (definition["input"].get(section) or {}) if name not in all_widgets]
    slots = max(len(sockets), len(definition["output"]), 1)
    multiline = sum(1 for name, kind in widgets if kind == "value" and _multiline(definition, name))
    height = 40 + 22 * slots + 26 * len(widgets) + MULTILINE_HEIGHT * multiline
    height += PANEL_HEIGHT.get(n["type"], 0) + PREVIEW_HEIGHT.get(n["type"], 0)
    wide = multiline or n["type"] in PANEL_HEIGHT or n["type"] in PREVIEW_HEIGHT
    return [NODE_WIDTH.get(n["type"], 400 if wide else 340), height]


def note_size(n: dict) -> list[int]:
    return [NOTE_WIDTH, 50 + 14 * _wrapped_lines(n["text"])]  # the frontend's note text: ~60 characters a line at this width


def layout(spec: dict, info: dict) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Columns by distance from the sources, nodes stacked in each column in the order
    their spec positions give (top to bottom), so nothing overlaps whatever the sizes."""
    by_id = {n["id"]: n for n in spec["nodes"]}
    depth: dict[int, int] = {}

    def depth_of(nid: int) -> int:
        if nid not in depth:
            sources = [source for source, _ in by_id[nid]["links"].values()]
            depth[nid] = 1 + max(map(depth_of, sources)) if sources else 0
        return depth[nid]

    sizes = {n["id"]: note_size(n) if n["type"] == NOTE else node_size(n, info[n["type"]]) for n in spec["nodes"]}
    columns: dict[int, list[dict]] = {}
    for n in spec["nodes"]:
        columns.setdefault(depth_of(n["id"]), []).append(n)
    positions, x = {}, 20
    for column in sorted(columns):
        y = 40
        for n in sorted(columns[column], key=lambda n: (n["pos"][1], n["pos"][0])):
            positions[n["id"]] = [x, y]
            y += sizes[n["id"]][1] + ROW_GAP
        x += max(sizes[n["id"]][0] for n in columns[column]) + COLUMN_GAP
    return positions, sizes


def _input_type(definition: dict, name: str) -> str:
    for section in ("required", "optional"):
        spec = (definition["input"].get(section) or {}).get(name)
        if spec is not None:
            return spec[0] if isinstance(spec[0], str) else "COMBO"
    raise SystemExit(f"{definition['name']} has no input '{name}'")


README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- gpu-settings:start (scripts/build_workflows.py) -->", "<!-- gpu-settings:end -->"


def gpu_table(info: dict) -> str:
    """The README's table of the settings each workflow's note says to raise on a GPU."""
    rows = ["| Workflow | Node > input | As shipped (CPU, world model) | Real model on a GPU |", "|---|---|---|---|"]
    for spec in WORKFLOWS.values():
        by_id = {n["id"]: n for n in spec["nodes"]}
        for nid, widget, value in spec["gpu"]:
            n = by_id[nid]
            rows.append(f"| {spec['template']} | {node_title(n, info)} > {widget} | {n['widgets'][widget]} | {value} |")
    return "\n".join(rows)


def update_readme(info: dict) -> None:
    text = README.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    README.write_text(text[:start] + "\n" + gpu_table(info) + "\n" + text[end:])


def main() -> None:
    handle = start_comfy()
    info = handle.object_info()
    out = ROOT / "workflows"
    shipped = {out / f"{spec['template']}.json" for spec in WORKFLOWS.values()}
    for old in sorted(set(out.glob("*.json")) - shipped):
        old.unlink()
        print(f"removed {old.relative_to(ROOT)} (no longer in workflow_specs.py)")
    for workflow_id, spec in WORKFLOWS.items():
        path = out / f"{spec['template']}.json"
        path.write_text(json.dumps(build(workflow_id, spec, info), indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    update_readme(info)
    print("updated the GPU settings table in README.md")


if __name__ == "__main__":
    main()
