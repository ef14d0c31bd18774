// One Graphviz (WASM) instance per page: anywidget imports this module once
// per widget instance, so the instance is kept on globalThis and shared.
import { instance } from "@viz-js/viz";

const KEY = "__flowmagic_viz_instance_v1";

export function getViz() {
  if (!globalThis[KEY]) {
    globalThis[KEY] = instance();
  }
  return globalThis[KEY];
}
