// The live DAG view. Graphviz lays the flow out once per `graph` change;
// state changes only touch the attributes and texts of the nodes, so a
// thousand foreach updates cost no layout. Everything shown comes from the
// model's traits (graph, states, run, selected_step): a re-rendered cell or
// a reloaded page shows the same picture.
import { buildDot } from "./dot.js";
import { getViz, hasVizAsset } from "./viz.js";

const SVG_NS = "http://www.w3.org/2000/svg";
// step states that end a step (flowmagic/states.py); an unknown state counts as unfinished
const TERMINAL = new Set(["done", "failed", "interrupted", "cancelled", "caught", "cloned", "cached"]);
let widgetCounter = 0;

export function uniqueId() {
  widgetCounter += 1;
  const random = Math.random().toString(36).slice(2, 7);
  return `fm${Date.now().toString(36)}${widgetCounter.toString(36)}${random}`;
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds < 0) {
    return "";
  }
  if (seconds < 10) {
    return `${seconds.toFixed(1)} s`;
  }
  if (seconds < 60) {
    return `${Math.round(seconds)} s`;
  }
  if (seconds < 3600) {
    const minutes = Math.floor(seconds / 60);
    return `${minutes} min ${String(Math.round(seconds % 60)).padStart(2, "0")} s`;
  }
  const hours = Math.floor(seconds / 3600);
  return `${hours} h ${String(Math.floor((seconds % 3600) / 60)).padStart(2, "0")} min`;
}

function statusWord(st) {
  const state = st.state || "pending";
  if (state === "retrying" || (state === "running" && (st.attempt || 1) > 1)) {
    return `${state} #${st.attempt || 2}`;
  }
  return state;
}

function liveDuration(st) {
  if ((st.state === "running" || st.state === "retrying") && typeof st.started === "number") {
    return Math.max(0, Date.now() / 1000 - st.started);
  }
  return st.duration;
}

function svgEl(tag, attrs = {}, text = null) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    el.setAttribute(key, String(value));
  }
  if (text !== null) {
    el.textContent = text;
  }
  return el;
}

// Bounding box of a Graphviz polygon's `points` attribute.
function polygonBox(polygon) {
  const numbers = polygon
    .getAttribute("points")
    .trim()
    .split(/[\s,]+/)
    .map(Number);
  const xs = numbers.filter((_, i) => i % 2 === 0);
  const ys = numbers.filter((_, i) => i % 2 === 1);
  const x = Math.min(...xs);
  const y = Math.min(...ys);
  return { x, y, width: Math.max(...xs) - x, height: Math.max(...ys) - y };
}

// Fills an empty Graphviz step box with our own parts; returns them.
function buildStepNode(group, step) {
  const polygon = group.querySelector("polygon");
  const box = polygonBox(polygon);
  polygon.classList.add("fm-layout-box");
  const cx = box.x + box.width / 2;
  const text = (cls, y, content) => svgEl("text", { class: cls, x: cx, y, "text-anchor": "middle" }, content);
  const parts = {
    box,
    rect: svgEl("rect", { class: "fm-node-box", x: box.x, y: box.y, width: box.width, height: box.height, rx: 7, ry: 7 }),
    name: text("fm-node-name", box.y + 19, step.name),
    status: text("fm-node-status", box.y + 35, "pending"),
    progress: svgEl("g", { class: "fm-progress" }),
  };
  const barX = box.x + 10;
  const barWidth = box.width - 20;
  const barY = box.y + 43;
  parts.bar = { x: barX, width: barWidth };
  parts.barBg = svgEl("rect", { class: "fm-bar-bg", x: barX, y: barY, width: barWidth, height: 6, rx: 3 });
  parts.barDone = svgEl("rect", { class: "fm-bar-done", x: barX, y: barY, width: 0, height: 6, rx: 3 });
  parts.barFailed = svgEl("rect", { class: "fm-bar-failed", x: barX, y: barY, width: 0, height: 6, rx: 3 });
  parts.counts = text("fm-node-counts", barY + 18, "");
  parts.progress.append(parts.barBg, parts.barDone, parts.barFailed, parts.counts);
  group.append(parts.rect, parts.name, parts.status, parts.progress);
  group.setAttribute("data-step", step.name);
  group.setAttribute("tabindex", "0");
  group.setAttribute("role", "button");
  group.classList.add("fm-step");
  if (step.options && step.options.foreach) {
    group.setAttribute("data-foreach", step.options.foreach);
  }
  const tooltip = group.querySelector("title");
  if (tooltip) {
    tooltip.textContent = describeStep(step);
  }
  return parts;
}

