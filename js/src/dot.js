// The flow's `show` document -> Graphviz DOT text. Graphviz only lays the
// graph out: nodes are empty fixed-size boxes that dag.js fills afterwards,
// so live state changes never move anything.

const NAME_CHAR_PT = 8.4; // bold 13px UI font, one character, in points
const STATUS_MIN_PT = 132; // room for "retrying #3 · 12 min 30 s"
const NODE_PAD_PT = 22;
export const NODE_HEIGHT_IN = 0.72;
export const FOREACH_HEIGHT_IN = 0.95;
const MAX_EDGE_VARIABLES = 3;

export function quote(text) {
  return `"${String(text).replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, " ")}"`;
}

export function edgeLabel(variables) {
  if (!variables || variables.length === 0) {
    return "";
  }
  const shown = variables.slice(0, MAX_EDGE_VARIABLES).join(", ");
  const rest = variables.length - MAX_EDGE_VARIABLES;
  return rest > 0 ? `${shown} +${rest}` : shown;
}

export function nodeWidthInches(name) {
  const points = Math.max(String(name).length * NAME_CHAR_PT, STATUS_MIN_PT) + NODE_PAD_PT;
  return (points / 72).toFixed(2);
}

function parameterReaders(graph) {
  const readers = new Map();
  for (const param of graph.parameters || []) {
    readers.set(param.name, []);
  }
  for (const step of graph.steps || []) {
    for (const name of step.reads || []) {
      if (readers.has(name)) {
        readers.get(name).push(step.name);
      }
    }
  }
  return readers;
}

// Top to bottom, unless a rank is much wider than the flow is deep (a fan-out
// of many parallel steps): then left to right, which scrolls down instead of
// shrinking the text.
export function rankdir(graph) {
  const parents = new Map((graph.steps || []).map((s) => [s.name, []]));
  for (const edge of graph.edges || []) {
    if (parents.has(edge.to) && parents.has(edge.from)) {
      parents.get(edge.to).push(edge.from);
    }
  }
  const depth = new Map();
  const rankOf = (name, seen = new Set()) => {
    if (depth.has(name)) {
      return depth.get(name);
    }
    if (seen.has(name)) {
      return 0; // a cycle cannot come from build_flow; do not loop on bad input
    }
    seen.add(name);
    const rank = Math.max(-1, ...parents.get(name).map((p) => rankOf(p, seen))) + 1;
    depth.set(name, rank);
    return rank;
  };
  const widths = new Map();
  for (const name of parents.keys()) {
    const rank = rankOf(name);
    widths.set(rank, (widths.get(rank) || 0) + 1);
  }
  const widest = Math.max(0, ...widths.values());
  return widest > 6 && widest > widths.size ? "LR" : "TB";
}

// Returns the DOT text and, for every id put in it, what it stands for.
export function buildDot(graph, uid) {
  const nodes = new Map(); // svg id -> {kind: "step"|"param", name}
  const edges = new Map(); // svg id -> {from, to, variables, kind}
  const stepId = new Map();
  const lines = [
    `digraph flow {`,
    `  id=${quote(`${uid}_graph`)};`,
    `  graph [rankdir=${rankdir(graph)}, nodesep=0.3, ranksep=0.42, bgcolor="transparent", pad=0.1];`,
    `  node [shape=box, fixedsize=true, height=${NODE_HEIGHT_IN}, label="", fontname="Helvetica", fontsize=11];`,
    `  edge [fontname="Helvetica", fontsize=10, arrowsize=0.7];`,
  ];
  (graph.steps || []).forEach((step, i) => {
    const id = `${uid}_n${i}`;
    stepId.set(step.name, id);
    nodes.set(id, { kind: "step", name: step.name });
    const height = step.options && step.options.foreach ? FOREACH_HEIGHT_IN : NODE_HEIGHT_IN;
    lines.push(`  ${quote(id)} [id=${quote(id)}, width=${nodeWidthInches(step.name)}, height=${height}];`);
  });
  const readers = parameterReaders(graph);
  (graph.parameters || []).forEach((param, i) => {
    const id = `${uid}_p${i}`;
    nodes.set(id, { kind: "param", name: param.name });
    const label = `${param.name} = ${JSON.stringify(param.default)}`.slice(0, 40);
    lines.push(
      `  ${quote(id)} [id=${quote(id)}, shape=box, style="rounded,dashed", fixedsize=false, ` +
        `height=0.3, margin="0.12,0.04", fontsize=10, label=${quote(label)}];`,
    );
    (readers.get(param.name) || []).forEach((reader, j) => {
      if (!stepId.has(reader)) {
        return;
      }
      const edgeId = `${uid}_pe${i}_${j}`;
      edges.set(edgeId, { from: param.name, to: reader, variables: [param.name], kind: "param" });
      lines.push(`  ${quote(id)} -> ${quote(stepId.get(reader))} [id=${quote(edgeId)}, style=dashed];`);
    });
  });
  (graph.edges || []).forEach((edge, i) => {
    if (!stepId.has(edge.from) || !stepId.has(edge.to)) {
      return;
    }
    const id = `${uid}_e${i}`;
    edges.set(id, { from: edge.from, to: edge.to, variables: edge.variables || [], kind: "data" });
    const label = edgeLabel(edge.variables);
    lines.push(
      `  ${quote(stepId.get(edge.from))} -> ${quote(stepId.get(edge.to))} ` +
        `[id=${quote(id)}, label=${quote(label ? ` ${label} ` : "")}, tooltip=${quote((edge.variables || []).join(", "))}];`,
    );
  });
  lines.push("}");
  return { dot: lines.join("\n"), nodes, edges };
}
