// The artifact inspector: run / step / task pickers, the artifacts of the
// chosen task with previews, and each attempt's logs and exception. Python
// reads the store and fills the traits; this file only draws them and sends
// the pickers' choices back (run_id, step, task_id).

import { sanitizeHtml } from "./sanitize.js";

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) {
      continue;
    }
    if (key === "className") {
      el.className = value;
    } else {
      el.setAttribute(key, String(value));
    }
  }
  for (const child of children) {
    if (child === null || child === undefined) {
      continue;
    }
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function picker(label, name, options, selected, onChange) {
  const select = h("select", { className: "fm-select", "data-picker": name, "aria-label": label });
  for (const option of options) {
    const el = h("option", { value: String(option.value) }, option.label);
    if (String(option.value) === String(selected)) {
      el.selected = true;
    }
    select.append(el);
  }
  select.disabled = options.length === 0;
  select.addEventListener("change", () => onChange(select.value));
  return h("label", { className: "fm-picker" }, h("span", { className: "fm-picker-label" }, label), select);
}

function framePreview(preview) {
  const wrap = h("div", { className: "fm-preview fm-preview-frame" });
  const [rows, cols] = preview.shape || [0, 0];
  const dtypes = Object.entries(preview.dtypes || {})
    .map(([name, dtype]) => `${name}: ${dtype}`)
    .join(", ");
  wrap.append(h("div", { className: "fm-preview-meta" }, `${rows} rows × ${cols} columns`));
  if (dtypes) {
    wrap.append(h("div", { className: "fm-preview-meta fm-dtypes" }, dtypes));
  }
  const table = h("table", { className: "fm-frame" });
  const head = h("tr", {}, h("th", {}, ""));
  for (const column of preview.columns || []) {
    head.append(h("th", {}, column));
  }
  table.append(h("thead", {}, head));
  const body = h("tbody");
  (preview.rows || []).forEach((row, i) => {
    const tr = h("tr", {}, h("th", {}, (preview.index || [])[i] ?? i));
    for (const cell of row) {
      tr.append(h("td", {}, cell));
    }
    body.append(tr);
  });
  table.append(body);
  wrap.append(h("div", { className: "fm-frame-scroll" }, table));
  if (preview.truncated) {
    wrap.append(h("div", { className: "fm-preview-meta" }, preview.truncated));
  }
  return wrap;
}

function arrayPreview(preview) {
  const facts = [`shape (${(preview.shape || []).join(", ")}${(preview.shape || []).length === 1 ? "," : ""})`, preview.dtype];
  if (preview.min !== undefined && preview.min !== null) {
    facts.push(`min ${preview.min}`);
  }
  if (preview.max !== undefined && preview.max !== null) {
    facts.push(`max ${preview.max}`);
  }
  const wrap = h("div", { className: "fm-preview fm-preview-array" }, facts.join(" · "));
  if (preview.note) {
    wrap.append(h("div", { className: "fm-preview-meta" }, preview.note));
  }
  return wrap;
}

function preview(item) {
  const p = item.preview || {};
  if (p.kind === "frame") {
    return framePreview(p);
  }
  if (p.kind === "array") {
    return arrayPreview(p);
  }
  if (p.kind === "text") {
    return h("pre", { className: "fm-preview fm-preview-text" }, p.text);
  }
  return h("div", { className: "fm-preview fm-preview-meta" }, p.text || "");
}

function artifactsTable(artifacts) {
  if (!artifacts.length) {
    return h("div", { className: "fm-empty" }, "This task wrote no artifacts.");
  }
  const table = h("table", { className: "fm-artifacts" });
  table.append(h("thead", {}, h("tr", {}, h("th", {}, "name"), h("th", {}, "type"), h("th", {}, "size"), h("th", {}, "preview"))));
  const body = h("tbody");
  for (const item of artifacts) {
    body.append(
      h(
        "tr",
        { "data-artifact": item.name, "data-kind": (item.preview || {}).kind || "none" },
        h("td", { className: "fm-artifact-name" }, item.name),
        h("td", { className: "fm-artifact-type" }, item.type),
        h("td", { className: "fm-artifact-size" }, item.size_text),
        h("td", {}, preview(item)),
      ),
    );
  }
  table.append(body);
  return table;
}

// A step's display() calls, last value and figures (see runtime/outputs.py
// output_previews): images as data URIs, HTML as a notebook shows it, else text.
function outputsBlock(outputs) {
  const wrap = h("div", { className: "fm-outputs" });
  for (const output of outputs) {
    const item = h("div", { className: "fm-output", "data-output-kind": output.kind, "data-mimetype": output.mimetype });
    item.append(h("div", { className: "fm-preview-meta" }, output.label));
    if (output.kind === "image") {
      item.append(h("img", { className: "fm-output-image", src: output.src, alt: output.text || output.label }));
    } else if (output.kind === "html") {
      const body = h("div", { className: "fm-output-html" });
      body.innerHTML = sanitizeHtml(output.html); // untrusted: see sanitize.js
      item.append(body);
    } else {
      item.append(h("pre", { className: "fm-preview fm-preview-text" }, output.text));
    }
    wrap.append(item);
  }
  return wrap;
}

function logBlock(label, text) {
  if (!text) {
    return null;
  }
  return h(
    "details",
    { className: `fm-log fm-log-${label}`, open: "" },
    h("summary", {}, label),
    h("pre", { "data-stream": label }, text),
  );
}

function attemptBlock(attempt) {
  const block = h("div", {
    className: "fm-attempt",
    "data-attempt": attempt.attempt,
    "data-outcome": attempt.outcome,
  });
  block.append(h("div", { className: "fm-attempt-head" }, attempt.label));
  const exc = attempt.exception;
  if (exc) {
    block.append(
      h(
        "div",
        { className: "fm-exception", "data-exception-type": exc.type || "" },
        h("div", { className: "fm-exception-title" }, `${exc.type || "Error"}: ${exc.message || ""}`),
        exc.traceback ? h("pre", { className: "fm-traceback" }, exc.traceback) : null,
      ),
    );
  }
  // DOM append() would write a null as the text "null": keep only the logs that exist.
  block.append(...[logBlock("stdout", attempt.stdout), logBlock("stderr", attempt.stderr)].filter(Boolean));
  if (!exc && !attempt.stdout && !attempt.stderr) {
    block.append(h("div", { className: "fm-preview-meta" }, "no output"));
  }
  return block;
}

export function renderInspector(model, el) {
  const root = h("div", { className: "fm-inspector", "data-flowmagic": "inspector" });
  el.append(root);

  function choose(trait, value, parse) {
    model.set(trait, parse(value));
    model.save_changes();
  }

  function draw() {
    const runs = model.get("runs") || [];
    const steps = model.get("steps") || [];
    const tasks = model.get("tasks") || [];
    const detail = model.get("detail") || {};
    const runId = model.get("run_id");
    const step = model.get("step") || "";
    const taskId = model.get("task_id");
    root.setAttribute("data-run-id", runId ?? "");
    root.setAttribute("data-step", step);
    root.setAttribute("data-task-id", taskId ?? "");
    root.replaceChildren();
    const bar = h("div", { className: "fm-pickers" });
    bar.append(
      picker("run", "run", runs, runId, (v) => choose("run_id", v, Number)),
      picker("step", "step", steps, step, (v) => choose("step", v, String)),
      picker("task", "task", tasks, taskId, (v) => choose("task_id", v, Number)),
    );
    root.append(bar);
    const message = model.get("message") || "";
    if (message) {
      root.append(h("div", { className: "fm-empty" }, message));
    }
    if (detail.artifacts) {
      root.append(h("div", { className: "fm-section" }, "artifacts"), artifactsTable(detail.artifacts));
    }
    if (detail.outputs && detail.outputs.length) {
      root.append(h("div", { className: "fm-section" }, "outputs"), outputsBlock(detail.outputs));
    }
    if (detail.attempts && detail.attempts.length) {
      root.append(h("div", { className: "fm-section" }, "attempts"));
      for (const attempt of detail.attempts) {
        root.append(attemptBlock(attempt));
      }
    }
  }

  const traits = ["runs", "steps", "tasks", "detail", "run_id", "step", "task_id", "message"];
  // Python sets several traits at once: draw once for the whole batch.
  let scheduled = false;
  const onChange = () => {
    if (!scheduled) {
      scheduled = true;
      queueMicrotask(() => {
        scheduled = false;
        draw();
      });
    }
  };
  for (const trait of traits) {
    model.on(`change:${trait}`, onChange);
  }
  draw();
  return () => {
    for (const trait of traits) {
      model.off(`change:${trait}`, onChange);
    }
  };
}