// Squeezes a text that the browser's font draws wider than its box.
function fitText(textEl, width) {
  textEl.removeAttribute("textLength");
  textEl.removeAttribute("lengthAdjust");
  let drawn = 0;
  try {
    drawn = textEl.getComputedTextLength();
  } catch (error) {
    drawn = 0; // not in the document yet: nothing to measure
  }
  if (drawn > width) {
    textEl.setAttribute("textLength", String(width));
    textEl.setAttribute("lengthAdjust", "spacingAndGlyphs");
  }
}

function describeStep(step) {
  // the graph keeps the 0-based cell index; people read JupyterLab's 1-based number
  const lines = [`${step.name} (cell ${step.cell + 1})`];
  if (step.reads && step.reads.length) {
    lines.push(`reads: ${step.reads.join(", ")}`);
  }
  if (step.writes && step.writes.length) {
    lines.push(`writes: ${step.writes.join(", ")}`);
  }
  const options = Object.entries(step.options || {}).map(([k, v]) => `--${k} ${v}`);
  if (options.length) {
    lines.push(options.join(" "));
  }
  return lines.join("\n");
}

function updateStepNode(group, parts, st, isForeach) {
  const state = st.state || "pending";
  group.setAttribute("data-state", state);
  group.setAttribute("data-attempt", String(st.attempt || 0));
  const total = st.total || 0;
  const done = st.done || 0;
  const failed = st.failed || 0;
  group.setAttribute("data-done", String(done));
  group.setAttribute("data-total", String(total));
  group.setAttribute("data-failed", String(failed));
  const duration = formatDuration(liveDuration(st));
  const words = [statusWord(st)];
  if (duration) {
    words.push(duration);
  }
  parts.status.textContent = words.join(" · ");
  fitText(parts.status, parts.box.width - 10);
  // Only a foreach step has room for a progress bar (its box is taller).
  const showProgress = isForeach;
  parts.progress.style.display = showProgress ? "" : "none";
  if (showProgress) {
    parts.counts.textContent = total > 0 ? `${done}/${total} tasks` + (failed ? ` · ${failed} failed` : "") : "";
    fitText(parts.counts, parts.box.width - 10);
    const scale = total > 0 ? parts.bar.width / total : 0;
    parts.barDone.setAttribute("width", String(Math.min(done, total) * scale));
    parts.barFailed.setAttribute("x", String(parts.bar.x + Math.min(done, total) * scale));
    parts.barFailed.setAttribute("width", String(Math.min(failed, Math.max(0, total - done)) * scale));
  }
}

function renderHeader(header, model) {
  const graph = model.get("graph") || {};
  const run = model.get("run") || {};
  const states = model.get("states") || {};
  const steps = graph.steps || [];
  const finished = steps.filter((s) => TERMINAL.has((states[s.name] || {}).state)).length;
  header.replaceChildren();
  const title = document.createElement("span");
  title.className = "fm-title";
  title.textContent = graph.flow || "flow";
  header.append(title);
  const facts = [`${steps.length} step${steps.length === 1 ? "" : "s"}`];
  if (run.run_id !== undefined && run.run_id !== null) {
    facts.unshift(`run ${run.run_id}`);
  }
  if (Object.keys(states).length) {
    facts.push(`${finished}/${steps.length} finished`);
  }
  const meta = document.createElement("span");
  meta.className = "fm-meta";
  meta.textContent = facts.join(" · ");
  header.append(meta);
  if (run.status) {
    const badge = document.createElement("span");
    badge.className = "fm-badge";
    badge.setAttribute("data-state", run.status);
    badge.textContent = run.status;
    header.append(badge);
  }
  header.parentElement?.setAttribute("data-run-status", run.status || "");
  header.parentElement?.setAttribute("data-run-id", run.run_id ?? "");
}

