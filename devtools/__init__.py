"""Developer tooling shared by tests/, scripts/ and benchmarks/.

The extension imports one part at run time: ``tiny_models``, whose checkpoint builder the
Install Demo Files node uses (``svdiff/comfy/demo.py``) to write the demo checkpoint;
it uses relative imports only, so it works both as ``devtools.tiny_models`` and inside
the extension's package.

Modules, one job each:

* ``locate``: finding the ComfyUI installs and their versions (standard library
  only; ``python3 -m devtools.locate --list`` is what ``.ci/run`` calls before any
  virtual environment exists);
* ``harness``: a headless ComfyUI in this process (``setup_comfyui``, ``run_prompt``,
  ``validate``, ``object_info``), built on ``handle`` (``ComfyHandle``), ``results``
  (``PromptResult``, ``ValidationResult``), ``recording`` (the stand-in
  ``PromptServer``), ``comfy_main`` (what ComfyUI's ``main.py``/``server.py`` do, done
  in process) and ``runtime`` (coroutines from synchronous code, log capture);
* ``workflow_format``: UI-format workflow -> API prompt (``ui_to_api``), with the
  frontend's widget mapping in ``workflow_widgets`` (``widget_slots``);
* ``tiny_models``: tiny, deterministic ComfyUI models and checkpoints built through
  ComfyUI's own classes;
* ``extension``: this repository imported as the package ``comfyui_svdiff``;
* ``server`` / ``browser``: a real ComfyUI server process, and headless Chromium on it;
* ``fuzzing``: the fuzz targets of the shift-file reader.

How it is imported: as the top-level package ``devtools``, so the repository root
must be on ``sys.path``. ``tests/conftest.py`` inserts it; each script in scripts/ and
benchmarks/common.py inserts it once, at the top (``sys.path.insert(0, str(ROOT))``),
before ``from devtools... import ...``. When ComfyUI is set up, the harness puts
ComfyUI's own root first again (``devtools.comfy_main.put_root_first``): this
repository's ``nodes/`` package would otherwise shadow ComfyUI's ``nodes.py``.
"""
