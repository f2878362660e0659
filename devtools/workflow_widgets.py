"""The frontend's widget list of a node type, and the value a fresh widget has.

``widgets_values`` in a saved UI workflow is positional over *all* of a node's
widgets, including UI-only ones; :func:`widget_slots` tells which value belongs to
which input. Reconstructed from the ComfyUI frontend (comfyui-frontend-package
1.35.9); used by :mod:`devtools.workflow_format` and ``scripts/build_workflows.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Input types the frontend turns into widgets (``ComfyWidgets`` + ``dynamicWidgets``).
WIDGET_TYPES = frozenset(
    {
        "INT",
        "FLOAT",
        "BOOLEAN",
        "STRING",
        "COMBO",
        "MARKDOWN",
        "IMAGEUPLOAD",
        "COLOR",
        "IMAGECOMPARE",
        "CHART",
        "GALLERIA",
        "TEXTAREA",
        "COMFY_DYNAMICCOMBO_V3",
        "AUDIO_UI",
        "AUDIOUPLOAD",
        "WEBCAM",
    }
)
_MEDIA_UPLOAD_KEYS = ("image_upload", "video_upload", "animated_image_upload")
_AUDIO_UI_NODES = frozenset({"LoadAudio", "SaveAudio", "PreviewAudio", "SaveAudioMP3", "SaveAudioOpus"})


def _spec_type_opts(spec: Any) -> tuple[str, dict]:
    if not isinstance(spec, (list, tuple)) or not spec:
        return str(spec), {}
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(t, (list, tuple)):
        return "COMBO", opts
    return str(t), opts


def widget_slots(node_def: Mapping) -> list[tuple[str, str]]:
    """The frontend's widget list for a node type: ``[(input_name, kind), ...]``.

    ``widgets_values`` in a saved workflow is positional over *all* widgets, including
    ones that are never sent to the backend. Reconstructed from the frontend (1.35.9):

    * inputs are ordered required-by-``input_order``, optional-by-``input_order``, then
      anything else (``getOrderedInputSpecs``); an input gets a widget if its type (or
      ``widgetType``) is a widget type and it is not ``forceInput`` (``addInputWidget``);
    * an INT gets a ``control_after_generate`` combo right after it if its option
      ``control_after_generate`` is true, or unset and the name is ``seed``/``noise_seed``
      (``useIntWidget``); FLOAT only if the option is true (``useFloatWidget``); a COMBO
      with the option gets the control *and* a ``control_filter_list`` widget
      (``addValueControlWidgets``), preceded by a refresh button for ``remote`` combos
      with ``refresh_button``;
    * the first required combo with ``image_upload``/``video_upload``/
      ``animated_image_upload`` gets an extra required ``upload`` input (extension
      "Comfy.UploadImage"), not in ``input_order`` so it comes last; audio nodes get
      ``audioUI`` (+ ``upload`` when ``audio_upload``) the same way.

    Kinds: ``"value"`` (sent to the backend) and ``"control"``, ``"filter"``,
    ``"button"``, ``"upload"``, ``"ui"`` (UI-only, skipped).
    """
    inputs = node_def.get("input") or {}
    required = dict(inputs.get("required") or {})
    optional = dict(inputs.get("optional") or {})
    order = node_def.get("input_order") or {}
    extra: list[tuple[str, Any]] = []
    name = node_def.get("name")
    if name in _AUDIO_UI_NODES:
        extra.append(("audioUI", ["AUDIO_UI", {}]))
    audio_spec = required.get("audio")
    if audio_spec is not None and _spec_type_opts(audio_spec)[1].get("audio_upload") is True:
        extra.append(("upload", ["AUDIOUPLOAD", {}]))
    else:
        for inp_name, spec in required.items():
            t, o = _spec_type_opts(spec)
            if t == "COMBO" and any(o.get(k) is True for k in _MEDIA_UPLOAD_KEYS):
                extra.append(("upload", ["IMAGEUPLOAD", {**o, "imageInputName": inp_name}]))
                break

    ordered: list[tuple[str, Any]] = []
    if order:
        ordered += [(n, required[n]) for n in order.get("required", []) if n in required]
        ordered += [(n, optional[n]) for n in order.get("optional", []) if n in optional]
        seen = {n for n, _ in ordered}
        ordered += [(n, s) for n, s in list(required.items()) + list(optional.items()) if n not in seen]
    else:
        ordered = list(required.items()) + list(optional.items())
    ordered += extra

    slots: list[tuple[str, str]] = []
    for inp_name, spec in ordered:
        t, o = _spec_type_opts(spec)
        wtype = o.get("widgetType") or t
        if wtype not in WIDGET_TYPES or o.get("forceInput"):
            continue
        if wtype in ("IMAGEUPLOAD", "AUDIOUPLOAD"):
            slots.append((inp_name, "upload"))
            continue
        if wtype == "AUDIO_UI":
            slots.append((inp_name, "ui"))
            continue
        slots.append((inp_name, "value"))
        ctrl = o.get("control_after_generate")
        if wtype == "INT":
            if ctrl is None:
                ctrl = inp_name in ("seed", "noise_seed")
            if ctrl:
                slots.append((inp_name, "control"))
        elif wtype == "FLOAT" and ctrl:
            slots.append((inp_name, "control"))
        elif wtype == "COMBO":
            remote = o.get("remote")
            if isinstance(remote, dict) and remote.get("refresh_button"):
                slots.append((inp_name, "button"))
            if ctrl:
                slots.append((inp_name, "control"))
                slots.append((inp_name, "filter"))
    return slots


NO_DEFAULT = object()


def widget_default(node_def: Mapping, name: str) -> Any:
    """The value a freshly created widget has (``default``, else the frontend's fallback:
    0 for INT/FLOAT (useIntWidget/useFloatWidget), False, "", the first combo option)."""
    inputs = node_def.get("input") or {}
    spec = (inputs.get("required") or {}).get(name, (inputs.get("optional") or {}).get(name))
    if spec is None:
        return NO_DEFAULT
    t, o = _spec_type_opts(spec)
    if "default" in o:
        return o["default"]
    if t in ("INT", "FLOAT"):
        return 0
    if t == "BOOLEAN":
        return False
    if t in ("STRING", "TEXTAREA", "MARKDOWN"):
        return ""
    if t == "COMBO":
        options = spec[0] if isinstance(spec[0], (list, tuple)) else o.get("options") or []
        return options[0] if options else NO_DEFAULT
    return NO_DEFAULT
