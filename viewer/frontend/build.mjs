// Bundles src/ and OpenSeadragon into ../static/viewer.js (one minified file, nothing fetched at run time)
// and copies OpenSeadragon's licence (BSD-3-Clause) beside it. Run: npm ci && npm run build.
import { build } from "esbuild";
import { copyFileSync, readFileSync } from "node:fs";

const osd = JSON.parse(readFileSync("node_modules/openseadragon/package.json", "utf8"));
await build({
  entryPoints: ["src/main.js"],
  bundle: true,
  minify: true,
  format: "iife",
  target: "es2020",
  outfile: "../static/viewer.js",
  legalComments: "none",
  banner: { js: `/* cellar view (BSD-3-Clause). Bundles OpenSeadragon ${osd.version} (${osd.license}, see openseadragon-LICENSE.txt). */` },
  logLevel: "info",
});
copyFileSync("node_modules/openseadragon/LICENSE.txt", "../static/openseadragon-LICENSE.txt");
