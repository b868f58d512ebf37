// Browser test of the portal, run by the Rust integration test against a real server and VM:
// sign in, see the Cloud PC, open it, and check that the guest's screen reached the canvas.
// With RESUMING=1 the Cloud PC is hibernated: its card says so and opening it says "Resuming".
// Usage: node tests/portal.mjs   (env: CLOUDPC_URL, CLOUDPC_USER, CLOUDPC_PASSWORD, SCREENSHOT)
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const { CLOUDPC_URL: url, CLOUDPC_USER: user, CLOUDPC_PASSWORD: password, SCREENSHOT: shot } = process.env;
const fail = (m) => {
  console.error(`portal test: ${m}`);
  process.exit(1);
};

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
  const started = Date.now();
  await page.goto(url);
  await page.fill("input[name=upn]", user);
  await page.fill("input[name=password]", "wrong-Password-1");
  await page.click("button[type=submit]");
  await page.waitForSelector(".error:has-text('not right')", { timeout: 10000 }).catch(() => fail("a wrong password was not refused"));
  await page.fill("input[name=password]", password);
  await page.click("button[type=submit]");
  await page.waitForSelector(".card[data-status=provisioned]", { timeout: 30000 }).catch(() => fail("no provisioned Cloud PC card"));
  const cookies = await browser.cookies();
  const session = cookies.find((c) => c.name === "cloudpc_session");
  if (!session || !session.httpOnly || session.sameSite !== "Strict") fail(`session cookie not HttpOnly+Strict: ${JSON.stringify(session)}`);
  if (await page.evaluate(() => document.cookie.includes("cloudpc_session"))) fail("the session cookie is visible to scripts");
  const resuming = process.env.RESUMING === "1";
  if (resuming) {
    await page.waitForSelector(".card[data-saved=yes] .status:has-text('hibernated')", { timeout: 10000 })
      .catch(() => fail("the card does not say the Cloud PC is hibernated"));
  }
  const opened = Date.now();
  await page.click("button[data-act=open]");
  if (resuming) {
    await page.waitForSelector("#state:has-text('Resuming')", { timeout: 2000 }).catch(() => fail("the console does not say it is resuming"));
  }
  await page.waitForSelector("#screen canvas", { timeout: 20000 }).catch(() => fail("no console canvas"));
  // Wait until the guest's screen has drawn lit pixels into the canvas: a few for a text console,
  // or (DESKTOP=1) a desktop: most of the screen lit (a text console never is) and not one plain
  // colour (an X background before the user's session has opened its windows and task bar).
  const desktop = process.env.DESKTOP === "1";
  const enough = (l) => (desktop ? l.total > 0 && l.lit / l.total > 0.5 && l.top / l.total < 0.9 : l.lit >= 200);
  let lit = { lit: 0, total: 0, top: 0 };
  const deadline = Date.now() + (desktop ? 180000 : 20000);
  while (Date.now() < deadline && !enough(lit)) {
    await page.waitForTimeout(200);
    lit = await page.evaluate(() => {
      const c = document.querySelector("#screen canvas");
      if (!c || c.width === 0) return { lit: 0, total: 0, top: 0 };
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      const colours = new Map();
      for (let p = 0; p < d.length; p += 4) {
        if (d[p] + d[p + 1] + d[p + 2] > 150) n++;
        const k = (d[p] << 16) | (d[p + 1] << 8) | d[p + 2];
        colours.set(k, (colours.get(k) ?? 0) + 1);
      }
      return { lit: n, total: d.length / 4, top: Math.max(...colours.values()) };
    });
  }
  const firstFrame = Date.now() - opened;
  if (shot) await page.screenshot({ path: shot });
  if (!enough(lit)) fail(`the canvas did not show ${desktop ? "a desktop" : "the guest's screen"} (${lit.lit} of ${lit.total} pixels lit, ${lit.top} of one colour)`);
  console.log(JSON.stringify({ litPixels: lit.lit, canvasPixels: lit.total, topColourPixels: lit.top, pageLoadToSignedInMs: opened - started, openToFirstFrameMs: firstFrame, shownAtMs: Date.now() }));
} finally {
  await browser.close();
}
