// Builds dist/ (ESM, CommonJS, a browser global `StateSync`, .d.ts) and the
// hub's live view page, a single HTML file the `statesync` CLI embeds.
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createHash } from "node:crypto";
import * as esbuild from "esbuild";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "dist");
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });

const common = { entryPoints: [join(root, "src/index.ts")], bundle: true, target: "es2022", logLevel: "warning" };
await esbuild.build({ ...common, format: "esm", outfile: join(dist, "index.js"), sourcemap: true });
await esbuild.build({ ...common, format: "cjs", outfile: join(dist, "index.cjs"), sourcemap: true });
await esbuild.build({ ...common, format: "iife", globalName: "StateSync", outfile: join(dist, "statesync.iife.js"), minify: true });
execFileSync(join(root, "node_modules/.bin/tsc"), ["-p", join(root, "tsconfig.json")], { stdio: "inherit" });

// The live view: the page's script bundled with the package, inlined.
const live = await esbuild.build({
  entryPoints: [join(root, "live/live.ts")],
  bundle: true,
  minify: true,
  target: "es2022",
  format: "iife",
  write: false,
});
const script = live.outputFiles[0].text.replaceAll("</script", "<\\/script");
// Only this script may run, and it may connect only to its own origin.
const hash = createHash("sha256").update(script).digest("base64");
const policy = [
  "default-src 'none'",
  `script-src 'sha256-${hash}'`,
  "style-src 'unsafe-inline'",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'none'",
].join("; ");
const page = readFileSync(join(root, "live/live.html"), "utf8")
  .replace("<!--CSP-->", `<meta http-equiv="Content-Security-Policy" content="${policy}">`)
  .replace("/*LIVE_SCRIPT*/", () => script);
writeFileSync(join(dist, "live.html"), page);
const embedded = join(root, "../../crates/statesync/assets/live.html");
mkdirSync(dirname(embedded), { recursive: true });
if (process.argv.includes("--check")) {
  const current = readFileSync(embedded, "utf8");
  if (current !== page) {
    console.error(`${embedded} is out of date: run \`npm run build\` in clients/js and commit it`);
    process.exit(1);
  }
} else {
  writeFileSync(embedded, page);
}
console.log(`built ${dist} and ${embedded}`);
