// Step HTML comes from the store, and whoever can write a store (a shared
// folder, a copied .flowmagic/) decides what it holds: treat it as untrusted
// output, as JupyterLab does. DOMPurify keeps tables, styles and images and
// drops scripts, event handlers (onerror=...), javascript: URLs and the like.
import DOMPurify from "dompurify";

const CONFIG = {
  FORBID_TAGS: ["form", "input", "button", "textarea", "select"], // nothing in a preview submits anything
  ALLOW_DATA_ATTR: false,
};

export function sanitizeHtml(html) {
  return DOMPurify.sanitize(String(html ?? ""), CONFIG);
}
