// anywidget entry point: one module for every flowmagic widget; the Python
// class says which view it wants in the `_view` trait.
import { renderDag } from "./dag.js";
import { renderInspector } from "./inspector.js";

function render({ model, el }) {
  const view = model.get("_view");
  el.classList.add("fm-root");
  if (view === "dag") {
    return renderDag(model, el);
  }
  if (view === "inspector") {
    return renderInspector(model, el);
  }
  if (view === "run") {
    const top = document.createElement("div");
    const bottom = document.createElement("div");
    top.className = "fm-run-dag";
    bottom.className = "fm-run-inspector";
    el.append(top, bottom);
    const cleanups = [renderDag(model, top), renderInspector(model, bottom)];
    return () => cleanups.forEach((cleanup) => cleanup());
  }
  el.textContent = `flowmagic: unknown view ${JSON.stringify(view)}`;
  return () => {};
}

export default { render };
