// Browser test of the console's clipboard, run by the Rust integration test against a real server
// and a desktop Cloud PC: text sent from the toolbar's clipboard box must reach the X clipboard of
// the user's session in the guest, and text put on that clipboard must show in the box.
// The guest side goes through the real guest agent (virsh qemu-agent-command, xclip as the user).
// Usage: node tests/clipboard.mjs
//   (env: CLOUDPC_URL, CLOUDPC_USER, CLOUDPC_PASSWORD, DOMAIN, GUEST_USER, SCREENSHOT)
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const { CLOUDPC_URL: url, CLOUDPC_USER: user, CLOUDPC_PASSWORD: password, SCREENSHOT: shot } = process.env;
const { DOMAIN: domain, GUEST_USER: guestUser } = process.env;
const fail = (m) => {
  console.error(`clipboard test: ${m}`);
  process.exit(1);
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function agent(command) {
  const out = execFileSync("virsh", ["-c", "qemu:///system", "qemu-agent-command", domain, JSON.stringify(command)], {
    encoding: "utf8",
  });
  return JSON.parse(out).return;
}

// Runs a shell command as the session's user on its display, with `input` on stdin; its stdout.
async function asUser(script, input) {
  const args = { path: "/bin/su", arg: ["-s", "/bin/sh", guestUser, "-c", `DISPLAY=:0 ${script}`], "capture-output": true };
  if (input !== undefined) args["input-data"] = Buffer.from(input, "utf8").toString("base64");
  const { pid } = agent({ execute: "guest-exec", arguments: args });
  for (let i = 0; i < 600; i++) {
    const st = agent({ execute: "guest-exec-status", arguments: { pid } });
    if (st.exited) return Buffer.from(st["out-data"] ?? "", "base64").toString("utf8");
    await sleep(50);
  }
  fail(`'${script}' did not finish in the guest`);
}

const profile = mkdtempSync(join(tmpdir(), "cloudpc-chromium-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1024, height: 768 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
try {
  const page = browser.pages()[0] ?? (await browser.newPage());
  await page.goto(url);
  await page.fill("input[name=upn]", user);
  await page.fill("input[name=password]", password);
  await page.click("button[type=submit]");
  await page.waitForSelector(".card[data-status=provisioned]", { timeout: 30000 }).catch(() => fail("no provisioned Cloud PC card"));
  await page.click("button[data-act=open]");
  await page.waitForSelector("#state:has-text('Connected to')", { timeout: 30000 }).catch(() => fail("the console did not connect"));

  // Browser → Cloud PC: several lines and non-Latin-1 text (the plain VNC cut text is Latin-1 only).
  const tag = Math.random().toString(36).slice(2, 10);
  const toGuest = `from the browser ${tag}\nzweite Zeile: Grüße ✓`;
  await page.fill("#clip", toGuest);
  await page.click("#send");
  const sent = Date.now();
  let inGuest = "";
  while (Date.now() - sent < 30000 && inGuest !== toGuest) {
    inGuest = await asUser("xclip -o -selection clipboard 2>/dev/null");
    if (inGuest !== toGuest) await sleep(300);
  }
  if (inGuest !== toGuest) fail(`the guest's clipboard holds ${JSON.stringify(inGuest)}, not ${JSON.stringify(toGuest)}`);
  const toGuestMs = Date.now() - sent;

  // Cloud PC → browser: xclip takes the guest's clipboard (and stays in the background to serve it).
  const toBrowser = `from the Cloud PC ${tag}\nligne deux : café ✓`;
  const copied = Date.now();
  await asUser("xclip -i -selection clipboard >/dev/null 2>&1", toBrowser);
  const shown = await page
    .waitForFunction((t) => document.querySelector("#clip")?.value === t, toBrowser, { timeout: 30000 })
    .then(() => true, () => false);
  if (shot) await page.screenshot({ path: shot });
  if (!shown) fail(`the clipboard box shows ${JSON.stringify(await page.inputValue("#clip"))}, not ${JSON.stringify(toBrowser)}`);
  console.log(JSON.stringify({ browserToGuestMs: toGuestMs, guestToBrowserMs: Date.now() - copied }));
} finally {
  await browser.close();
}
