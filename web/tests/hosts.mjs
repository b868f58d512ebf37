// Browser test of the admin console's Hosts page, run by the Rust integration test against a real
// server with a (simulated) agent host joined: the administrator sees the host with its region,
// state and capacity, creates a join token (shown once), and puts the host in maintenance and
// back; a reader sees the hosts but no buttons that change them.
// Env: CLOUDPC_URL, ADMIN_TOKEN, READER_TOKEN, HOST_NAME, SCREENSHOT.
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = process.env;
const fail = (m) => {
  console.error(`hosts test: ${m}`);
  process.exit(1);
};
const launch = () =>
  chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "cloudpc-chromium-")), {
    executablePath: env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });

async function hostsPage(ctx, token) {
  const page = ctx.pages()[0] ?? (await ctx.newPage());
  await page.goto(`${env.CLOUDPC_URL}/admin.html`);
  await page.fill("input[name=token]", token);
  await page.click("button[type=submit]");
  await page.waitForSelector("nav", { timeout: 10000 }).catch(() => fail("sign-in with a token failed"));
  await page.click("nav button[data-tab=hosts]");
  await page.waitForSelector(`td:text-is("${env.HOST_NAME}")`, { timeout: 10000 }).catch(() => fail("the host is not listed"));
  return page;
}

const row = (page) => page.locator("tr", { has: page.locator(`td:text-is("${env.HOST_NAME}")`) });

const admin = await launch();
try {
  const page = await hostsPage(admin, env.ADMIN_TOKEN);
  const text = await row(page).innerText();
  for (const want of ["west", "ready", "simulated", "vCPU"]) {
    if (!text.includes(want)) fail(`the host row lacks '${want}': ${text}`);
  }
  await page.fill("#jointoken input[name=region]", "east");
  await page.click("#jointoken button");
  await page.waitForFunction(() => document.querySelector("#jointokenout")?.textContent?.includes("cpcjoin_"), null, { timeout: 10000 })
    .catch(() => fail("the join token was not shown"));
  await row(page).locator("button[data-state=maintenance]").click();
  const stateIs = (page, state) => page.waitForFunction(([name, want]) => [...document.querySelectorAll("tr")]
    .some((r) => r.innerText.includes(name) && r.querySelector(".state")?.textContent === want), [env.HOST_NAME, state], { timeout: 10000 });
  await stateIs(page, "maintenance")
    .catch(() => fail("the host did not go into maintenance"));
  await page.screenshot({ path: env.SCREENSHOT });
  await row(page).locator("button[data-state=ready]").click();
  await stateIs(page, "ready")
    .catch(() => fail("the host did not come back to ready"));
} finally {
  await admin.close();
}

const reader = await launch();
try {
  const page = await hostsPage(reader, env.READER_TOKEN);
  if (await row(page).locator("button.write").count() > 0 && await row(page).locator("button.write").first().isVisible()) {
    fail("a reader sees buttons that change hosts");
  }
} finally {
  await reader.close();
}
console.log("hosts test: ok");
