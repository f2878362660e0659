"""UI-format workflow (what the frontend saves) -> API-format prompt (what POST /prompt takes).

:func:`ui_to_api` follows the frontend's ``graphToPrompt`` + ``ExecutableNodeDTO``
(comfyui-frontend-package 1.35.9); the widget mapping it relies on is
:mod:`devtools.workflow_widgets`. Pure data in, data out: needs no ComfyUI, only the
``/object_info`` JSON (:meth:`devtools.handle.ComfyHandle.object_info` or a server's).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from devtools.workflow_widgets import NO_DEFAULT, widget_default, widget_slots

__all__ = ["MODE_BYPASS", "MODE_NEVER", "VIRTUAL_NODE_TYPES", "WorkflowConversionError", "ui_to_api", "widget_slots"]

log = logging.getLogger(__name__)

MODE_NEVER = 2  # "muted": LGraphEventMode.NEVER
MODE_BYPASS = 4  # LGraphEventMode.BYPASS
#: Frontend-only nodes that never reach the backend (``isVirtualNode``).
VIRTUAL_NODE_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})


class WorkflowConversionError(ValueError):
    """The UI workflow cannot be converted (unknown node type, broken link, ...)."""


def _valid_connection(a: Any, b: Any) -> bool:
    """LiteGraph's ``isValidConnection``: ``*``/empty match anything; comma lists intersect."""
    a = 0 if a in ("", "*") else a
    b = 0 if b in ("", "*") else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_valid_connection(x, y) for x in a.split(",") for y in b.split(","))


@dataclass
class _Graph:
    nodes: dict[Any, dict]
    links: dict[Any, dict]
    prefix: tuple[str, ...]
    instance: _Rec | None  # the subgraph node this graph is the inside of


@dataclass
class _Rec:
    exec_id: str
    node: dict
    graph: _Graph
    inner: _Graph | None = None  # set for subgraph instances

    @property
    def mode(self) -> int:
        return int(self.node.get("mode") or 0)

    @property
    def inputs(self) -> list[dict]:
        return self.node.get("inputs") or []

    @property
    def outputs(self) -> list[dict]:
        return self.node.get("outputs") or []


def _link_dict(link: Any) -> dict:
    if isinstance(link, dict):
        return link
    lid, oid, oslot, tid, tslot, typ = (list(link) + [None] * 6)[:6]
    return {"id": lid, "origin_id": oid, "origin_slot": oslot, "target_id": tid, "target_slot": tslot, "type": typ}


