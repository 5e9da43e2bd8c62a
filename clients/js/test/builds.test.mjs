// The three builds expose the same API.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { test } from "node:test";
import vm from "node:vm";

import * as esm from "../dist/index.js";

const require = createRequire(import.meta.url);

test("ESM, CommonJS and the browser global export the same names", () => {
  const cjs = require("../dist/index.cjs");
  const sandbox = { globalThis: {} };
  sandbox.globalThis = sandbox;
  vm.runInNewContext(readFileSync(new URL("../dist/statesync.iife.js", import.meta.url), "utf8"), sandbox);
  const names = Object.keys(esm).sort();
  assert.ok(names.includes("connectHub") && names.includes("connectSharedHub") && names.includes("createHubSource"));
  assert.deepEqual(Object.keys(cjs).sort(), names);
  assert.deepEqual(Object.keys(sandbox.StateSync).sort(), names);
  assert.equal(esm.compareRevisions("10", "9") > 0, true);
  assert.equal(cjs.isRevision("01"), false);
});

test("the type declarations are there", () => {
  const types = readFileSync(new URL("../dist/index.d.ts", import.meta.url), "utf8");
  assert.match(types, /connectHub/);
  assert.match(readFileSync(new URL("../dist/hub.d.ts", import.meta.url), "utf8"), /interface HubClient/);
});
