// Drives the node's dashboard in headless Chromium with playwright-core (crates/nodus/tests/
// dashboard.rs runs it). Talks to the test on stdio: prints "KILL" when the page is ready for a
// node to go down and waits for a line on stdin; prints "SCREENSHOT <path>" for each picture and
// "OK" at the end. Env: URL (the dashboard), SHOTS (directory for PNGs), CHROMIUM (executable).
"use strict";
const { chromium } = require("playwright-core");
const readline = require("readline");

const URL = process.env.URL;
const SHOTS = process.env.SHOTS;
const WAIT = 20000;
const lines = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once("line", resolve));

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors = [];
    page.on("pageerror", (e) => { console.log("PAGE ERROR " + e.message); errors.push(e.message); });
    await page.goto(URL);
    // The page loads and shows both nodes live, the deployed app, and the live feed.
    await page.waitForSelector('#nodes tr[data-node="a"] td.live', { timeout: WAIT });
    await page.waitForSelector('#nodes tr[data-node="b"] td.live', { timeout: WAIT });
    await page.waitForSelector('.card[data-app="echo"]', { timeout: WAIT });
    await page.waitForSelector("#feed.ok", { timeout: WAIT });
    await page.waitForSelector('#map g.node[data-node="b"]:not(.down)', { timeout: WAIT });
    await page.waitForSelector("#quorum.ok", { timeout: WAIT });
    // The node runs tasks and flags: both panels are there.
    await page.waitForSelector('#tasks-panel[data-absent="false"]', { timeout: WAIT });
    await page.waitForSelector('#flags-panel[data-absent="false"] table', { state: "visible", timeout: WAIT });
    // A mark that a reload would lose: every change below must arrive without one.
    await page.evaluate(() => { window.__nodusMark = "kept"; });
    const shot = async (name) => {
      const path = `${SHOTS}/${name}.png`;
      await page.screenshot({ path, fullPage: true });
      console.log("SCREENSHOT " + path);
    };
    await shot("1-loaded");

    // An app call: the engine starts a worker for it, and the page shows the worker and the event without a reload.
    const answer = await page.evaluate(async () => {
      const r = await fetch("/api/call", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ service: "echo", command: "ECHO", payload: "from the browser" }),
      });
      return (await r.json()).payload;
    });
    if (answer !== "from the browser") throw new Error("the app answered " + answer);
    await page.waitForSelector('.card[data-app="echo"] .worker.active', { timeout: WAIT });
    await page.waitForFunction(
      () => [...document.querySelectorAll('#log li[data-kind="app"]')].some((li) => /app echo: worker .* (started|ready)/.test(li.textContent)),
      null, { timeout: WAIT });
    await shot("2-app-called");

    // A task submitted while the page is open shows up as done, counted, without a reload.
    const id = await page.evaluate(async () => {
      const r = await fetch("/api/tasks", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ procedure: "procs.add", args: [2, 3] }),
      });
      if (r.status !== 201) throw new Error("submit answered " + r.status + " " + (await r.text()));
      return (await r.json()).id;
    });
    await page.waitForSelector(`#recent-tasks tr[data-task="${id}"][data-status="done"]`, { timeout: WAIT });
    await page.waitForFunction(
      () => document.querySelector('#task-counts .count[data-status="done"] b')?.textContent === "1",
      null, { timeout: WAIT });
    await page.waitForFunction(
      () => [...document.querySelectorAll('#log li[data-kind="task"]')].some((li) => /procs\.add\) done/.test(li.textContent)),
      null, { timeout: WAIT });
    await shot("3-task-done");

    // A node goes down: the test kills it; the map, the table and the quorum follow.
    console.log("KILL");
    await nextLine();
    await page.waitForSelector('#nodes tr[data-node="b"] td.down', { timeout: WAIT });
    await page.waitForSelector('#map g.node.down[data-node="b"]', { timeout: WAIT });
    await page.waitForFunction(
      () => [...document.querySelectorAll('#log li[data-kind="node"], #log li[data-kind="link"]')].some((li) => /\bb\b/.test(li.textContent)),
      null, { timeout: WAIT });
    await page.waitForSelector("#quorum.bad", { timeout: WAIT });
    const mark = await page.evaluate(() => window.__nodusMark);
    if (mark !== "kept") throw new Error("the page was reloaded");
    await shot("4-node-down");
    if (errors.length) throw new Error("the page's script failed: " + errors.join("; "));
    console.log("OK");
  } finally {
    await browser.close();
    lines.close();
  }
}

main().catch((e) => {
  console.log("FAILED " + (e && e.stack ? e.stack : e));
  process.exit(1);
});
