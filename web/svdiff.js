// ComfyUI-SVDiff frontend extension.
//
// * SVDiffTrain, SVDiffTrainCustomDiffusion: a live loss curve on the node, drawn from the server's "svdiff.train"
//   websocket messages while it trains, and from the node's output (history) afterwards.
// * SVDiffLoader / SVDiffLoadShift: a panel that says what the chosen shift file is
//   (architecture, trigger words, steps, layers, size, the loss curve it was trained with)
//   and whether it fits the checkpoint feeding the graph, from GET /svdiff/shift_info.
//
// Loaded by ComfyUI from WEB_DIRECTORY (served as /extensions/<folder>/svdiff.js).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODES = new Set(["SVDiffTrain", "SVDiffTrainCustomDiffusion"]);
const LOADER_NODES = { SVDiffLoader: "shift_name", SVDiffLoadShift: "shift_name" };
const CHECKPOINT_WIDGETS = { ckpt_name: "checkpoints", unet_name: "diffusion_models" };
const TRAIN_EVENT = "svdiff.train";
const DEMO_NODE = "SVDiffInstallDemo";
const CHART_HEIGHT = 170;
const INFO_HEIGHT = 150;
const COLORS = {
  text: "#d8d8d8",
  muted: "#8a8a8a",
  raw: "rgba(120, 160, 255, 0.35)",
  smooth: "#6fb6ff",
  grid: "rgba(255, 255, 255, 0.08)",
  good: "#6fcf7f",
  bad: "#ff7b72",
  warn: "#e3b341",
};

// ---------------------------------------------------------------------------------------
// Loss chart (a canvas; no dependencies)

function smooth(values, weight) {
  // Exponential moving average with bias correction (TensorBoard's smoothing).
  const out = [];
  let last = 0;
  let count = 0;
  for (const v of values) {
    if (v === null || !Number.isFinite(v)) {
      out.push(null);
      continue;
    }
    count += 1;
    last = last * weight + (1 - weight) * v;
    out.push(last / (1 - Math.pow(weight, count)));
  }
  return out;
}

