// Builds the widget front end into flowmagic/widgets/static/, where the
// Python package ships it (committed, so `pip install` needs no node).
import { build } from "esbuild";
import { copyFile, mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { gzipSync } from "node:zlib";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const outdir = join(here, "..", "flowmagic", "widgets", "static");

await mkdir(outdir, { recursive: true });
await build({
  entryPoints: [join(here, "src", "index.js")],
  bundle: true,
  format: "esm",
  minify: true,
  target: ["es2020"],
  outfile: join(outdir, "flowmagic.js"),
  legalComments: "eof",
  charset: "utf8",
  logLevel: "info",
});
await copyFile(join(here, "src", "style.css"), join(outdir, "flowmagic.css"));
// Graphviz is shipped once per kernel as an asset model (see src/viz.js),
// gzipped: 1.2 MB of JavaScript becomes 0.47 MB of binary comm buffer.
const viz = await readFile(join(here, "node_modules", "@viz-js", "viz", "dist", "viz.js"));
await writeFile(join(outdir, "viz.js.gz"), gzipSync(viz, { level: 9 }));
await rm(join(outdir, "viz.js"), { force: true });
