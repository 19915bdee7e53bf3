// Copy the dashboard into the Python package: the sources in src/ and the files of the
// npm packages it imports into vendor/. Run `npm ci && npm run build` after changing either,
// and commit src/ironshadow/api/static, so that installing the engine needs no Node.
import { cpSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const target = join(here, "..", "src", "ironshadow", "api", "static");

const vendored = [
  ["uplot/dist/uPlot.esm.js", "uPlot.esm.js"],
  ["uplot/dist/uPlot.min.css", "uPlot.min.css"],
  ["uplot/LICENSE", "uPlot.LICENSE"],
];

rmSync(target, { recursive: true, force: true });
cpSync(join(here, "src"), target, { recursive: true });
mkdirSync(join(target, "vendor"), { recursive: true });
for (const [source, name] of vendored) {
  cpSync(join(here, "node_modules", source), join(target, "vendor", name));
}
console.log(`dashboard copied to ${target}`);
