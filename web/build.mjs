// Builds the chat page's script and styles into server/web/assets (checked in: serving needs no
// Node.js). `make web` runs this; CI rebuilds and fails when the checked-in files are stale.
import { build } from "esbuild";

const common = {
  bundle: true,
  minify: true,
  legalComments: "linked", // the bundled libraries' licences, in app.js.LEGAL.txt / app.css.LEGAL.txt
  logLevel: "warning",
  target: ["chrome110", "firefox110", "safari16"],
};

await build({
  ...common,
  entryPoints: ["src/main.js"],
  outfile: "../server/web/assets/app.js",
  format: "esm",
});
await build({
  ...common,
  entryPoints: ["src/style.css"],
  outfile: "../server/web/assets/app.css",
});
