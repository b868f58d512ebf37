// Browser test of the admin console, run by the Rust integration test against a real server:
// an administrator creates a provisioning policy and assigns a group; a reader can change nothing.
// It also uploads a custom image from a local file, adds a version and deletes the first one.
// Env: CLOUDPC_URL, ADMIN_TOKEN, READER_TOKEN, GROUP_NAME, POLICY_NAME, UPLOAD_FILE, SCREENSHOT.
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = process.env;
const fail = (m) => {
  console.error(`admin test: ${m}`);
  process.exit(1);
};
const launch = () =>
  chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "cloudpc-chromium-")), {
    executablePath: env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });

async function signIn(ctx, token) {
  const page = ctx.pages()[0] ?? (await ctx.newPage());
  await page.goto(`${env.CLOUDPC_URL}/admin.html`);
  await page.fill("input[name=token]", token);
  await page.click("button[type=submit]");
  await page.waitForSelector("nav", { timeout: 10000 }).catch(() => fail("sign-in with a token failed"));
  return page;
}

const admin = await launch();
try {
  const page = await signIn(admin, env.ADMIN_TOKEN);
  await page.click("nav button[data-tab=policies]");
  await page.waitForSelector("#newpolicy");
  await page.fill("#newpolicy input[name=name]", env.POLICY_NAME);
  await page.fill("#newpolicy input[name=template]", "WEB-%RAND:5%");
  await page.fill("#newpolicy input[name=hibernate]", "45");
  await page.fill("#newpolicy input[name=pool]", "3");
  await page.click("#newpolicy button");
  const row = page.locator("tr", { hasText: env.POLICY_NAME });
  await row.waitFor({ timeout: 10000 }).catch(() => fail("the new policy is not listed"));
  await row.locator("td", { hasText: "after 45 min idle" }).waitFor({ timeout: 5000 }).catch(() => fail("the policy's hibernation is not shown"));
  await row.locator("td", { hasText: "3 per license" }).waitFor({ timeout: 5000 }).catch(() => fail("the policy's warm pool is not shown"));
  await row.locator("label", { hasText: env.GROUP_NAME }).locator("input").check();
  await row.locator("button[data-assign]").click();
  await page.locator("tr", { hasText: `1. ${env.GROUP_NAME}` }).waitFor({ timeout: 10000 }).catch(() => fail("the group assignment is not shown"));
  // Edit: the prompts ask for the name, then the naming template.
  const answers = [`${env.POLICY_NAME} v2`, "WEB2-%RAND:5%"];
  page.on("dialog", (d) => d.accept(answers.shift()));
  await row.locator("button[data-editp]").click();
  await page.locator("tr", { hasText: "WEB2-%RAND:5%" }).waitFor({ timeout: 10000 }).catch(() => fail("the edit is not shown"));
  if (env.SCREENSHOT) await page.screenshot({ path: env.SCREENSHOT });

  await page.click("nav button[data-tab=images]");
  await page.waitForSelector("#upimg");
  await page.fill("#upimg input[name=name]", "Uploaded in the browser");
  await page.fill("#upimg input[name=version]", "1.0.0");
  await page.setInputFiles("#upimg input[name=file]", env.UPLOAD_FILE);
  await page.click("#upimg button");
  const imageRow = page.locator("tr", { hasText: "Uploaded in the browser" });
  await imageRow.waitFor({ timeout: 20000 }).catch(() => fail("the uploaded image is not listed"));
  // A second version from the same file, then the first version is deleted.
  await imageRow.locator("form[data-newver] input[name=version]").fill("1.1.0");
  await imageRow.locator("form[data-newver] input[name=file]").setInputFiles(env.UPLOAD_FILE);
  await imageRow.locator("form[data-newver] button").click();
  await page.locator("tr", { hasText: "1.1.0:" }).waitFor({ timeout: 20000 }).catch(() => fail("the new version is not listed"));
  const deleteFirst = page.locator('button[data-version="1.0.0"]');
  for (let i = 0; i < 40 && !(await deleteFirst.count()); i++) {
    await page.waitForTimeout(250);
    await page.click("nav button[data-tab=images]"); // redraw: the button comes once 1.0.0 is checked
  }
  await deleteFirst.click().catch(() => fail("version 1.0.0 has no delete button"));
  await page.locator("tr", { hasText: "1.0.0:" }).waitFor({ state: "detached", timeout: 10000 }).catch(() => fail("version 1.0.0 is still listed"));

  // API tokens: one is made with an expiry, its secret shown once, then it is revoked.
  await page.click("nav button[data-tab=tokens]");
  await page.waitForSelector("#newtoken");
  await page.fill("#newtoken input[name=name]", "made-in-the-browser");
  await page.fill("#newtoken input[name=days]", "30");
  await page.click("#newtoken button");
  await page.locator("#secret", { hasText: "cpc_" }).waitFor({ timeout: 10000 }).catch(() => fail("the new token's secret is not shown"));
  const tokenRow = page.locator("tr", { hasText: "made-in-the-browser" });
  await tokenRow.waitFor({ timeout: 10000 }).catch(() => fail("the new token is not listed"));
  if ((await tokenRow.textContent()).includes("never")) fail("the token's expiry is not shown");
  await tokenRow.locator("button[data-revoke]").click();
  await tokenRow.waitFor({ state: "detached", timeout: 10000 }).catch(() => fail("the revoked token is still listed"));
} finally {
  await admin.close();
}

const reader = await launch();
try {
  const page = await signIn(reader, env.READER_TOKEN);
  if (!(await page.locator("header", { hasText: "read only" }).count())) fail("the reader is not told the console is read-only");
  await page.click("nav button[data-tab=policies]");
  await page.waitForSelector("table");
  if (await page.locator("#newpolicy").isVisible()) fail("a reader sees the create form");
  if (await page.locator("button[data-assign]").first().isVisible()) fail("a reader sees the assign button");
  const status = await page.evaluate(async (token) => {
    const r = await fetch("/v1.0/groups", { method: "POST", headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" }, body: JSON.stringify({ displayName: "sneaky" }) });
    return r.status;
  }, env.READER_TOKEN);
  if (status !== 403) fail(`a reader's write was answered ${status}, not 403`);
} finally {
  await reader.close();
}
console.log("admin console ok");