function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function formatBytes(bytes) {
  if (bytes < 1e6) return `${Math.round(bytes / 1e3)} KB`;
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

class LossChart {
  constructor(compact = false) {
    this.compact = compact;
    this.element = document.createElement("div");
    this.element.className = "svdiff-loss-chart";
    this.element.dataset.svdiffChart = "";
    Object.assign(this.element.style, { width: "100%", height: "100%", display: "flex", flexDirection: "column" });
    this.caption = document.createElement("div");
    Object.assign(this.caption.style, {
      font: "11px sans-serif",
      color: COLORS.muted,
      padding: "2px 4px",
      whiteSpace: "nowrap",
      overflow: "hidden",
      textOverflow: "ellipsis",
    });
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { width: "100%", flex: "1 1 auto", minHeight: "0" });
    this.element.append(this.caption, this.canvas);
    this.reset(0);
    this.caption.textContent = compact ? "" : "loss curve: appears when training starts";
    new ResizeObserver(() => this.draw()).observe(this.canvas);
  }

  reset(steps) {
    this.phase = "";
    this.losses = [];
    this.firstStep = 1;
    this.steps = steps;
    this.step = 0;
    this.state = "idle";
    this.started = performance.now();
    this.startStep = 0;
    this.publish();
  }

  update(message) {
    if (message.event === "phase") {
      // Work before the first step (prior images, encoding, decompositions): say what and how far.
      if (this.state === "idle" || this.state === "preparing" || this.state === "done") {
        this.reset(message.steps);
        this.state = "preparing";
        this.phase = `${message.text} ${message.done}/${message.total}`;
      }
    } else if (message.event === "start") {
      this.reset(message.steps);
      this.firstStep = message.first_step;
      this.startStep = message.step;
      this.state = "training";
    } else if (message.event === "losses") {
      if (this.state !== "training") {
        this.state = "training";
        this.started = performance.now();
        this.startStep = message.first_step - 1;
      }
      const offset = message.first_step - this.firstStep;
      this.losses.length = Math.max(this.losses.length, offset);
      this.losses.splice(offset, message.losses.length, ...message.losses);
      this.step = message.step;
      this.steps = message.steps;
    } else if (message.event === "done") {
      this.state = "done";
      this.step = message.step;
    }
    this.publish();
    this.draw();
  }

  setAll(losses, state = "done") {
    this.reset(losses.length);
    this.losses = losses.slice();
    this.step = losses.length;
    this.state = state;
    this.publish();
    this.draw();
  }

  publish() {
    // Machine-readable state for tests and for other extensions.
    this.element.dataset.points = String(this.losses.filter((v) => v !== null && v !== undefined).length);
    this.element.dataset.state = this.state;
    this.element.dataset.phase = this.phase;
    this.element.dataset.step = String(this.step);
  }

  captionText() {
    const finite = this.losses.filter((v) => v !== null && v !== undefined && Number.isFinite(v));
    if (!finite.length && this.state === "preparing") return this.phase;
    if (!finite.length) return this.compact ? "" : "loss curve: appears when training starts";
    const last = finite[finite.length - 1];
    const best = Math.min(...finite);
    const parts = [];
    if (!this.compact) parts.push(`step ${this.step}/${this.steps}`);
    parts.push(`loss ${last.toFixed(4)}`, `best ${best.toFixed(4)}`);
    if (this.state === "training" && this.step > this.startStep) {
      const rate = (this.step - this.startStep) / ((performance.now() - this.started) / 1000);
      const left = formatDuration((this.steps - this.step) / rate);
      if (left) parts.push(`~${left} left`);
    }
    if (this.state === "done" && !this.compact) parts.push("done");
    return parts.join(" · ");
  }

  draw() {
    this.caption.textContent = this.captionText();
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.floor(this.canvas.clientWidth * ratio));
    const height = Math.max(1, Math.floor(this.canvas.clientHeight * ratio));
    if (this.canvas.width !== width || this.canvas.height !== height) {
      this.canvas.width = width;
      this.canvas.height = height;
    }
    const ctx = this.canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const values = this.losses.map((v) => (v === null || v === undefined ? null : v));
    const finite = values.filter((v) => v !== null && Number.isFinite(v));
    if (finite.length < 1 || width < 10 || height < 10) return;
    const pad = 6 * ratio;
    const lo = Math.min(...finite);
    const hi = Math.max(...finite);
    const span = hi - lo || Math.abs(hi) || 1;
    const total = Math.max(this.steps || 0, values.length, 2);
    const x = (i) => pad + ((width - 2 * pad) * i) / (total - 1);
    const y = (v) => height - pad - ((height - 2 * pad) * (v - lo)) / span;

    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = ratio;
    for (let k = 0; k <= 4; k++) {
      const gy = pad + ((height - 2 * pad) * k) / 4;
      ctx.beginPath();
      ctx.moveTo(pad, gy);
      ctx.lineTo(width - pad, gy);
      ctx.stroke();
    }
    const line = (series, color, lineWidth) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = lineWidth * ratio;
      ctx.beginPath();
      let open = false;
      series.forEach((v, i) => {
        if (v === null || !Number.isFinite(v)) {
          open = false;
          return;
        }
        if (open) ctx.lineTo(x(i), y(v));
        else ctx.moveTo(x(i), y(v));
        open = true;
      });
      ctx.stroke();
    };
    line(values, COLORS.raw, 1);
    line(smooth(values, values.length > 50 ? 0.9 : 0.6), COLORS.smooth, 2);
    if (!this.compact) {
      ctx.fillStyle = COLORS.muted;
      ctx.font = `${10 * ratio}px sans-serif`;
      ctx.textBaseline = "top";
      ctx.fillText(hi.toPrecision(3), pad + 2 * ratio, pad);
      ctx.textBaseline = "bottom";
      ctx.fillText(lo.toPrecision(3), pad + 2 * ratio, height - pad);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Node helpers

function addPanel(node, name, element, height) {
  const widget = node.addDOMWidget(name, "svdiff_panel", element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => height,
    getMaxHeight: () => height,
  });
  widget.serialize = false; // never part of widgets_values: saved workflows stay loadable without the extension
  return widget;
}

