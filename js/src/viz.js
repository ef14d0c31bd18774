// Graphviz (WASM, 1.2 MB) is not bundled into every widget: the kernel sends
// it once, gzipped, as the binary `source` of a shared asset model that each
// view points to with its `_viz` trait. It is imported once per page and
// kept on globalThis.

const KEY = "__flowmagic_viz_instance_v1";
const REF_PREFIX = "IPY_MODEL_";

async function gunzip(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return new Response(stream).text();
}

async function importSource(source) {
  const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  try {
    return await import(/* webpackIgnore: true */ url);
  } finally {
    URL.revokeObjectURL(url);
  }
}

async function loadViz(model) {
  const ref = model.get("_viz") || "";
  if (!ref.startsWith(REF_PREFIX)) {
    throw new Error("this view has no Graphviz asset (_viz)");
  }
  const asset = await model.widget_manager.get_model(ref.slice(REF_PREFIX.length));
  const module = await importSource(await gunzip(asset.get("source")));
  return module.instance();
}

export function hasVizAsset(model) {
  return Boolean(globalThis[KEY]) || String(model.get("_viz") || "").startsWith(REF_PREFIX);
}

export function getViz(model) {
  if (!globalThis[KEY]) {
    const pending = loadViz(model);
    globalThis[KEY] = pending;
    pending.catch(() => {
      if (globalThis[KEY] === pending) {
        delete globalThis[KEY]; // let the next view try again
      }
    });
  }
  return globalThis[KEY];
}
