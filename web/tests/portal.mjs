// Browser test of the portal, run by the Rust integration test against a real server and VM:
// sign in, see the Cloud PC, open it, and check that the guest's screen reached the canvas.
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
  const opened = Date.now();
  await page.click("button[data-act=open]");
  await page.waitForSelector("#screen canvas", { timeout: 20000 }).catch(() => fail("no console canvas"));
  // Wait until the guest's screen (its text console) has drawn lit pixels into the canvas.
  let lit = 0;
  for (let i = 0; i < 100 && lit < 200; i++) {
    await page.waitForTimeout(200);
    lit = await page.evaluate(() => {
      const c = document.querySelector("#screen canvas");
      if (!c || c.width === 0) return 0;
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let p = 0; p < d.length; p += 4) if (d[p] + d[p + 1] + d[p + 2] > 150) n++;
      return n;
    });
  }
  const firstFrame = Date.now() - opened;
  if (shot) await page.screenshot({ path: shot });
  if (lit < 200) fail(`the canvas stayed dark (${lit} lit pixels)`);
  console.log(JSON.stringify({ litPixels: lit, pageLoadToSignedInMs: opened - started, openToFirstFrameMs: firstFrame }));
} finally {
  await browser.close();
}