function growToFit(node) {
  const min = node.computeSize();
  if (node.size[0] < min[0] || node.size[1] < min[1]) {
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
}

function chain(prototype, method, after) {
  const original = prototype[method];
  prototype[method] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function graphNodes(graph) {
  return graph?.nodes ?? graph?._nodes ?? [];
}

function checkpointOf(node) {
  const widget = node?.widgets?.find((w) => w.name in CHECKPOINT_WIDGETS);
  return widget ? { name: String(widget.value ?? ""), folder: CHECKPOINT_WIDGETS[widget.name] } : null;
}

function upstreamCheckpoint(node) {
  // Follow MODEL inputs upstream (through LoRA loaders, other patches, ...) to the loader.
  const seen = new Set();
  let current = node;
  for (let depth = 0; current && depth < 64 && !seen.has(current.id); depth++) {
    seen.add(current.id);
    if (current !== node) {
      const found = checkpointOf(current);
      if (found) return found;
    }
    const slot = current.inputs?.findIndex((input) => input.type === "MODEL") ?? -1;
    if (slot < 0) return null;
    current = current.getInputNode(slot);
  }
  return null;
}

function findCheckpoint(node) {
  const direct = upstreamCheckpoint(node);
  if (direct) return direct;
  // A shift loader without a MODEL input: the model of the node it feeds.
  for (const output of node.outputs ?? []) {
    for (const linkId of output.links ?? []) {
      const link = node.graph?.links?.[linkId] ?? node.graph?.links?.get?.(linkId);
      const target = link && node.graph.getNodeById(link.target_id);
      const found = target && upstreamCheckpoint(target);
      if (found) return found;
    }
  }
  const loaders = graphNodes(node.graph).map(checkpointOf).filter(Boolean);
  return loaders.length === 1 ? loaders[0] : null;
}

// ---------------------------------------------------------------------------------------
// Shift-file info panel

class InfoPanel {
  constructor(node, widgetName) {
    this.node = node;
    this.widgetName = widgetName;
    this.key = null;
    this.element = document.createElement("div");
    this.element.className = "svdiff-shift-info";
    this.element.dataset.svdiffInfo = "";
    Object.assign(this.element.style, {
      font: "11px sans-serif",
      color: COLORS.text,
      padding: "3px 5px",
      overflow: "hidden",
      display: "flex",
      flexDirection: "column",
      gap: "2px",
      boxSizing: "border-box",
      height: "100%",
    });
    this.lines = document.createElement("div");
    this.chart = new LossChart(true);
    this.chart.element.style.flex = "1 1 auto";
    this.chart.element.style.minHeight = "30px";
    this.element.append(this.lines, this.chart.element);
    this.show([["choose a spectral shift", COLORS.muted]], {});
  }

  shiftName() {
    return String(this.node.widgets?.find((w) => w.name === this.widgetName)?.value ?? "");
  }

  listed(name) {
    const values = this.node.widgets?.find((w) => w.name === this.widgetName)?.options?.values;
    return !Array.isArray(values) || values.includes(name);
  }

  refreshIfChanged(force = false) {
    const name = this.shiftName();
    const checkpoint = findCheckpoint(this.node);
    const key = JSON.stringify([name, checkpoint, this.listed(name)]);
    if (!force && key === this.key) return;
    this.key = key;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.fetch(name, checkpoint, key), 150);
  }

  async fetch(name, checkpoint, key) {
    if (!name || !this.listed(name)) {
      const text = name ? `'${name}' is not in models/spectral_shifts: put the file there and press R to refresh` : "choose a spectral shift";
      this.show([[text, COLORS.warn, true]], { state: "missing" });
      return;
    }
    const query = new URLSearchParams({ name });
    if (checkpoint?.name) {
      query.set("checkpoint", checkpoint.name);
      query.set("checkpoint_folder", checkpoint.folder);
    }
    let body;
    try {
      const response = await api.fetchApi(`/svdiff/shift_info?${query}`);
      body = await response.json();
    } catch (error) {
      body = { error: `could not ask the server about '${name}' (${error.message ?? error})` };
    }
    if (key !== this.key) return; // a newer request is on its way
    this.render(body, checkpoint);
  }

  render(body, checkpoint) {
    if (body.error) {
      this.show([[body.error, COLORS.bad, true]], { state: "error" });
      return;
    }
    const info = body.info;
    const lines = [];
    const fit = body.fit;
    if (!checkpoint) {
      lines.push(["connect a checkpoint loader to check the fit", COLORS.muted]);
    } else if (fit?.status === "fits" || fit?.status === "no_model_layers") {
      lines.push([`✓ ${fit.message}${fit.architecture ? ` (${fit.architecture})` : ""}`, COLORS.good]);
    } else if (fit?.status === "does_not_fit") {
      lines.push([`✗ does not fit ${fit.checkpoint}${fit.architecture ? ` (${fit.architecture})` : ""}: ${fit.message}`, COLORS.bad, true]);
    } else if (fit) {
      lines.push([fit.message, COLORS.warn]);
    }
    // info.layers is the one wording of a shift's counts (SpectralShift.layer_summary), as Inspect shows it
    lines.push([`${info.architecture} · ${formatBytes(info.bytes)} · ${info.layers} · ${info.values.toLocaleString()} values`, COLORS.text]);
    if (info.trigger_words.length) lines.push([`trigger: ${info.trigger_words.join(", ")}`, COLORS.text]);
    const trained = [];
    if (info.steps) trained.push(`${info.steps} steps`);
    if (info.rank) trained.push(`rank ${info.rank}`);
    if (trained.length) lines.push([`trained ${trained.join(", ")}`, COLORS.muted]);
    if (info.description) lines.push([info.description, COLORS.muted]);
    if (info.history.length) lines.push([`history: ${info.history.join(" → ")}`, COLORS.muted]);
    this.show(lines, {
      state: "ok",
      architecture: info.architecture,
      fit: fit?.status ?? "",
      checkpointArchitecture: fit?.architecture ?? "",
      triggerWords: info.trigger_words.join(","),
    });
    this.chart.setAll(info.losses ?? []);
    this.chart.element.style.display = info.losses?.length ? "flex" : "none";
  }

  show(lines, data) {
    this.lines.replaceChildren(
      ...lines.map(([text, color, wrap]) => {
        const div = document.createElement("div");
        div.textContent = text;
        div.title = text;
        Object.assign(div.style, { color, overflow: "hidden", textOverflow: "ellipsis", whiteSpace: wrap ? "normal" : "nowrap" });
        if (wrap) Object.assign(div.style, { display: "-webkit-box", webkitLineClamp: "3", webkitBoxOrient: "vertical" });
        return div;
      }),
    );
    for (const key of ["state", "architecture", "fit", "checkpointArchitecture", "triggerWords"]) {
      this.element.dataset[key] = data[key] ?? "";
    }
    if (data.state !== "ok") {
      this.chart.setAll([]);
      this.chart.element.style.display = "none";
    }
  }
}

// ---------------------------------------------------------------------------------------
// Registration

function nodeFromMessage(id) {
  const graph = app.graph;
  return graph?.getNodeById(Number(id)) ?? graph?.getNodeById(id) ?? null;
}

// After a page reload, or when a workflow is opened again (from the queue, a tab, a file), a
// training node's finished curve comes back from the newest /history entry in which this node
// of this graph ran: ComfyUI keeps every node's output there, the losses included.
const HISTORY_ITEMS = 200;

async function restoreCurves(graph) {
  const nodes = (graph?.nodes ?? graph?._nodes ?? []).filter((n) => n.svdiffChart && n.svdiffChart.state === "idle");
  if (!nodes.length) return;
  let history;
  try {
    const response = await api.fetchApi(`/history?max_items=${HISTORY_ITEMS}`);
    if (!response.ok) return;
    history = Object.values(await response.json());
  } catch {
    return; // no history (an old server, a network error): the curve appears on the next run
  }
  history.sort((a, b) => (b.prompt?.[0] ?? 0) - (a.prompt?.[0] ?? 0));
  for (const node of nodes) {
    const id = String(node.id);
    const entry = history.find((item) => {
      const ran = item.prompt?.[2]?.[id]?.class_type === node.type && Array.isArray(item.outputs?.[id]?.svdiff_loss);
      const workflow = item.prompt?.[3]?.extra_pnginfo?.workflow?.id;
      return ran && graph.id && workflow === graph.id;
    });
    if (entry && node.svdiffChart.state === "idle") node.svdiffChart.setAll(entry.outputs[id].svdiff_loss);
  }
}

app.registerExtension({
  name: "svdiff.ui",

  async setup() {
    api.addEventListener(TRAIN_EVENT, ({ detail }) => {
      nodeFromMessage(detail.node)?.svdiffChart?.update(detail);
    });
    await restoreCurves(app.graph); // the workflow restored when the page loaded
  },

  async afterConfigureGraph() {
    await restoreCurves(app.graph);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (TRAIN_NODES.has(nodeData.name)) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        this.svdiffChart = new LossChart();
        addPanel(this, "svdiff_loss_curve", this.svdiffChart.element, CHART_HEIGHT);
        growToFit(this);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        growToFit(this);
      });
      chain(nodeType.prototype, "onExecuted", function (output) {
        if (Array.isArray(output?.svdiff_loss)) this.svdiffChart?.setAll(output.svdiff_loss);
      });
    }
    if (nodeData.name === DEMO_NODE) {
      // New files in models/ and input/: refresh the loaders' lists, as pressing R does.
      chain(nodeType.prototype, "onExecuted", function () {
        app.refreshComboInNodes?.();
      });
    }
    const widgetName = LOADER_NODES[nodeData.name];
    if (widgetName) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        this.svdiffInfo = new InfoPanel(this, widgetName);
        addPanel(this, "svdiff_shift_info", this.svdiffInfo.element, INFO_HEIGHT);
        growToFit(this);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        growToFit(this);
      });
      // Cheap check on every redraw: refetch only when the file or the checkpoint changed.
      chain(nodeType.prototype, "onDrawForeground", function () {
        this.svdiffInfo?.refreshIfChanged();
      });
      const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
      nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
        const result = getExtraMenuOptions?.apply(this, arguments);
        options.push({ content: "Refresh shift info", callback: () => this.svdiffInfo?.refreshIfChanged(true) });
        const words = this.svdiffInfo?.element.dataset.triggerWords;
        if (words) {
          options.push({
            content: `Copy trigger words (${words})`,
            callback: () => navigator.clipboard?.writeText(words.replaceAll(",", ", ")).catch(() => {}),
          });
        }
        return result;
      };
    }
  },
});