def ui_to_api(workflow: Mapping, object_info: Mapping[str, Mapping]) -> dict:
    """Convert a UI-format workflow (what the frontend saves) to an API prompt.

    Follows the frontend's ``graphToPrompt`` + ``ExecutableNodeDTO`` (1.35.9):

    * muted (mode 2) and bypassed (mode 4) nodes and virtual nodes (Reroute,
      PrimitiveNode, Note, MarkdownNote, subgraph instances) are not emitted;
    * widget values come from ``widgets_values`` mapped through :func:`widget_slots`
      (the ``control_after_generate`` value after ``seed``/``noise_seed`` etc. is
      skipped); list values are wrapped as ``{"__value__": [...]}``;
    * linked inputs (also widgets converted to inputs) become ``[origin_id, slot]``;
      links are followed through Reroutes, through bypassed nodes (same slot if the
      types fit, else the first input of the wanted type) and into/out of subgraphs,
      whose inner nodes get ids ``"<subgraph node id>:<inner id>"``;
    * a PrimitiveNode's value is written into the widgets it feeds (``applyToGraph``);
    * finally inputs linked to nodes that are not in the prompt (muted) are dropped.

    ``object_info`` is the /object_info JSON (:meth:`devtools.handle.ComfyHandle.object_info`). Raises
    :class:`WorkflowConversionError` for node types it does not know. Not handled:
    legacy "group nodes" and V3 dynamic inputs (DynamicCombo/Autogrow) beyond their
    first widget.
    """
    if not isinstance(workflow, Mapping) or not isinstance(workflow.get("nodes"), list):
        if isinstance(workflow, Mapping) and workflow and all(isinstance(v, Mapping) and "class_type" in v for v in workflow.values()):
            raise WorkflowConversionError("this is already an API-format prompt")
        raise WorkflowConversionError("not a UI-format workflow (no 'nodes' list)")
    subgraph_defs = {sg["id"]: sg for sg in (workflow.get("definitions") or {}).get("subgraphs") or []}
    recs: dict[str, _Rec] = {}

    def build(nodes_list: list[dict], links_list: list, prefix: tuple[str, ...], instance: _Rec | None, depth=0) -> _Graph:
        if depth > 32:
            raise WorkflowConversionError("subgraphs nested too deeply (cycle?)")
        g = _Graph({n["id"]: n for n in nodes_list}, {}, prefix, instance)
        for link in links_list or []:
            d = _link_dict(link)
            g.links[d["id"]] = d
        for n in nodes_list:
            exec_id = ":".join(prefix + (str(n["id"]),))
            rec = _Rec(exec_id, n, g)
            recs[exec_id] = rec
            sg = subgraph_defs.get(n.get("type"))
            if sg is not None:
                rec.inner = build(sg.get("nodes") or [], sg.get("links") or [], prefix + (str(n["id"]),), rec, depth + 1)
        return g

    build(list(workflow.get("nodes") or []), list(workflow.get("links") or []), (), None)

    def rec_of(g: _Graph, node_id: Any) -> _Rec:
        key = ":".join(g.prefix + (str(node_id),))
        if key not in recs:
            raise WorkflowConversionError(f"link to missing node {node_id} (in graph {':'.join(g.prefix) or 'root'})")
        return recs[key]

    def is_virtual(rec: _Rec) -> bool:
        return rec.inner is not None or rec.node.get("type") in VIRTUAL_NODE_TYPES

    # ---- link resolution (ExecutableNodeDTO.resolveInput / resolveOutput) -----------
    def resolve_input(rec: _Rec, slot: int, seen: set, want: Any = None):
        key = (rec.exec_id, "I", slot)
        if key in seen:
            raise WorkflowConversionError(f"circular link while resolving input {slot} of node {rec.exec_id}")
        seen.add(key)
        if slot >= len(rec.inputs):
            raise WorkflowConversionError(f"node {rec.exec_id} has no input slot {slot}")
        inp = rec.inputs[slot]
        link_id = inp.get("link")
        if link_id is None:
            return None
        link = rec.graph.links.get(link_id)
        if link is None:
            raise WorkflowConversionError(f"node {rec.exec_id} input {inp.get('name')!r}: link {link_id} not found")
        inst = rec.graph.instance
        if inst is not None and link["origin_id"] == -10:  # the subgraph's input node
            return resolve_subgraph_input(inst, link["origin_slot"], seen)
        origin = rec_of(rec.graph, link["origin_id"])
        return resolve_output(origin, link["origin_slot"], want if want is not None else inp.get("type"), seen)

    def resolve_subgraph_input(inst: _Rec, k: int, seen: set):
        """Input ``k`` of the subgraph definition, seen from the instance ``inst``.

        Saved workflows drop unlinked widget inputs from ``inputs`` (the frontend's
        ``compressWidgetInputSlots``), so the instance input is found by name. Unlinked,
        its value is the instance's promoted widget (``getWidgetFromSlot``): one widget
        per definition input that feeds an inner widget, in definition order, values in
        the instance's ``widgets_values``. Without one, the inner widget keeps its value.
        """
        sg = subgraph_defs[inst.node["type"]]
        sg_inputs = sg.get("inputs") or []
        if k >= len(sg_inputs):
            raise WorkflowConversionError(f"subgraph node {inst.exec_id} has no input {k}")
        name = sg_inputs[k].get("name")
        for idx, inp in enumerate(inst.inputs):
            if inp.get("name") == name and inp.get("link") is not None:
                return resolve_input(inst, idx, seen)
        inner = inst.inner

        def feeds_widget(sg_input: dict) -> bool:
            for lid in sg_input.get("linkIds") or []:
                lk = inner.links.get(lid)
                if lk is None or lk.get("target_id") not in inner.nodes:
                    continue
                tins = inner.nodes[lk["target_id"]].get("inputs") or []
                ts = lk.get("target_slot", -1)
                if 0 <= ts < len(tins) and tins[ts].get("widget"):
                    return True
            return False

        wv = inst.node.get("widgets_values")
        if isinstance(wv, dict):
            return ("value", wv[name]) if name in wv else None
        if not isinstance(wv, list):
            return None
        # Newer frontends store the promoted widgets' order in properties.proxyWidgets:
        # [["-1", <subgraph input>], [<inner node id>, <widget>], ...]; the values of the
        # "-1" ones (the instance's own widgets) are its widgets_values, in that order.
        proxies = (inst.node.get("properties") or {}).get("proxyWidgets")
        names_with_widget = [i.get("name") for i in sg_inputs if feeds_widget(i)]
        if isinstance(proxies, list) and proxies:
            if len(wv) == len(proxies):
                order = [p[1] if isinstance(p, list) and str(p[0]) == "-1" else None for p in proxies]
            else:
                order = [p[1] for p in proxies if isinstance(p, list) and str(p[0]) == "-1" and p[1] in names_with_widget]
        else:
            order = names_with_widget
        if name in order:
            idx = order.index(name)
            if idx < len(wv) and wv[idx] is not None:
                return ("value", wv[idx])
        return None

    def bypass_slot(rec: _Rec, o: int, want: Any) -> int:
        ins, outs = rec.inputs, rec.outputs
        if want in ("*", "", None):
            return (o if len(ins) > o else 0) if ins else -1
        a = ins[o] if o < len(ins) else None
        r = outs[o].get("type") if o < len(outs) else None
        if a is not None and _valid_connection(a.get("type"), r) and _valid_connection(a.get("type"), want):
            return o
        for i, x in enumerate(ins):
            if x.get("type") == want:
                return i
        for i, x in enumerate(ins):
            if _valid_connection(x.get("type"), r) and _valid_connection(x.get("type"), want):
                return i
        return -1

    def resolve_output(rec: _Rec, slot: int, want: Any, seen: set):
        key = (rec.exec_id, "O", slot)
        if key in seen:
            raise WorkflowConversionError(f"circular link while resolving output {slot} of node {rec.exec_id}")
        seen.add(key)
        if rec.mode == MODE_BYPASS:
            k = bypass_slot(rec, slot, want)
            if k == -1:
                return None
            return resolve_input(rec, k, seen)
        if rec.inner is not None:  # subgraph instance: follow its output inside
            sg = subgraph_defs[rec.node["type"]]
            outs = sg.get("outputs") or []
            if slot >= len(outs):
                raise WorkflowConversionError(f"subgraph node {rec.exec_id} has no output {slot}")
            for lid in outs[slot].get("linkIds") or []:
                link = rec.inner.links.get(lid)
                if link is not None and link.get("target_id") == -20:
                    return resolve_output(rec_of(rec.inner, link["origin_id"]), link["origin_slot"], want, seen)
            return None
        if is_virtual(rec):  # Reroute: pass through its input; PrimitiveNode/Note: nothing
            if slot < len(rec.inputs) and rec.inputs[slot].get("link") is not None:
                return resolve_input(rec, slot, seen, want)
            return None
        return ("link", rec.exec_id, slot)

    # ---- PrimitiveNode.applyToGraph: push values into the widgets they feed ---------
    overrides: dict[tuple[str, str], Any] = {}

    def push_primitive(rec: _Rec, value: Any, out_links: Iterable, depth=0):
        for lid in out_links or []:
            link = rec.graph.links.get(lid)
            if link is None or depth > 64:
                continue
            target = rec_of(rec.graph, link["target_id"])
            if target.node.get("type") == "Reroute":
                for o in target.outputs:
                    push_primitive(target, value, o.get("links"), depth + 1)
                continue
            ts = link["target_slot"]
            if ts < len(target.inputs):
                w = (target.inputs[ts].get("widget") or {}).get("name")
                if w:
                    overrides[(target.exec_id, w)] = value

    for rec in list(recs.values()):
        if rec.node.get("type") == "PrimitiveNode" and rec.outputs:
            wv = rec.node.get("widgets_values")
            if isinstance(wv, list) and wv:
                push_primitive(rec, wv[0], rec.outputs[0].get("links"))

    # ---- emit ---------------------------------------------------------------------
    unknown = sorted(
        {
            (r.exec_id, r.node.get("type"))
            for r in recs.values()
            if not is_virtual(r) and r.mode not in (MODE_NEVER, MODE_BYPASS) and r.node.get("type") not in object_info
        },
        key=str,
    )
    if unknown:
        raise WorkflowConversionError(
            "node types not in object_info (missing custom nodes?): " + ", ".join(f"#{i} {t}" for i, t in unknown)
        )

    prompt: dict[str, dict] = {}
    for rec in recs.values():
        if is_virtual(rec) or rec.mode in (MODE_NEVER, MODE_BYPASS):
            continue
        ctype = rec.node["type"]
        node_def = object_info[ctype]
        inputs: dict[str, Any] = {}

        def put_value(name: str, value: Any, inputs: dict[str, Any] = inputs) -> None:
            # graphToPrompt: a list widget value is sent as {"__value__": [...]} so it is
            # not mistaken for a link (unwrapped again in execution.py:864-869)
            inputs[name] = {"__value__": value} if isinstance(value, list) else value

        wv = rec.node.get("widgets_values")
        if isinstance(wv, dict):
            for name, value in wv.items():
                put_value(name, value)
        elif isinstance(wv, list):
            slots = widget_slots(node_def)
            if len(wv) != len(slots):
                log.debug("node %s (%s): %d widget values for %d widgets %s", rec.exec_id, ctype, len(wv), len(slots), slots)
            for (name, kind), value in zip(slots, wv, strict=False):
                if kind == "value":
                    put_value(name, value)
            # Workflows saved before a node gained a widget have fewer values; the
            # frontend keeps such widgets at their default and sends that.
            for name, kind in slots[len(wv) :]:
                if kind == "value" and name not in inputs:
                    default = widget_default(node_def, name)
                    if default is not NO_DEFAULT:
                        put_value(name, default)
        for (eid, name), value in overrides.items():
            if eid == rec.exec_id:
                put_value(name, value)
        for slot, inp in enumerate(rec.inputs):
            res = resolve_input(rec, slot, set())
            if res is None:
                continue
            name = (inp.get("widget") or {}).get("name") or inp["name"]
            if res[0] == "value":
                put_value(name, res[1])
            else:
                inputs[name] = [res[1], int(res[2])]
        title = rec.node.get("title") or node_def.get("display_name") or ctype
        prompt[rec.exec_id] = {"inputs": inputs, "class_type": ctype, "_meta": {"title": title}}

    for entry in prompt.values():  # graphToPrompt: drop links to nodes not in the prompt
        for k, v in list(entry["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and v[0] not in prompt:
                del entry["inputs"][k]
    return prompt