export function renderDag(model, el) {
  const uid = uniqueId();
  const root = document.createElement("div");
  root.className = "fm-dag";
  root.setAttribute("data-flowmagic", "dag");
  root.setAttribute("data-widget-uid", uid);
  const header = document.createElement("div");
  header.className = "fm-header";
  const canvas = document.createElement("div");
  canvas.className = "fm-canvas";
  root.append(header, canvas);
  el.append(root);

  let nodes = new Map(); // step name -> {group, parts, isForeach}
  let layoutToken = 0;

  function applyStates() {
    const states = model.get("states") || {};
    for (const [name, node] of nodes) {
      updateStepNode(node.group, node.parts, states[name] || { state: "pending" }, node.isForeach);
    }
    renderHeader(header, model);
  }

  function applySelection() {
    const selected = model.get("selected_step") || "";
    for (const [name, node] of nodes) {
      node.group.setAttribute("data-selected", name === selected ? "true" : "false");
    }
    root.setAttribute("data-selected-step", selected);
  }

  function select(name) {
    model.set("selected_step", name);
    model.save_changes();
    applySelection();
  }

  function decorate(svg, graph, ids) {
    const byName = new Map((graph.steps || []).map((s) => [s.name, s]));
    const found = new Map();
    for (const [id, what] of ids.nodes) {
      const group = svg.querySelector(`[id="${id}"]`);
      if (!group) {
        continue;
      }
      if (what.kind === "param") {
        group.classList.add("fm-param");
        group.setAttribute("data-param", what.name);
        continue;
      }
      const step = byName.get(what.name);
      const parts = buildStepNode(group, step);
      const isForeach = Boolean(step.options && step.options.foreach);
      group.addEventListener("click", () => select(step.name));
      group.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          select(step.name);
        }
      });
      found.set(step.name, { group, parts, isForeach });
    }
    for (const [id, edge] of ids.edges) {
      const group = svg.querySelector(`[id="${id}"]`);
      if (!group) {
        continue;
      }
      group.classList.add(edge.kind === "param" ? "fm-param-edge" : "fm-edge");
      group.setAttribute("data-edge-from", edge.from);
      group.setAttribute("data-edge-to", edge.to);
      group.setAttribute("data-variables", edge.variables.join(","));
    }
    return found;
  }

  function sizeSvg(svg) {
    // Graphviz sizes in points; show at 1 pt = 1 px (a bit smaller than
    // print size, as JupyterLab's 13px UI font) and shrink to the width.
    // A flow wider than the output area shrinks, but not below 55 % (text
    // stays readable): past that the canvas scrolls sideways.
    const natural = Math.ceil(svg.viewBox.baseVal.width);
    svg.removeAttribute("height");
    svg.removeAttribute("width");
    svg.style.width = "100%";
    svg.style.maxWidth = `${natural}px`;
    svg.style.minWidth = `${Math.round(natural * 0.55)}px`;
    svg.style.height = "auto";
    svg.classList.add("fm-svg");
  }

  async function relayout() {
    const token = ++layoutToken;
    const graph = model.get("graph") || {};
    if (!graph.steps || graph.steps.length === 0) {
      nodes = new Map();
      canvas.replaceChildren(Object.assign(document.createElement("div"), {
        className: "fm-empty",
        textContent: "This flow has no steps yet: start a cell with %%step NAME.",
      }));
      applyStates();
      return;
    }
    const ids = buildDot(graph, uid);
    if (!hasVizAsset(model)) {
      // Python attaches Graphviz when it displays the view; a view shown some
      // other way (inside a container) asks for it.
      canvas.textContent = "Loading the graph layout…";
      model.send({ type: "need-viz" });
      return;
    }
    let svg;
    try {
      const viz = await getViz(model);
      svg = viz.renderSVGElement(ids.dot);
    } catch (error) {
      canvas.textContent = `flowmagic: could not lay out the flow: ${error}`;
      return;
    }
    if (token !== layoutToken) {
      return; // a newer graph arrived while this one was laid out
    }
    // Graphviz writes the graph's title and background: drop both.
    svg.querySelectorAll(":scope > g > title").forEach((t) => t.remove());
    const background = svg.querySelector(":scope > g > polygon");
    if (background) {
      background.remove();
    }
    sizeSvg(svg);
    nodes = decorate(svg, graph, ids);
    canvas.replaceChildren(svg);
    for (const node of nodes.values()) {
      fitText(node.parts.name, node.parts.box.width - 10); // measurable once in the page
    }
    root.setAttribute("data-layout", "ready");
    applyStates();
    applySelection();
  }

  function tick() {
    const states = model.get("states") || {};
    for (const [name, node] of nodes) {
      const st = states[name];
      if (st && (st.state === "running" || st.state === "retrying")) {
        updateStepNode(node.group, node.parts, st, node.isForeach);
      }
    }
  }

  const onGraph = () => relayout();
  const onStates = () => applyStates();
  const onRun = () => renderHeader(header, model);
  const onSelected = () => applySelection();
  model.on("change:graph", onGraph);
  model.on("change:_viz", onGraph);
  model.on("change:states", onStates);
  model.on("change:run", onRun);
  model.on("change:selected_step", onSelected);
  const ticker = setInterval(tick, 1000);
  renderHeader(header, model);
  relayout();

  return () => {
    clearInterval(ticker);
    model.off("change:graph", onGraph);
    model.off("change:_viz", onGraph);
    model.off("change:states", onStates);
    model.off("change:run", onRun);
    model.off("change:selected_step", onSelected);
  };
}
