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
  // Swagger UI for the OpenAPI page at /docs.
  ["swagger-ui-dist/swagger-ui-bundle.js", "swagger-ui-bundle.js"],
  ["swagger-ui-dist/swagger-ui.css", "swagger-ui.css"],
  ["swagger-ui-dist/favicon-32x32.png", "swagger-ui-favicon.png"],
  ["swagger-ui-dist/LICENSE", "swagger-ui.LICENSE"],
  ["swagger-ui-dist/NOTICE", "swagger-ui.NOTICE"],
];

rmSync(target, { recursive: true, force: true });
cpSync(join(here, "src"), target, { recursive: true });
mkdirSync(join(target, "vendor"), { recursive: true });
for (const [source, name] of vendored) {
  cpSync(join(here, "node_modules", source), join(target, "vendor", name));
}
console.log(`dashboard copied to ${target}`);
