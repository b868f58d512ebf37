// Browser test of the admin console's Network connections page, run by the Rust integration test
// against a real server and the test domain controller: the administrator adds a connection that
// joins the domain through the form, watches its health checks pass and reads each result; a
// connection to a bridge that does not exist fails with a remedy; the policy form offers the
// healthy connection only, and the new policy shows it; a reader sees no buttons that change
// connections.
// Env: CLOUDPC_URL, ADMIN_TOKEN, READER_TOKEN, BRIDGE, DOMAIN, OU, JOIN_USER, JOIN_PASSWORD,
// SCREENSHOT.
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = process.env;
const fail = (m) => {
  console.error(`networks test: ${m}`);
  process.exit(1);
};
const launch = () =>
  chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "cloudpc-chromium-")), {
    executablePath: env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1500, height: 1000 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });

async function signIn(ctx, token, tab) {
  const page = ctx.pages()[0] ?? (await ctx.newPage());
  await page.goto(`${env.CLOUDPC_URL}/admin.html`);
  await page.fill("input[name=token]", token);
  await page.click("button[type=submit]");
  await page.waitForSelector("nav", { timeout: 10000 }).catch(() => fail("sign-in with a token failed"));
  await page.click(`nav button[data-tab=${tab}]`);
  return page;
}

const row = (page, name) => page.locator("tr", { has: page.locator(`td:text-is("${name}")`) });
// The connection's health pill, once its checks have finished (the page redraws itself meanwhile).
const health = (page, name) =>
  page.waitForFunction((n) => {
    const r = [...document.querySelectorAll("tr")].find((t) => t.querySelector("td")?.textContent === n);
    const s = r?.querySelector(".health")?.textContent;
    return s && s !== "pending" && s !== "running" ? s : null;
  }, name, { timeout: 60000 }).then((h) => h.jsonValue());

const admin = await launch();
try {
  const page = await signIn(admin, env.ADMIN_TOKEN, "networks");
  await page.waitForSelector("#newconn", { timeout: 10000 }).catch(() => fail("no form to add a connection"));
  await page.fill("#newconn input[name=name]", "HQ");
  await page.selectOption("#newconn select[name=type]", "hybridAzureADJoin");
  await page.fill("#newconn input[name=bridge]", env.BRIDGE);
  await page.fill("#newconn input[name=domain]", env.DOMAIN);
  await page.fill("#newconn input[name=ou]", env.OU);
  await page.fill("#newconn input[name=username]", env.JOIN_USER);
  await page.fill("#newconn input[name=password]", env.JOIN_PASSWORD);
  await page.click("#newconn button");
  const hq = await health(page, "HQ").catch(() => fail("HQ's checks did not finish"));
  if (hq !== "passed") fail(`HQ's checks: ${hq}`);
  await row(page, "HQ").locator("button[data-checks]").click();
  const results = await page.locator("#checks").innerText();
  for (const want of ["Health checks of HQ", "passed", "DNS", "Kerberos"]) {
    if (!results.includes(want)) fail(`the results lack '${want}': ${results}`);
  }
  if (results.includes(env.JOIN_PASSWORD)) fail("the results show the join password");
  if ((await page.content()).includes(env.JOIN_PASSWORD)) fail("the page holds the join password");
  await page.screenshot({ path: env.SCREENSHOT });

  await page.fill("#newconn input[name=name]", "Nowhere");
  await page.selectOption("#newconn select[name=type]", "azureADJoin");
  await page.fill("#newconn input[name=bridge]", "cpcnone0");
  await page.click("#newconn button");
  const nowhere = await health(page, "Nowhere").catch(() => fail("Nowhere's checks did not finish"));
  if (nowhere !== "failed") fail(`Nowhere's checks: ${nowhere}`);
  await row(page, "Nowhere").locator("button[data-checks]").click();
  const failed = await page.locator("#checks").innerText();
  if (!failed.includes("cpcnone0") || !failed.includes("failed")) fail(`Nowhere's results: ${failed}`);

  // Policies: only the healthy connection is offered; the new policy shows it.
  await page.click("nav button[data-tab=policies]");
  await page.waitForSelector("#newpolicy select[name=network]", { timeout: 10000 }).catch(() => fail("the policy form has no network choice"));
  const offered = await page.locator("#newpolicy select[name=network] option").allInnerTexts();
  if (!offered.some((o) => o.startsWith("HQ")) || offered.some((o) => o.startsWith("Nowhere"))) fail(`networks offered: ${offered}`);
  await page.fill("#newpolicy input[name=name]", "Joined desktops");
  const hqOption = await page.locator("#newpolicy select[name=network] option", { hasText: "HQ" }).getAttribute("value");
  await page.selectOption("#newpolicy select[name=network]", hqOption);
  await page.click("#newpolicy button");
  await page.waitForSelector('td:text-is("Joined desktops")', { timeout: 10000 }).catch(() => fail("the policy was not made"));
  const policy = await row(page, "Joined desktops").innerText();
  if (!policy.includes("HQ")) fail(`the policy row does not name HQ: ${policy}`);

  // HQ is in use now: the API refuses to delete it, and the page says why.
  await page.click("nav button[data-tab=networks]");
  await page.waitForSelector('td:text-is("HQ")', { timeout: 10000 });
  await row(page, "HQ").locator("button[data-delconn]").click();
  await page.waitForFunction(() => document.querySelector("#err")?.textContent?.length > 0, null, { timeout: 10000 })
    .catch(() => fail("deleting a connection in use showed no error"));
  await row(page, "Nowhere").locator("button[data-delconn]").click();
  await page.waitForFunction(() => ![...document.querySelectorAll("td")].some((t) => t.textContent === "Nowhere"), null, { timeout: 10000 })
    .catch(() => fail("Nowhere was not deleted"));
} finally {
  await admin.close();
}

const reader = await launch();
try {
  const page = await signIn(reader, env.READER_TOKEN, "networks");
  await page.waitForSelector('td:text-is("HQ")', { timeout: 10000 }).catch(() => fail("a reader does not see HQ"));
  const writes = row(page, "HQ").locator("button.write");
  if (await writes.count() > 0 && await writes.first().isVisible()) fail("a reader sees buttons that change connections");
  if (await page.locator("#newconn").isVisible()) fail("a reader sees the form to add a connection");
} finally {
  await reader.close();
}
console.log("networks test: ok");
